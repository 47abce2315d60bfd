"""Shared fixtures: a real Kafka broker for integration tests, and unique topics on it.

The broker is found in this order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; a testcontainers Kafka
if a Docker engine answers; otherwise ``stream-knn``'s own local broker on free ports. With
no broker at all, integration tests fail under ``CI=true`` and are skipped elsewhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined,unused-ignore]

from stream_knn.broker.local import LocalBroker
from stream_knn.config import BrokerConfig
from stream_knn.errors import BrokerError

logger = logging.getLogger(__name__)

_DOCKER_PING_SECONDS = 2.0
_ADMIN_TIMEOUT_SECONDS = 30.0
#: A slow first start (cold JVM, jars to fetch) on a busy 2-core machine.
_LOCAL_START_TIMEOUT_SECONDS = 180.0
_WARM_UP_SECONDS = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_answers() -> bool:
    """True if a Docker engine answers ``GET /_ping`` within two seconds."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host[len("unix://") :]
            if not os.path.exists(path):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(_DOCKER_PING_SECONDS)
            sock.connect(path)
        elif host.startswith("tcp://"):
            address, _, port = host[len("tcp://") :].rstrip("/").rpartition(":")
            sock = socket.create_connection((address, int(port)), timeout=_DOCKER_PING_SECONDS)
            sock.settimeout(_DOCKER_PING_SECONDS)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(128).split(b"\r\n", 1)[0]
    except (OSError, ValueError):
        return False
    return b" 200" in status_line


def warm_up(connection: str | dict[str, Any]) -> None:
    """Have the broker create and load ``__consumer_offsets`` before the first test.

    On a fresh broker the first consumer group waits seconds for its coordinator ("coordinator
    load in progress"); a long-running broker has it ready, and tests should not see the
    difference. A consumer group that reads back one record forces the load. (Asking the
    AdminClient for a group's offsets while the coordinator loads crashed librdkafka 2.16
    with a segmentation fault here, so the warm-up uses a plain consumer.)
    """
    settings = (
        {"bootstrap.servers": connection} if isinstance(connection, str) else dict(connection)
    )
    bootstrap = settings["bootstrap.servers"]
    topic = f"stream-knn-warm-up-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(settings)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = Producer(settings)
    producer.produce(topic, b"warm-up")
    if producer.flush(30) != 0:
        raise BrokerError(f"{bootstrap} did not acknowledge the warm-up record")
    consumer = Consumer(
        {
            **settings,
            "group.id": topic,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + _WARM_UP_SECONDS
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                consumer.commit(message=message, asynchronous=False)
                return
        raise BrokerError(
            f"the consumer group coordinator of {bootstrap} is not ready after "
            f"{_WARM_UP_SECONDS:.0f} s"
        )
    finally:
        consumer.close()
        admin.delete_topics([topic])


def in_ci() -> bool:
    """Whether the suite runs in CI: ``CI`` set to anything but empty, ``0`` or ``false``
    (CI services set ``true``, some ``1``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> NoReturn:
    """A missing broker or tool: a failure in CI (CI runs every test, it never skips
    one), a skip only on a developer's machine."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _no_broker(reason: str) -> NoReturn:
    unavailable(f"no Kafka broker for integration tests: {reason}")


#: The project script that installs each tool tests need (``make test`` runs them all).
_INSTALLERS = {
    "prometheus": "scripts/install-prometheus.sh",
    "promtool": "scripts/install-prometheus.sh",
    "chromium": "scripts/install-chromium.sh",
    "openssl": "scripts/install-openssl.sh",
}


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """``require_tool(name)``: the path of a command-line tool the test needs (Prometheus'
    tools come from ``scripts/install-prometheus.sh``, Chromium from
    ``scripts/install-chromium.sh``; ``make test`` runs both)."""

    def find(tool: str) -> str:
        path = shutil.which(tool)
        if path is None:
            script = _INSTALLERS.get(tool, "your system's package manager")
            unavailable(f"{tool} not found on PATH: run {script}")
        return path

    return find


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real Kafka broker for this test session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    reasons: list[str] = []
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        container: Any = KafkaContainer().with_kraft()
        try:
            container.start()
        except Exception as exc:  # docker raises many kinds; the reason is kept and reported
            reasons.append(f"testcontainers Kafka did not start: {exc}")
        else:
            try:
                warm_up(str(container.get_bootstrap_server()))
                yield str(container.get_bootstrap_server())
            finally:
                container.stop()
            return
    else:
        reasons.append("no Docker engine answers")
    controller_port = free_port()
    port = free_port()
    while port == controller_port:
        port = free_port()
    broker = LocalBroker(
        BrokerConfig(
            port=port,
            controller_port=controller_port,
            data_dir=tmp_path_factory.mktemp("kafka-broker"),
            start_timeout_seconds=_LOCAL_START_TIMEOUT_SECONDS,
        ),
        # A killed test run (timeout, crash) must not leave a broker behind.
        stop_with_parent=True,
    )
    try:
        bootstrap = broker.start()
    except BrokerError as exc:
        reasons.append(f"the local broker did not start: {exc}")
    else:
        try:
            warm_up(bootstrap)
            yield bootstrap
        finally:
            broker.stop()
        return
    _no_broker("; ".join(reasons))


@pytest.fixture(autouse=True)
def _integration_broker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every ``integration`` test (and the CLI it runs) at the session's broker.

    A test module that runs its own broker sets ``OWN_BROKER = True`` to opt out.
    """
    if request.node.get_closest_marker("integration") is None:
        return
    if getattr(request.module, "OWN_BROKER", False):
        return
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_KNN_BOOTSTRAP_SERVERS", bootstrap)


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics for one test; they are deleted after it.

    Call as ``topic_factory(prefix="events", partitions=4, config={"retention.ms": "60000"})``;
    it returns the topic name.
    """
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def create(
        prefix: str = "test", partitions: int = 4, config: dict[str, str] | None = None
    ) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        admin.create_topics([topic], request_timeout=_ADMIN_TIMEOUT_SECONDS)[name].result(
            timeout=_ADMIN_TIMEOUT_SECONDS
        )
        created.append(name)
        return name

    yield create
    if created:
        _delete_topics(kafka_bootstrap, created)


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete topics; ones already gone are fine."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_topics(names, operation_timeout=_ADMIN_TIMEOUT_SECONDS)
    for name, future in futures.items():
        try:
            future.result(timeout=_ADMIN_TIMEOUT_SECONDS)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            logger.debug("topic %s was already deleted", name)
