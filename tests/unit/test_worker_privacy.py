"""The worker's batch path with pseudonymous user ids: state, item updates and dead
letters under the pseudonym, lists under the id as sent, and a ``forget`` that leaves no
trace of the user in the process (last list, emit gate, deferred profile, cached lists,
tuning samples, pseudonym cache) -- run on a real :class:`WorkerApp` with its Kafka
output and table store replaced by in-memory ones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_knn.config import Config
from stream_knn.embeddings.profile import UserProfile
from stream_knn.events.pseudonym import Pseudonymiser
from stream_knn.events.schema import DLQ_REASONS, EVENT_TYPES
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.recommender import ListRequest
from stream_knn.worker import app as worker_app
from stream_knn.worker.tables import MemoryTable

KEY = "a pseudonym key for the tests"


class FakeOutput:
    """The output producer, kept in a list."""

    def __init__(self, *_: Any) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None]] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None, **_: Any) -> None:
        self.records.append((topic, key, value))

    def send_many(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        for key, value in records:
            self.send(topic, key, value)

    async def flush(self) -> None:
        return None

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        return [(k, v) for t, k, v in self.records if t == topic]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(worker_app, "OutputProducer", FakeOutput)
    config = Config().replace(
        worker__data_dir=tmp_path / "state",
        privacy__pseudonymise_user_ids=True,
        privacy__pseudonym_key=KEY,
        serving__emit_interval_seconds=60.0,  # a second event within a minute is deferred
        events__dlq_raw="none",
    )
    w = worker_app.WorkerApp(config)
    w.profile_store = MemoryTable()
    return w


def _messages(topic: str, values: list[tuple[bytes, dict[str, Any] | bytes]]) -> list[Any]:
    records = [
        SimpleNamespace(
            topic=topic,
            partition=0,
            offset=offset,
            key=key,
            value=value if isinstance(value, bytes) else orjson.dumps(value),
            timestamp=1_700_000_000_000 + offset,
        )
        for offset, (key, value) in enumerate(values)
    ]
    return [SimpleNamespace(topic=topic, partition=0, records=records)]


def test_state_under_pseudonyms_lists_under_the_id_as_sent_and_forget_leaves_nothing(
    worker: Any,
) -> None:
    topic = worker.user_events.get_topic_name()
    pseudonym = Pseudonymiser(KEY.encode()).pseudonym("u1")
    view = {"user_id": "u1", "event_type": "view"}
    asyncio.run(
        worker._user_batch(
            _messages(
                topic, [(b"u1", {**view, "item_id": "i1"}), (b"u1", {**view, "item_id": "i2"})]
            )
        )
    )
    out: FakeOutput = worker.output
    # The list goes out under the id the producer sent; nothing else holds it.
    (key, value), *_ = out.on(worker.recommendations_topic)
    assert key == b"u1" and orjson.loads(value or b"")["user_id"] == "u1"
    updates = out.on(worker.item_updates.get_topic_name())
    assert updates and all(
        b"u1" not in (v or b"") and pseudonym.encode() in (v or b"") for _, v in updates
    )
    assert list(worker.profile_store.data[0]) == [pseudonym.encode()]
    # The process keeps the user under its pseudonym: last list, gate, deferred profile.
    assert pseudonym in worker.last_lists and "u1" not in worker.last_lists
    assert worker.gate.holds(pseudonym) and pseudonym in worker.latest_profiles
    assert "u1" in worker.pseudonymiser
    # A cached list and a pending self-tuning sample of the user.
    profile = UserProfile.from_bytes(worker.profile_store.data[0][pseudonym.encode()])
    now = 1_700_000_001_000
    worker.service.recommend(pseudonym, profile, 5, now)
    worker.service.recommend(pseudonym, profile, 5, now)
    assert worker.service.cache.hits == 1
    worker.service.shadow_score([(ListRequest(pseudonym, profile, (), now), "i9")], now)
    assert worker.service._shadow

    asyncio.run(
        worker._user_batch(_messages(topic, [(b"u1", {"user_id": "u1", "event_type": "forget"})]))
    )

    assert worker.profile_store.data[0] == {}
    assert pseudonym not in worker.last_lists
    assert not worker.gate.holds(pseudonym) and pseudonym not in worker.latest_profiles
    assert worker.service.cache.discard_where(lambda k: pseudonym in k) == 0  # none left
    assert not worker.service._shadow
    assert "u1" not in worker.pseudonymiser


def test_dead_letters_keyed_by_pseudonym_and_redacted(worker: Any) -> None:
    topic = worker.user_events.get_topic_name()
    bad = b'{"user_id": "u2", "item_id": "   ", "event_type": "view"}'
    asyncio.run(worker._user_batch(_messages(topic, [(b"u2", bad)])))
    ((key, value),) = worker.output.on(worker.dlq_topic)
    pseudonym = Pseudonymiser(KEY.encode()).pseudonym("u2")
    assert key == pseudonym.encode()
    letter = orjson.loads(value or b"")
    assert (letter["reason"], letter["key"], letter["raw"]) == ("empty_id", pseudonym, None)
    assert (letter["raw_bytes"], letter["raw_truncated"]) == (len(bad), True)
    assert b"u2" not in (value or b"")


def test_counters_with_known_labels_start_at_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry, ["control", "treatment"])
    text = generate_latest(registry).decode()
    for reason in DLQ_REASONS:
        assert f'stream_knn_dlq_total{{reason="{reason}"}} 0.0' in text
    for event_type in EVENT_TYPES:
        assert f'stream_knn_events_total{{event_type="{event_type}",outcome="ok"}} 0.0' in text
    assert 'stream_knn_events_total{event_type="invalid",outcome="dlq"} 0.0' in text
    for outcome in ("upsert", "delete", "dlq", "empty"):
        assert f'stream_knn_catalog_records_total{{outcome="{outcome}"}} 0.0' in text
    for variant in ("control", "treatment"):
        for trigger in ("event", "request", "http"):
            assert (
                f'stream_knn_recommendations_total{{trigger="{trigger}",variant="{variant}"}} 0.0'
                in text
            )
