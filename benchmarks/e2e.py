"""Worker benchmarks on a real broker: end-to-end latency at fixed rates, open-throttle rate,
ingest rate, raw consume rate, the cost of index rebuilds and HTTP query latency."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream_knn.events.producer import TokenBucket, producer_config
from stream_knn.events.synthetic import SyntheticStream

__all__ = ["Deployment", "RecordTap", "WorkerStats", "raw_consume_rate", "time_gets"]

_ROLES = ("user_events", "item_catalog", "recommendations", "requests", "dlq")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_EVENTS_TOTAL = re.compile(r"^stream_knn_events_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerStats:
    """CPU seconds (utime + stime) and peak RSS of a process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as fh:
            # Fields after the parenthesised command name; utime and stime are 14 and 15.
            rest = fh.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / _CLK_TCK

    def peak_rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")


class RecordTap:
    """A thread reading one topic from the beginning: (consume wall time, record) pairs."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.times: list[float] = []
        self.event_ts: list[int] = []
        self.triggers: list[str] = []
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"sknn-bench-tap-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
            }
        )
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, name="bench-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.05):
                now = time.time()
                if msg.error():
                    continue
                record = orjson.loads(msg.value() or b"null")
                self.event_ts.append(int(record.get("event_ts") or 0))
                self.triggers.append(str(record.get("trigger")))
                self.times.append(now)
        self._consumer.close()

    def count(self) -> int:
        return len(self.times)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Deployment:
    """One worker process with its own topics, app id, data dir and web port."""

    bootstrap: str
    root: Path
    name: str
    extra_env: dict[str, str] = field(default_factory=dict)
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    web_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    profile_path: Path | None = None

    @property
    def topics(self) -> dict[str, str]:
        return {role: f"bench-{role.replace('_', '-')}-{self.suffix}" for role in _ROLES}

    @property
    def app_id(self) -> str:
        return f"sknn-bench-{self.name}-{self.suffix}"

    @property
    def log_path(self) -> Path:
        return self.root / f"worker-{self.name}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KNN_")}
        env.update(
            {
                "STREAM_KNN_BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAM_KNN_WORKER__APP_ID": self.app_id,
                "STREAM_KNN_DATA_DIR": str(self.root / f"state-{self.name}"),
                "STREAM_KNN_WEB_PORT": str(self.web_port),
                "STREAM_KNN_WORKER__PARTITIONS": "4",
                "STREAM_KNN_LOG_LEVEL": "WARNING",
            }
        )
        for role, topic in self.topics.items():
            env[f"STREAM_KNN_KAFKA__{role.upper()}_TOPIC"] = topic
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 180.0) -> None:
        """Create the topics (4 partitions), start ``stream-knn worker`` and wait for /ready."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=4, replication_factor=1) for t in self.topics.values()]
        )
        for future in futures.values():
            future.result(timeout=30)
        command = [sys.executable]
        if self.profile_path is not None:
            command += ["-m", "cProfile", "-o", str(self.profile_path)]
        command += ["-m", "stream_knn.cli", "worker"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: see {self.log_path}")
            if self._status("/ready") == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"worker {self.name} not ready after {timeout_s:.0f} s: {self.log_path}")

    def stats(self) -> WorkerStats:
        assert self.proc is not None
        return WorkerStats(self.proc.pid)

    def _status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=5) as r:
                return int(r.status)
        except OSError:
            return 0

    def get_json(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.web_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return orjson.loads(resp.read())

    def index_state(self) -> dict[str, Any]:
        """The primary index's /index entry (version, items, last build seconds)."""
        try:
            body = self.get_json("/index")
        except OSError:
            return {}
        indexes = body.get("indexes") or [{}]
        return dict(indexes[0])

    def events_total(self) -> float:
        """Sum of ``stream_knn_events_total`` on the worker's /metrics."""
        url = f"http://127.0.0.1:{self.web_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return sum(float(v) for v in _EVENTS_TOTAL.findall(text))

    def metric(self, name: str) -> float | None:
        """Sum of the unlabelled or labelled samples of ``name`` on /metrics (None if absent)."""
        url = f"http://127.0.0.1:{self.web_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+|NaN)$", re.M)
        values = [float(v) for v in pattern.findall(text)]
        return sum(values) if values else None

    def cleanup(self) -> None:
        """Delete this deployment's topics (its own and the worker's internal ones) and state."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        names = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t in self.topics.values() or t.startswith(self.app_id)
        ]
        if names:
            for future in admin.delete_topics(names, operation_timeout=30).values():
                future.result(timeout=60)
        shutil.rmtree(self.env()["STREAM_KNN_DATA_DIR"], ignore_errors=True)

    def stop(self) -> None:
        """SIGINT first (lets cProfile write its file), then SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class EventSource:
    """Synthetic events whose ``ts`` is set to the produce wall time, in ms."""

    def __init__(self, n_users: int, n_items: int, seed: int) -> None:
        stream = SyntheticStream(n_users=n_users, n_items=n_items, n_clusters=50, seed=seed)
        self._events: Iterator[dict[str, Any]] = stream.events(10**9)
        #: Users in the order they first had an event (the HTTP phase asks for these).
        self.seen_users: dict[str, None] = {}

    def next_event(self) -> tuple[bytes, dict[str, Any]]:
        event = next(self._events)
        event["ts"] = int(time.time() * 1000)
        self.seen_users.setdefault(event["user_id"], None)
        return event["user_id"].encode(), event


