"""docker-compose.yml, the Dockerfile and the Prometheus files are consistent with the repo.

No Docker engine runs in CI, so the stack is checked by construction: images or builds,
host paths, ``stream-knn`` subcommands, scrape targets and ``promtool``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from stream_knn.cli import _parser
from stream_knn.config import Config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"use the exec (JSON) form, got {value!r}"
    return list(yaml.safe_load(value))


def _uses_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    context = build.get("context", ".") if isinstance(build, dict) else build
    return bool((ROOT / context / dockerfile).resolve() == DOCKERFILE)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _stream_knn_commands() -> dict[str, list[str]]:
    """Argument lists given to the ``stream-knn`` CLI, by where they come from."""
    found: dict[str, list[str]] = {}
    entrypoint = next(_exec_form(a) for w, a in _dockerfile_instructions() if w == "ENTRYPOINT")
    assert entrypoint == ["stream-knn"], "the image's entrypoint must be the stream-knn CLI"
    default_cmd = next(_exec_form(a) for w, a in _dockerfile_instructions() if w == "CMD")
    found["Dockerfile CMD"] = default_cmd
    for name, service in _services().items():
        entry = _as_list(service.get("entrypoint"))
        command = _as_list(service.get("command"))
        if entry:
            if Path(entry[0]).name == "stream-knn":
                found[f"service {name}"] = entry[1:] + command
        elif _uses_our_image(service):
            found[f"service {name}"] = command or default_cmd
        elif command and Path(command[0]).name == "stream-knn":
            found[f"service {name}"] = command[1:]
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# --- services, images and paths -----------------------------------------------------------


def test_every_service_has_an_image_or_a_buildable_dockerfile() -> None:
    for name, service in _services().items():
        build = service.get("build")
        assert service.get("image") or build, f"service {name} has neither image nor build"
        if build is not None:
            context = build.get("context", ".") if isinstance(build, dict) else build
            dockerfile = (
                build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            )
            path = ROOT / context / dockerfile
            assert path.is_file(), f"service {name} builds from {path}, which does not exist"


def test_kafka_is_the_official_kraft_image() -> None:
    kafka = _services()["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka
    # A KRaft cluster id is 16 bytes in URL-safe base64 without padding: 22 characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), env["CLUSTER_ID"]
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = {item.split("://", 1)[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert set(advertised) <= listeners
    # Our containers must reach the broker on its in-network listener.
    bootstrap = _services()["worker"]["environment"]["STREAM_KNN_BOOTSTRAP_SERVERS"]
    assert bootstrap in advertised.values(), f"{bootstrap} is not an advertised listener"


def test_bind_mounted_host_paths_exist_and_named_volumes_are_declared() -> None:
    declared = set((_compose().get("volumes") or {}).keys())
    checked = 0
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                path = (ROOT / source).resolve()
                assert path.exists(), f"service {name} mounts {source}, missing from the repo"
                checked += 1
            else:
                assert source in declared, f"service {name} uses undeclared volume {source}"
    assert checked >= 3  # prometheus config, grafana provisioning, grafana dashboards


def test_worker_waits_for_topics_and_topics_for_a_healthy_kafka() -> None:
    services = _services()
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert (
        services["worker"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    )
    assert services["producer"]["profiles"] == ["demo"]
    # One-shot containers run the same image but serve no /health.
    for name in ("topics", "producer"):
        assert services[name]["healthcheck"] == {"disable": True}


# --- stream-knn subcommands ------------------------------------------------------------------


def test_every_stream_knn_command_is_a_real_subcommand() -> None:
    commands = _stream_knn_commands()
    assert {"service worker", "service topics", "service producer"} <= set(commands)
    parser = _parser()
    registered = _subcommands(parser)
    problems = []
    for where, argv in commands.items():
        line = f"`stream-knn {' '.join(argv)}`"
        name = next((a for a in argv if not a.startswith("-")), None)
        if name not in registered:
            problems.append(
                f"{where} runs {line} but {name!r} is not a registered subcommand "
                f"(registered so far: {', '.join(sorted(registered)) or 'none'}); "
                "it must come from a stream_knn/<package>/cli.py register()"
            )
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(argv)
        except SystemExit:
            problems.append(f"{where}: {line} is rejected: {stderr.getvalue().strip()}")
            continue
        if not callable(getattr(args, "func", None)):
            problems.append(f"{where}: {line} sets no handler (set_defaults(func=...))")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --- Dockerfile ------------------------------------------------------------------------------


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        parts = path.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern)
            or fnmatch.fnmatch("/".join(parts[: i + 1]), pattern.removeprefix("**/"))
            for i in range(len(parts))
        )
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile_copies_files_that_exist_and_are_not_dockerignored() -> None:
    patterns = _dockerignore()
    copied = 0
    for word, args in _dockerfile_instructions():
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args)]
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, missing from the repo"
            assert not _ignored(source.rstrip("/"), patterns), f".dockerignore excludes {source}"
            copied += 1
    assert copied >= 3


def test_dockerfile_runs_the_cli_as_non_root_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    froms = [a for w, a in instructions if w == "FROM"]
    assert all(a.startswith("python:3.11-slim") for a in froms)
    user = [a for w, a in instructions if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")
    port = Config().worker.web_port
    assert [a for w, a in instructions if w == "EXPOSE"] == [str(port)]
    health = next(a for w, a in instructions if w == "HEALTHCHECK")
    assert "/health" in health and str(port) in health
    env = " ".join(a for w, a in instructions if w == "ENV")
    # Faust listens on loopback by default; a container must listen on every interface.
    assert "STREAM_KNN_WORKER__WEB_HOST=0.0.0.0" in env


# --- Prometheus and Grafana --------------------------------------------------------------------


def _container_port(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def test_prometheus_scrapes_the_worker_service_on_its_web_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "stream-knn")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    targets: list[tuple[str, int]] = []
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, port = target.rsplit(":", 1)
            targets.append((host, int(port)))
    for dns in job.get("dns_sd_configs", []):
        targets.extend((name, int(dns["port"])) for name in dns["names"])
    assert targets, "the stream-knn job has no target"
    services = _services()
    web_port = Config().worker.web_port
    for host, port in targets:
        assert host in services, f"Prometheus scrapes {host}, which is no compose service"
        assert port == web_port, f"Prometheus scrapes port {port}, the worker serves {web_port}"
        assert port in _container_port(services[host])
    # The rule files Prometheus loads are in the mounted directory.
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file


def test_prometheus_and_grafana_find_their_files_in_the_mounts() -> None:
    services = _services()

    def mounts(name: str) -> dict[str, Path]:
        out = {}
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                out[target] = ROOT / source
        return out

    def host_path(name: str, container_path: str) -> Path:
        for target, source in mounts(name).items():
            if container_path == target or container_path.startswith(target + "/"):
                return source / container_path[len(target) :].lstrip("/")
        raise AssertionError(f"{container_path} is not mounted into {name}")

    flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert host_path("prometheus", flag.split("=", 1)[1]).resolve() == PROMETHEUS

    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())
    dashboards_dir = host_path("grafana", providers["providers"][0]["options"]["path"])
    assert (dashboards_dir / "stream-knn.json").is_file()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasources["datasources"][0]["url"]
    assert re.fullmatch(r"http://prometheus:9090/?", url), url
    assert 9090 in _container_port(services["prometheus"])


def test_install_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "install-prometheus.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.fixture
def promtool(require_tool: Callable[[str], str]) -> str:
    return require_tool("promtool")


@pytest.mark.parametrize(
    ("what", "path"), [("rules", ALERTS), ("config", PROMETHEUS)], ids=["rules", "config"]
)
def test_promtool_accepts_the_prometheus_files(promtool: str, what: str, path: Path) -> None:
    result = subprocess.run(
        [promtool, "check", what, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
