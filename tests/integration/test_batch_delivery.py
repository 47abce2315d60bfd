"""Whole fetched batches on a real broker: committed past every record, tables that know
which changelog offsets they hold.

The worker receives ``user-events`` and its item topic one fetched partition batch at a
time and writes its tables past Faust's per-key path (:mod:`stream_knn.worker.tables`).
A backlog produced before the worker starts arrives in fetches of hundreds of records, so
these checks run on large batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import rocksdict
from confluent_kafka import Consumer, TopicPartition

from stream_knn.events.synthetic import SyntheticStream

pytestmark = pytest.mark.integration

N_EVENTS = 2000
#: Where Faust's RocksDB store keeps the newest changelog offset a partition holds.
_OFFSET_KEY = b"__faust\x00offset__"


def _watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


def _persisted(faust_dir: Path, table: str) -> dict[int, int]:
    """The changelog offset each partition database of ``table`` says it holds."""
    out: dict[int, int] = {}
    for path in faust_dir.rglob(f"{table}-*.db"):
        partition = int(path.name[len(table) + 1 : -len(".db")])
        db = rocksdict.Rdict(
            str(path),
            options=rocksdict.Options(raw_mode=True),
            access_type=rocksdict.AccessType.read_only(),
        )
        try:
            value = db.get(_OFFSET_KEY)
        finally:
            db.close()
        if value is not None:
            out[partition] = int(value)
    return out


def test_a_backlog_is_answered_committed_and_its_changelog_offsets_persisted(
    worker_env: Any, run_worker: Any
) -> None:
    stream = SyntheticStream(n_users=300, n_items=200, n_clusters=8, seed=5)
    events = list(stream.events(N_EVENTS))
    worker_env.produce("user_events", [(e["user_id"].encode(), orjson.dumps(e)) for e in events])
    worker = run_worker()
    recs = worker_env.consume("recommendations", expected=N_EVENTS, timeout_s=120)
    got = {body["event_id"] for _, body in recs}
    assert got == {e["event_id"] for e in events}, worker.log_tail()

    # Every offset of every batch is committed (a batch acknowledges all its records), of
    # the user events and of the item updates they caused (consumed by a second agent,
    # which may still be working through them when the last list arrives).
    for topic in (worker_env.topics["user_events"], f"{worker_env.app_id}-item-updates"):
        ends = {p: end for p, end in _watermarks(worker_env.bootstrap, topic).items() if end}
        assert ends, f"nothing was written to {topic}"
        deadline = time.monotonic() + 60
        committed: dict[int, int] = {}
        while time.monotonic() < deadline:
            committed = _committed(worker_env.bootstrap, worker_env.app_id, topic, list(ends))
            if committed == ends:
                break
            time.sleep(0.5)
        assert committed == ends, (topic, worker.log_tail())

    worker.stop()  # SIGTERM: a clean stop, nothing in flight
    faust_dir = Path(worker_env.data_dir) / "faust"
    for table in ("user-profiles", "item-vectors"):
        changelog = f"{worker_env.app_id}-{table}-changelog"
        written = {p: end for p, end in _watermarks(worker_env.bootstrap, changelog).items() if end}
        assert written, f"nothing was written to {changelog}"
        # Each partition store holds its changelog up to the last record: a restart
        # recovers only what comes after it.
        assert _persisted(faust_dir, table) == {p: end - 1 for p, end in written.items()}

    # A restart on the same stores serves every user's profile at once.
    run_worker()
    for user in sorted({e["user_id"] for e in events})[:20]:
        status, body = worker_env.get(f"/recommendations/{user}")
        assert status == 200, body
        assert not body.get("cold_start"), (user, body)