def make_producer(bootstrap: str) -> Producer:
    config = producer_config(bootstrap)
    # 1 ms instead of 5: the batching delay is part of the end-to-end latency we report.
    config["linger.ms"] = 1
    return Producer(config)


def produce_catalog(bootstrap: str, topic: str, vectors: np.ndarray[Any, Any]) -> None:
    """One catalog record with a vector per item ``i<k>`` (so every item is indexed)."""
    producer = make_producer(bootstrap)
    rounded = np.round(vectors, 3).tolist()
    for k, vector in enumerate(rounded):
        while True:
            try:
                producer.produce(
                    topic, orjson.dumps({"item_id": f"i{k}", "vector": vector}), f"i{k}".encode()
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("catalog records not delivered within 120 s")


def produce_for(
    producer: Producer,
    topic: str,
    source: EventSource,
    *,
    rate: float | None,
    seconds: float | None = None,
    count: int | None = None,
) -> tuple[int, float, float]:
    """Produce at ``rate`` (None = open throttle) for ``seconds`` or ``count`` events.

    Returns (events sent, wall start, wall end of sending).
    """
    bucket = TokenBucket(rate, capacity=max(1.0, rate * 0.01)) if rate else None
    started = time.time()
    deadline = time.monotonic() + seconds if seconds is not None else None
    sent = 0
    while (count is None or sent < count) and (deadline is None or time.monotonic() < deadline):
        if bucket is not None:
            wait = bucket.wait()
            while wait > 0:
                producer.poll(wait)
                wait = bucket.wait()
        key, event = source.next_event()
        while True:
            try:
                producer.produce(topic, orjson.dumps(event), key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        sent += 1
    ended = time.time()
    producer.flush(60)
    return sent, started, ended


def wait_for(predicate: Callable[[], bool], timeout_s: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def raw_consume_rate(bootstrap: str, topic: str, expected: int) -> dict[str, Any]:
    """A plain confluent-kafka consumer reading ``topic`` from the start: records/s."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"sknn-bench-raw-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    count = 0
    first: float | None = None
    deadline = time.monotonic() + 120
    while count < expected and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error():
                continue
            if first is None:
                first = time.perf_counter()
            orjson.loads(msg.value() or b"null")
            count += 1
    seconds = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return {
        "client": "confluent-kafka consume(1000) + orjson.loads",
        "records": count,
        "seconds": round(seconds, 3),
        "records_per_second": round(count / seconds) if seconds > 0 else None,
    }


def time_gets(port: int, paths: list[str]) -> tuple[np.ndarray[Any, Any], float, int]:
    """GET each path in turn on one keep-alive connection to 127.0.0.1:``port``.

    Returns (per-request milliseconds, wall seconds of the whole sequence, non-200 answers).
    The body is read fully, so a request's time ends when its last byte arrived.
    """
    times = np.empty(len(paths))
    errors = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.perf_counter()
    try:
        for n, path in enumerate(paths):
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (http.client.HTTPException, ConnectionError):
                # The server closed the idle connection: reconnect and ask once more.
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                t0 = time.perf_counter()
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            times[n] = (time.perf_counter() - t0) * 1000.0
            errors += status != 200
    finally:
        conn.close()
    return times, time.perf_counter() - started, errors
