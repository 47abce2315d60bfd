"""Fixtures for tests that run a real ``stream-knn worker`` process against a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_knn.broker.local import LocalBroker
from stream_knn.broker.secure import (
    APP_USER,
    Pki,
    app_acls,
    client_env,
    create_acls,
    secret_file,
    upsert_users,
)
from stream_knn.config import BrokerConfig, Config, load_config
from stream_knn.errors import BrokerError
from stream_knn.kafka import librdkafka_settings
from tests.conftest import free_port as _free_port
from tests.conftest import unavailable, warm_up

TOPIC_ROLES = ("user_events", "item_catalog", "recommendations", "requests", "dlq")


def free_port() -> int:
    return _free_port()


@dataclass
class WorkerEnv:
    """Unique topics, app id, data dir and port for one worker deployment under test.

    ``client`` holds the librdkafka security settings of the test's own clients (topics,
    produce, consume; empty: PLAINTEXT), ``admin`` those of a super user for topic
    creation (default: ``client``), ``headers`` what :meth:`get` sends (a bearer token).
    """

    bootstrap: str
    data_dir: Path
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    web_port: int = field(default_factory=free_port)
    extra: dict[str, str] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    admin: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> dict[str, str]:
        return {role: f"{role.replace('_', '-')}-{self.suffix}" for role in TOPIC_ROLES}

    @property
    def app_id(self) -> str:
        return f"sknn-test-{self.suffix}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KNN_")}
        env.update(
            {
                "STREAM_KNN_BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAM_KNN_WORKER__APP_ID": self.app_id,
                "STREAM_KNN_DATA_DIR": str(self.data_dir),
                "STREAM_KNN_WEB_PORT": str(self.web_port),
                "STREAM_KNN_WORKER__PARTITIONS": "4",
                "STREAM_KNN_REBUILD_INTERVAL": "1",
                "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": "100000",
            }
        )
        for role, name in self.topics.items():
            env[f"STREAM_KNN_KAFKA__{role.upper()}_TOPIC"] = name
        env.update(self.extra)
        return env

    def settings(self, **more: Any) -> dict[str, Any]:
        """librdkafka settings of a test client of this deployment."""
        return {"bootstrap.servers": self.bootstrap, **self.client, **more}

    def create_topics(self) -> None:
        admin = AdminClient(self.admin or self.settings())
        futures = admin.create_topics(
            [
                NewTopic(name, num_partitions=4, replication_factor=1)
                for name in self.topics.values()
            ]
        )
        for future in futures.values():
            future.result(timeout=30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url(path), headers=self.headers if headers is None else headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            body = exc.read()
            status = exc.code
        try:
            return status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return status, body.decode()

    def feed(self, topic_role: str, records: list[tuple[bytes, bytes]], rate: int) -> Feeder:
        """Start producing ``records`` at about ``rate`` per second in the background."""
        feeder = Feeder(self.settings(), self.topics[topic_role], records, rate)
        feeder.start()
        return feeder

    def produce(self, topic_role: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
        producer = Producer(self.settings(partitioner="murmur2_random", **{"linger.ms": 5}))
        errors: list[Any] = []
        for key, value in records:
            producer.produce(
                self.topics[topic_role],
                key=key,
                value=value,
                on_delivery=lambda err, _msg: errors.append(err) if err else None,
            )
        assert producer.flush(30) == 0
        assert not errors, errors

    def consume(
        self, topic_role: str, expected: int, timeout_s: float = 60.0
    ) -> list[tuple[bytes | None, Any]]:
        consumer = Consumer(
            self.settings(
                **{
                    # A group the deployment's principal may use (secured brokers).
                    "group.id": f"stream-knn-test-{uuid.uuid4().hex}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                }
            )
        )
        consumer.subscribe([self.topics[topic_role]])
        out: list[tuple[bytes | None, Any]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(out) < expected and time.monotonic() < deadline:
                for msg in consumer.consume(500, timeout=0.5):
                    if msg.error():
                        continue
                    out.append((msg.key(), orjson.loads(msg.value())))
            # Keep listening briefly so extra (unexpected) records are seen too.
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for msg in consumer.consume(500, timeout=0.2):
                    if not msg.error():
                        out.append((msg.key(), orjson.loads(msg.value())))
        finally:
            consumer.close()
        return out


class Feeder(threading.Thread):
    """Produces records at a steady rate in the background (a stream does not stop because
    a worker died or rebuilt); delivery errors are collected in ``errors``."""

    def __init__(
        self,
        settings: str | dict[str, Any],
        topic: str,
        records: list[tuple[bytes, bytes]],
        rate: int,
    ) -> None:
        """``settings``: a bootstrap address, or librdkafka settings."""
        super().__init__(name="feeder", daemon=True)
        self.settings = {"bootstrap.servers": settings} if isinstance(settings, str) else settings
        self.topic, self.records, self.rate = topic, records, rate
        self.errors: list[Any] = []
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Stop producing after the current chunk (what was sent is flushed)."""
        self.stopping.set()

    def run(self) -> None:
        producer = Producer({**self.settings, "partitioner": "murmur2_random", "linger.ms": 5})
        chunk = max(1, self.rate // 10)
        for start in range(0, len(self.records), chunk):
            if self.stopping.is_set():
                break
            for key, value in self.records[start : start + chunk]:
                producer.produce(
                    self.topic,
                    key=key,
                    value=value,
                    on_delivery=lambda err, _m: self.errors.append(err) if err else None,
                )
            producer.poll(0)
            time.sleep(0.1)
        if producer.flush(30) != 0:
            self.errors.append("flush timed out")


class WorkerProcess:
    """``stream-knn worker`` as a user runs it, in a subprocess."""

    def __init__(self, env: WorkerEnv, log_path: Path, config_file: Path | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout_s: float = 120.0) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            config = [] if self.config_file is None else ["--config", str(self.config_file)]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_knn.cli", *config, "worker"],
                env=self.env.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                status, _body = self.env.get("/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, kill: bool = False, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> WorkerEnv:
    env = WorkerEnv(kafka_bootstrap, tmp_path / "state")
    env.create_topics()
    return env


@pytest.fixture
def run_worker(worker_env: WorkerEnv, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def _start(wait_ready: bool = True, config_file: Path | None = None) -> WorkerProcess:
        proc = WorkerProcess(worker_env, tmp_path / f"worker-{len(started)}.log", config_file)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield _start
    for proc in started:
        proc.stop()


# -- a secured broker: SASL_SSL (SCRAM, PLAIN), mutual TLS, the standard authorizer --------


@dataclass
class SecureKafka:
    """The session's secured local broker (:mod:`stream_knn.broker.secure`).

    ``bootstrap`` is its SASL_SSL listener, ``ssl_bootstrap`` its mutual-TLS one;
    ``admin`` are the settings of a super user (the broker's own certificate).
    """

    broker: LocalBroker
    bootstrap: str
    ssl_bootstrap: str
    pki: Pki

    @property
    def admin(self) -> dict[str, Any]:
        return dict(self.broker.admin_settings())

    def add_user(self, name: str) -> Path:
        """A SCRAM user (SHA-256 and -512) with a random password; its password file."""
        path = secret_file(self.pki.password_file(name))
        upsert_users(self.admin, {name: path.read_text().strip()})
        return path

    def grant(self, config: Config, principal: str = f"User:{APP_USER}") -> None:
        """The ACLs of ``config``'s deployment (its topics, groups) for ``principal``."""
        create_acls(self.admin, app_acls(config, principal))

    def env(self, user: str = APP_USER, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """``STREAM_KNN_*`` settings of a client that is ``user`` on the SASL_SSL listener."""
        env = client_env(self.pki, self.bootstrap, user)
        env["STREAM_KNN_KAFKA__SASL_MECHANISM"] = mechanism
        return env

    def client(self, user: str = APP_USER, mechanism: str = "SCRAM-SHA-512") -> dict[str, Any]:
        """librdkafka settings of the same client, built by stream-knn's own builder."""
        env = {k: v for k, v in self.env(user, mechanism).items()}
        return librdkafka_settings(load_config(environ=env).kafka)


@pytest.fixture(scope="session")
def secure_kafka(
    tmp_path_factory: pytest.TempPathFactory, require_tool: Callable[[str], str]
) -> Iterator[SecureKafka]:
    """One secured broker for every secured test of the session (started on free ports;
    its certificates are made with openssl)."""
    require_tool("openssl")
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, ssl_port, controller_port = sorted(ports)
    config = BrokerConfig(
        port=port,
        ssl_port=ssl_port,
        controller_port=controller_port,
        data_dir=tmp_path_factory.mktemp("secure-broker"),
        heap="512m",
        start_timeout_seconds=180.0,
    )
    broker = LocalBroker(config, stop_with_parent=True, secure=True)
    try:
        bootstrap = broker.start()
    except BrokerError as exc:
        broker.stop()  # launched, maybe, before the step that failed
        unavailable(f"the secured local broker did not start: {exc}")
    try:
        assert broker.pki is not None
        warm_up(broker.admin_settings())
        yield SecureKafka(broker, bootstrap, f"127.0.0.1:{ssl_port}", broker.pki)
    finally:
        broker.stop()
