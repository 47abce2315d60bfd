"""The Kafka-free batch core: the learning rule and the list step, written once.

The worker feeds it whole fetched batches with RocksDB-backed state, the offline replay
(``stream-knn evaluate``) and the crash tests' reference feed it plain dicts, so the
offline numbers are the worker's numbers.
"""

from __future__ import annotations

from stream_knn.core.batch import (
    Emission,
    ItemEvents,
    UserBatch,
    learn_item_events,
    learn_user_events,
    merge_item_events,
)

__all__ = [
    "Emission",
    "ItemEvents",
    "UserBatch",
    "learn_item_events",
    "learn_user_events",
    "merge_item_events",
]
