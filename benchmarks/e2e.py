"""The harness's Kafka plumbing: a worker deployment on its own topics, plain confluent-kafka
producers and a tap on the lists, and the references run beside the worker (a bare Faust
agent process, a raw consumer)."""

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from benchmarks.workload import ZipfEvents
from stream_knn.events.producer import TokenBucket, pace

__all__ = [
    "Deployment",
    "RecordTap",
    "WorkerStats",
    "bare_faust_rate",
    "make_producer",
    "produce_backlog",
    "produce_catalog",
    "produce_paced",
    "raw_consume_rate",
    "time_gets",
    "wait_for",
]

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
    """A thread reading one topic from the beginning with a plain confluent-kafka consumer.

    Keeps the wall time each record was consumed and, per ``event_id`` the records carry,
    the time the first record with that id was consumed and how many there were.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.times: list[float] = []
        #: event id -> wall time its first list was consumed.
        self.first_seen: dict[str, float] = {}
        #: event id -> lists consumed with that id (more than 1: a duplicate).
        self.copies: dict[str, int] = {}
        #: event id -> the worker's ``emitted_ts`` of its first list, in seconds.
        self.emitted: dict[str, float] = {}
        #: event id -> the Kafka CreateTime of its first list (the worker's produce call), s.
        self.created: dict[str, float] = {}
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
            # consume(n, timeout) waits for n records or the timeout, which would add up to
            # the timeout to every latency: wait for one record, then take what is there.
            first = self._consumer.poll(0.05)
            if first is None:
                continue
            for msg in [first, *self._consumer.consume(1000, timeout=0)]:
                now = time.time()
                if msg.error():
                    continue
                record = orjson.loads(msg.value() or b"null")
                event_id = record.get("event_id") if isinstance(record, dict) else None
                if event_id is not None:
                    event_id = str(event_id)
                    if event_id not in self.first_seen:
                        self.first_seen[event_id] = now
                        self.emitted[event_id] = float(record.get("emitted_ts") or 0) / 1000.0
                        self.created[event_id] = msg.timestamp()[1] / 1000.0
                    self.copies[event_id] = self.copies.get(event_id, 0) + 1
                self.times.append(now)
        self._consumer.close()

    def count(self) -> int:
        return len(self.times)

    def delivered(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` have had a list consumed."""
        seen = self.first_seen
        return sum(1 for i in ids if i in seen)

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
                # Every list from the index: on the load's independent Zipf events plain
                # popularity wins, and the self-tuning worker would switch to it mid-run,
                # making lists far cheaper than the index path the figures are about.
                "STREAM_KNN_SERVING__SELF_TUNING": "false",
            }
        )
        for role, topic in self.topics.items():
            env[f"STREAM_KNN_KAFKA__{role.upper()}_TOPIC"] = topic
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 180.0, create_topics: bool = True) -> None:
        """Create the topics (4 partitions), start ``stream-knn worker`` and wait for /ready."""
        if create_topics:
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

    def restart(self, extra_env: dict[str, str]) -> float:
        """Stop the worker and start it again with ``extra_env``: same topics, app and state.

        Returns the seconds until it was ready again.
        """
        self.stop()
        self.extra_env = dict(extra_env)
        started = time.monotonic()
        self.start(create_topics=False)
        ready = time.monotonic() - started
        # A restarted worker may build once to take in what changed while it was down: let
        # that finish, so the next phase sees the settings it is meant to measure.
        stable, last = time.monotonic(), self.index_state().get("version")
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and time.monotonic() - stable < 3.0:
            time.sleep(0.5)
            version = self.index_state().get("version")
            if version != last:
                stable, last = time.monotonic(), version
        return ready

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


def make_producer(bootstrap: str) -> Producer:
    """A plain confluent-kafka producer, configured here rather than by the project.

    ``murmur2_random`` maps a key to the partition the Java client (and Faust) would pick;
    a 1 ms linger, because the batching delay is part of the end-to-end latency reported.
    """
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 1,
            "compression.type": "lz4",
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )


def _produce(producer: Producer, topic: str, value: bytes, key: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.05)


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
    if producer.flush(300):
        raise RuntimeError("catalog records not delivered within 300 s")


def produce_paced(
    producer: Producer, topic: str, source: ZipfEvents, rate: float, seconds: float
) -> dict[str, float]:
    """Produce ``rate`` events/s for ``seconds``: event id -> wall time of its produce call."""
    sent: dict[str, float] = {}
    # A bank of 10 ms of tokens: the pace stays steady, without bursts after a slow poll.
    bucket = TokenBucket(rate, capacity=max(1.0, rate * 0.01))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pace(producer, bucket)
        key, event = source.next_event()
        value = orjson.dumps(event)
        sent[event["event_id"]] = time.time()
        _produce(producer, topic, value, key)
        producer.poll(0)
    producer.flush(60)
    return sent


def produce_backlog(
    producer: Producer, topic: str, backlog: list[tuple[bytes, bytes, str]]
) -> tuple[float, float]:
    """Produce serialised events as fast as the client goes; (wall start, wall end of flush)."""
    started = time.time()
    for key, value, _ in backlog:
        _produce(producer, topic, value, key)
    if producer.flush(120):
        raise RuntimeError(f"backlog not delivered to {topic} within 120 s")
    return started, time.time()


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
    first = last = 0.0
    deadline = time.monotonic() + 120
    while count < expected and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error():
                continue
            orjson.loads(msg.value() or b"null")
            if count == 0:
                first = time.perf_counter()
            count += 1
        last = time.perf_counter()
    consumer.close()
    rate = (count - 1) / (last - first) if count > 1 and last > first else None
    return {
        "client": "confluent-kafka consume(1000) + orjson.loads, one process",
        "records": count,
        "records_per_second": round(rate) if rate else None,
        "rate_from": "first record to last",
    }


def bare_faust_rate(bootstrap: str, topic: str, expected: int, root: Path) -> dict[str, Any]:
    """``benchmarks.bare_faust`` run as its own process on ``topic``: records/s."""
    out = root / f"bare-faust-{uuid.uuid4().hex[:8]}.json"
    log = root / "bare-faust.log"
    command = [sys.executable, "-m", "benchmarks.bare_faust", "--bootstrap", bootstrap]
    command += ["--topic", topic, "--expected", str(expected), "--out", str(out)]
    started = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            command,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    wall = time.monotonic() - started
    if not out.exists():
        return {"error": f"bare Faust agent did not read {expected} records: see {log}"}
    body = orjson.loads(out.read_bytes())
    out.unlink()
    marks = body["marks"]
    # From its first record to its last: the group join before is start-up, not reading.
    rate = (body["records"] - 1) / (marks[-1] - marks[0]) if marks[-1] > marks[0] else None
    return {
        "client": "faust-streaming agent, async for event in stream.events() + orjson.loads, "
        "own process, fresh group",
        "records": body["records"],
        "records_per_second": round(rate) if rate else None,
        "process_seconds": round(wall, 1),
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
