"""Item states of another width in the changelog (an older layout) do not stop a worker."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_knn.embeddings.sketch import ItemState

pytestmark = pytest.mark.integration

ITEMS = [f"i{n}" for n in range(10)]


def _seed_old_states(env: Any) -> None:
    """The item-vectors changelog as a release with 64-wide states left it."""
    topic = f"{env.app_id}-item-vectors-changelog"
    admin = AdminClient({"bootstrap.servers": env.bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(
                topic, num_partitions=4, replication_factor=1, config={"cleanup.policy": "compact"}
            )
        ]
    )
    for future in futures.values():
        future.result(30)
    producer = Producer({"bootstrap.servers": env.bootstrap, "partitioner": "murmur2_random"})
    rng = np.random.default_rng(1)
    for item in ITEMS:
        old = ItemState(rng.normal(size=64).astype(np.float32), 1_700_000_000_000, 3, 2.0)
        producer.produce(topic, key=item.encode(), value=old.to_bytes())
    assert producer.flush(30) == 0


def test_a_worker_replaces_item_states_of_another_width(worker_env: Any, run_worker: Any) -> None:
    _seed_old_states(worker_env)
    worker = run_worker()
    events = [
        {"user_id": f"u{n % 6}", "item_id": ITEMS[n % len(ITEMS)], "event_type": "click"}
        for n in range(60)
    ]
    worker_env.produce("user_events", [(e["user_id"].encode(), orjson.dumps(e)) for e in events])
    # The worker keeps serving, one list per event...
    assert len(worker_env.consume("recommendations", expected=len(events))) == len(events)
    # ...and every item is learned afresh in the configured width and indexed again.
    deadline = time.monotonic() + 60
    body: Any = None
    while time.monotonic() < deadline:
        status, body = worker_env.get("/index")
        if status == 200 and body["replicated_items"] == len(ITEMS):
            break
        time.sleep(0.5)
    assert body is not None and body["replicated_items"] == len(ITEMS), body
    log = worker.log_path.read_text(errors="replace")
    assert "is learned afresh" in log
    assert "model.sketch_dims" in log
