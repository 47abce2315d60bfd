"""The local broker manager without a JVM: properties, missing tools, jar cache, pid files."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from stream_knn.broker.local import LocalBroker, server_properties
from stream_knn.cli import main
from stream_knn.config import BrokerConfig
from stream_knn.errors import BrokerError

JAVA_MISSING = "java not found: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"


def config(tmp_path: Path, **changes: object) -> BrokerConfig:
    values: dict[str, object] = {
        "port": 19192,
        "controller_port": 19193,
        "data_dir": tmp_path / "data",
        "jars_dir": tmp_path / "jars",
    }
    values.update(changes)
    return BrokerConfig(**values)  # type: ignore[arg-type]


def tools_only(tmp_path: Path, *names: str) -> Path:
    """A PATH directory holding only fake executables of these names (exit 1 if run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\nexit 1\n")
        tool.chmod(0o755)
    return bin_dir


def fake_resolved_jars(jars_dir: Path, digest: str | None = None) -> None:
    pom = resources.files("stream_knn.broker").joinpath("pom.xml").read_bytes()
    jars_dir.mkdir(parents=True)
    (jars_dir / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    (jars_dir / ".stream-knn-pom.sha256").write_text(
        (digest or hashlib.sha256(pom).hexdigest()) + "\n"
    )


def parse(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and line[0] != "#"]
    return {key: value for key, value in pairs}


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    props = parse(server_properties(config(tmp_path)))
    assert props == {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": "1@127.0.0.1:19193",
        "listeners": "PLAINTEXT://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193",
        "advertised.listeners": "PLAINTEXT://127.0.0.1:19192",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(tmp_path / "data" / "kraft"),
        "num.partitions": "4",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
    }


def test_missing_java_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path, "mvn")))
    with pytest.raises(BrokerError) as info:
        LocalBroker(config(tmp_path)).start()
    assert str(info.value) == JAVA_MISSING


def test_missing_mvn_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path, "java")))
    with pytest.raises(BrokerError) as info:
        LocalBroker(config(tmp_path)).ensure_jars()
    assert str(info.value).startswith(
        "mvn not found: install Apache Maven 3 (apt-get install maven)"
    )


def test_resolved_jars_are_reused_without_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path)))
    fake_resolved_jars(tmp_path / "jars")
    assert LocalBroker(config(tmp_path)).ensure_jars() == tmp_path / "jars"


def test_changed_pom_resolves_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path)))
    fake_resolved_jars(tmp_path / "jars", digest="0" * 64)
    with pytest.raises(BrokerError, match=r"^mvn not found"):
        LocalBroker(config(tmp_path)).ensure_jars()


def test_failing_maven_reports_its_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path, "mvn")))
    with pytest.raises(BrokerError, match=r"^mvn could not resolve the Kafka jars \(exit 1\)"):
        LocalBroker(config(tmp_path)).ensure_jars()
    assert not (tmp_path / "jars" / ".stream-knn-pom.sha256").exists()


def test_invalid_heap_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path, "java", "mvn")))
    with pytest.raises(BrokerError, match=r"broker.heap = 'lots' is not a JVM heap size"):
        LocalBroker(config(tmp_path, heap="lots")).start()


def test_port_taken_by_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tools_only(tmp_path, "java")))
    fake_resolved_jars(tmp_path / "jars")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        broker = LocalBroker(config(tmp_path, port=port))
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} \(broker\.port\) is already"):
            broker.start()
    assert not broker.pid_path.exists()


def test_no_pid_file_means_stopped(tmp_path: Path) -> None:
    broker = LocalBroker(config(tmp_path))
    status = broker.status()
    assert (status.running, status.pid) == (False, None)
    assert status.bootstrap == "127.0.0.1:19192"
    assert status.log_path == tmp_path / "data" / "logs" / "broker.log"
    assert broker.stop() is False


def test_stale_pid_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    broker = LocalBroker(config(tmp_path))
    broker.pid_path.parent.mkdir(parents=True)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    # A dead pid, and a live process that is not our broker (this test): neither is signalled.
    for pid in (int(finished.stdout), os.getpid(), "garbage"):
        broker.pid_path.write_text(f"{pid}\n")
        assert broker.status().running is False
        assert broker.pid_path.exists()  # status only reads
        assert broker.stop() is False
        assert not broker.pid_path.exists()


def test_cli_status_and_stop_without_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert main(["broker", "status", "--data-dir", str(data), "--port", "19192"]) == 3
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "stopped",
        "bootstrap: 127.0.0.1:19192",
        f"log: {data / 'logs' / 'broker.log'}",
    ]
    assert main(["broker", "stop", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().err == f"no broker running for data dir {data}\n"
