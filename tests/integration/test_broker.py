"""The local broker for real: start, start again, status, stop, stop again, restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from stream_knn.broker.local import LocalBroker
from stream_knn.cli import main
from stream_knn.config import BrokerConfig

pytestmark = pytest.mark.integration

#: This module runs its own broker; the session broker of tests/conftest.py is not needed.
OWN_BROKER = True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    controller_port = free_port()
    port = free_port()
    while port == controller_port:
        port = free_port()
    instance = LocalBroker(
        BrokerConfig(
            port=port,
            controller_port=controller_port,
            data_dir=tmp_path / "broker",
            start_timeout_seconds=180.0,
        ),
        stop_with_parent=True,
    )
    yield instance
    instance.stop()


def test_broker_lifecycle(broker: LocalBroker, capsys: pytest.CaptureFixture[str]) -> None:
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    assert broker.start() == f"127.0.0.1:{port}"
    metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=30)
    assert list(metadata.brokers) == [1]
    first = broker.status()
    assert first.running is True
    assert first.pid is not None
    assert "Kafka Server started" in broker.log_path.read_text()

    # A second start, here and from another manager of the same data dir, is a no-op; the
    # other manager, configured with another port, learns the port the broker really has.
    assert broker.start() == f"127.0.0.1:{port}"
    other = LocalBroker(BrokerConfig(port=1, data_dir=broker.pid_path.parent))
    assert other.start() == f"127.0.0.1:{port}"
    assert other.status().bootstrap == f"127.0.0.1:{port}"
    assert broker.status().pid == first.pid == other.status().pid

    data_dir = str(broker.pid_path.parent)
    assert main(["broker", "status", "--data-dir", data_dir, "--port", str(port)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "running",
        f"pid: {first.pid}",
        f"bootstrap: 127.0.0.1:{port}",
        f"log: {broker.log_path}",
    ]

    assert broker.stop() is True
    assert not os.path.exists(f"/proc/{first.pid}") or _is_zombie(first.pid)
    assert broker.status().running is False
    assert broker.stop() is False
    assert main(["broker", "status", "--data-dir", data_dir, "--port", str(port)]) == 3

    # Restart on the formatted data dir: no new format, same cluster, answers again.
    meta = (broker.pid_path.parent / "kraft" / "meta.properties").read_text()
    assert broker.start() == f"127.0.0.1:{port}"
    assert (broker.pid_path.parent / "kraft" / "meta.properties").read_text() == meta
    assert broker.status().pid not in (None, first.pid)
    assert broker.stop() is True


def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] == "Z"


_ORPHAN = """
import os, signal, sys
from pathlib import Path
from stream_knn.broker.local import LocalBroker
from stream_knn.config import BrokerConfig
config = BrokerConfig(port=int(sys.argv[1]), controller_port=int(sys.argv[2]),
                      data_dir=Path(sys.argv[3]), start_timeout_seconds=180.0)
LocalBroker(config, stop_with_parent=True).start()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_broker_stops_when_its_test_process_is_killed(tmp_path: Path) -> None:
    data_dir = tmp_path / "orphan"
    killed = subprocess.run(
        [sys.executable, "-c", _ORPHAN, str(free_port()), str(free_port()), str(data_dir)],
        check=False,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    pid = int((data_dir / "broker.pid").read_text())
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and not _is_zombie(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"broker pid {pid} outlived the process that started it")
        time.sleep(0.2)
    assert LocalBroker(BrokerConfig(data_dir=data_dir)).status().running is False
