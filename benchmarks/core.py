"""The learning core without Kafka: sketch update + profile add with the worker's bytes codec."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stream_knn.config import Config
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState, RandomIndexing
from stream_knn.events.synthetic import SyntheticStream

__all__ = ["bench_core"]


def bench_core(n_events: int, n_users: int, n_items: int) -> dict[str, Any]:
    """Events/s of the worker's per-event state work and the stored bytes per item and user.

    Per event, as the worker does: decode the user's profile, ``UserProfile.add``, encode it;
    decode the item's state, ``RandomIndexing.update``, encode it. Tables are plain dicts, so
    this is the ceiling of the core, not of RocksDB.
    """
    config = Config()
    m = config.model
    sketch = RandomIndexing(m.sketch_dims, m.seed, m.half_life_seconds)
    stream = SyntheticStream(n_users=n_users, n_items=n_items, n_clusters=50, seed=7)
    events = [
        (e["user_id"], e["item_id"], e["event_type"], e["ts"]) for e in stream.events(n_events)
    ]
    weights = {t: config.events.weight_of(t) for t in ("view", "click", "add_to_cart", "purchase")}
    profiles: dict[str, bytes] = {}
    items: dict[str, bytes] = {}
    started = time.perf_counter()
    for user_id, item_id, event_type, ts in events:
        weight = weights[event_type]
        raw = profiles.get(user_id)
        profile = UserProfile.from_bytes(raw) if raw else UserProfile()
        profile = profile.add(item_id, ts, weight, m.profile_max_items, m.profile_half_life_seconds)
        profiles[user_id] = profile.to_bytes()
        raw_item = items.get(item_id)
        state = ItemState.from_bytes(raw_item, m.sketch_dims) if raw_item else None
        items[item_id] = sketch.update(state, user_id, weight, ts).to_bytes()
    seconds = time.perf_counter() - started
    item_bytes = float(np.mean([len(v) for v in items.values()]))
    user_bytes = float(np.mean([len(v) for v in profiles.values()]))
    full = UserProfile()
    for j in range(m.profile_max_items):
        full = full.add(f"i{100_000 + j}", 1_700_000_000_000 + j, 1.0, m.profile_max_items)
    full_user_bytes = len(full.to_bytes())
    return {
        "events": n_events,
        "seconds": round(seconds, 3),
        "events_per_second": round(n_events / seconds),
        "us_per_event": round(1e6 * seconds / n_events, 1),
        "bytes_per_item": round(item_bytes, 1),
        "bytes_per_user_mean": round(user_bytes, 1),
        "bytes_per_user_full_profile": full_user_bytes,
        "mean_profile_items": round(n_events / max(1, len(profiles)), 1),
        "mib_per_million_items": round(item_bytes * 1e6 / 2**20, 1),
        "mib_per_million_users_full_profile": round(full_user_bytes * 1e6 / 2**20, 1),
        "index_vector_mib_per_million_items": round(4 * m.dims * 1e6 / 2**20, 1),
        "note": "serialised state only (RocksDB and changelog overheads not included)",
    }
