"""Several real workers on one consumer group, through rebalances: two split the partitions,
a third joins mid-stream, one is killed with ``kill -9`` mid-stream. Every event of a stream
of single-event users gets its list, no list comes from a worker that did not own the
user's partition at that moment, and every worker answers HTTP for users of every
partition, with the list of the partition's owner."""

from __future__ import annotations

import bisect
import dataclasses
import re
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_knn.worker.app import item_partition
from tests.integration.conftest import WorkerEnv, WorkerProcess, free_port

pytestmark = pytest.mark.integration

_USERS = 1800
_RATE = 60  # events/s: the stream lasts 30 s
#: Of the test's input topics: with 6, three workers get 2 each (with 4, Faust's sticky
#: assignor leaves a third worker idle: 2 + 2 + 0 is within its capacity of 2).
_PARTITIONS = 6
_OWNERSHIP = re.compile(rb"ownership: user-events partitions \[([\d, ]*)\] from ([\d.]+)")


class _Lists(threading.Thread):
    """Collects the ``recommendations`` records as they come."""

    def __init__(self, env: WorkerEnv) -> None:
        super().__init__(name="lists", daemon=True)
        self.env = env
        self.records: list[dict] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.env.bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([self.env.topics["recommendations"]])
        try:
            while not self.stopping.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if not msg.error():
                        self.records.append(orjson.loads(msg.value()))
        finally:
            consumer.close()

    def events(self) -> set[str]:
        return {r["event_id"] for r in list(self.records) if r.get("trigger") == "event"}


def _ownership(log: Path) -> tuple[list[float], list[set[int]]]:
    """When each of a worker's ownership changes began, and the partitions it owned."""
    starts: list[float] = []
    owned: list[set[int]] = []
    for match in _OWNERSHIP.finditer(log.read_bytes()):
        numbers, at = match.groups()
        starts.append(float(at))
        owned.append({int(n) for n in numbers.split(b",") if n.strip()})
    return starts, owned


def _owned_at(history: tuple[list[float], list[set[int]]], at: float) -> set[int]:
    starts, owned = history
    i = bisect.bisect_right(starts, at)
    return owned[i - 1] if i else set()


def _wait(condition, timeout_s: float, what: str, logs: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}:\n" + "\n---\n".join(w.log_tail(30) for w in logs))
        time.sleep(0.2)


def test_workers_joining_and_dying_mid_stream_lose_no_list_and_never_emit_for_others(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    worker_env = WorkerEnv(kafka_bootstrap, tmp_path / "state")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created = admin.create_topics(
        [NewTopic(name, num_partitions=_PARTITIONS) for name in worker_env.topics.values()]
    )
    for future in created.values():
        future.result(timeout=30)
    worker_env.extra.update(
        {
            "STREAM_KNN_WORKER__PARTITIONS": str(_PARTITIONS),
            # A dead member's partitions move on after this; kept short for the test.
            "STREAM_KNN_WORKER__SESSION_TIMEOUT_SECONDS": "6",
            "STREAM_KNN_WORKER__HEARTBEAT_INTERVAL_SECONDS": "0.5",
        }
    )
    envs = [worker_env] + [
        dataclasses.replace(worker_env, web_port=free_port(), data_dir=tmp_path / f"state-{n}")
        for n in (1, 2)
    ]
    workers = [WorkerProcess(env, tmp_path / f"worker-{n}.log") for n, env in enumerate(envs)]
    lists = _Lists(worker_env)
    lists.start()
    feeder = None
    try:
        for worker in workers[:2]:
            worker.start(wait_ready=False)
        for worker in workers[:2]:
            worker.wait_ready()
        records = [
            (
                f"user-{n}".encode(),
                orjson.dumps(
                    {
                        "user_id": f"user-{n}",
                        "item_id": f"item-{n % 50}",
                        "event_type": "view",
                        "event_id": f"event-{n}",
                    }
                ),
            )
            for n in range(_USERS)
        ]
        feeder = worker_env.feed("user_events", records, rate=_RATE)
        _wait(lambda: len(lists.events()) >= _USERS // 4, 120, "no lists", workers)
        workers[2].start()  # joins mid-stream
        _wait(
            lambda: (
                bool(_ownership(workers[2].log_path)[1])
                and bool(_ownership(workers[2].log_path)[1][-1])
            ),
            120,
            "the third worker was given no user-events partition",
            workers,
        )
        _wait(lambda: len(lists.events()) >= _USERS // 2, 120, "lists stopped", workers)
        workers[1].stop(kill=True)  # kill -9 mid-stream
        wanted = {f"event-{n}" for n in range(_USERS)}
        _wait(
            lambda: lists.events() >= wanted,
            150,
            f"lists missing: {len(wanted - lists.events())}",
            workers,
        )
        feeder.join(60)
        assert not feeder.errors

        # No list from a worker that did not own the user's partition when it was sent
        # (an emission at ms e happened in [e, e + 1 ms)).
        by_worker = {f"{w.env.web_port}": _ownership(w.log_path) for w in workers}
        emitters: set[str] = set()
        for record in list(lists.records):
            port = record["worker"].rsplit(":", 1)[1]
            emitters.add(port)
            partition = item_partition(record["user_id"], _PARTITIONS)
            at = record["emitted_ts"] / 1000.0
            history = by_worker[port]
            assert partition in _owned_at(history, at) | _owned_at(history, at + 0.001), (
                record,
                history,
            )
        assert emitters == set(by_worker), emitters  # all three worked

        # Every live worker answers for users of every partition, with the owner's list.
        users_of = {item_partition(f"user-{n}", _PARTITIONS): f"user-{n}" for n in range(200)}
        assert sorted(users_of) == list(range(_PARTITIONS))
        live = [workers[0], workers[2]]
        owner_of = {
            p: next(w for w in live if p in _ownership(w.log_path)[1][-1])
            for p in range(_PARTITIONS)
        }
        for worker in live:
            for partition, user in sorted(users_of.items()):
                status, body = worker.env.get(f"/recommendations/{user}")
                assert status == 200, (worker.env.web_port, body)
                assert body["worker"].endswith(f":{owner_of[partition].env.web_port}"), body
                assert body["user_id"] == user
    finally:
        if feeder is not None:
            feeder.stop()
        lists.stopping.set()
        for worker in workers:
            worker.stop()
        lists.join(10)
