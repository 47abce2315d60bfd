"""The Prometheus metrics of a stream-knn worker, created on a registry passed in.

Names carry the ``stream_knn_`` prefix and their unit; every label has a bounded set of
values (event types, DLQ reasons, variant names, triggers, partitions of our topics, the
tables, the kept index versions). Counters whose label values are known up front (event
types and outcomes, DLQ reasons, catalog outcomes, variants and triggers) are exported at
0 from the start, so a dashboard or an alert on them sees a healthy worker's zero. The
process's own figures (CPU, memory, file descriptors, garbage collection) come from
prometheus-client's standard collectors, on the same registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from stream_knn.events.schema import DLQ_REASONS, EVENT_TYPES

__all__ = ["BUILD_BUCKETS", "LATENCY_BUCKETS", "TRIGGERS", "Metrics", "observe_many"]

#: What asks for a list: an event, a Kafka request, an HTTP request.
TRIGGERS = ("event", "request", "http")
#: Outcomes of an item-catalog record.
CATALOG_OUTCOMES = ("upsert", "delete", "dlq", "empty")

#: Seconds; fine below 50 ms where the end-to-end target sits.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: Seconds; index builds take from milliseconds (tiny catalogs) to minutes.
BUILD_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, as one update per bucket.

    prometheus-client's histogram takes one value per call (a bucket search and a lock
    each); a batch of a thousand lists is binned here with numpy instead. Uses the
    client's bucket counters (``_buckets``, ``_sum``, ``_upper_bounds``) directly.
    """
    if not len(values):
        return
    bounds = histogram._upper_bounds  # the last one is +Inf
    counts = np.bincount(
        np.searchsorted(bounds, np.asarray(values, dtype=np.float64), side="left"),
        minlength=len(bounds),
    )
    for bucket, n in zip(histogram._buckets, counts.tolist(), strict=False):
        if n:
            bucket.inc(n)
    histogram._sum.inc(float(np.sum(values)))


class Metrics:
    """Every metric the worker exports; one instance per registry.

    ``variants`` are the A/B variant names: their list counters start at 0 too.
    """

    def __init__(self, registry: CollectorRegistry, variants: Iterable[str] = ()) -> None:
        self.registry = registry
        self.events = Counter(
            "stream_knn_events",
            "User events consumed, by event type and outcome (ok, dlq, forget).",
            ["event_type", "outcome"],
            registry=registry,
        )
        self.dlq = Counter(
            "stream_knn_dlq",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.recommendations = Counter(
            "stream_knn_recommendations",
            "Recommendation lists emitted, by variant and trigger (event, request, http).",
            ["variant", "trigger"],
            registry=registry,
        )
        self.catalog = Counter(
            "stream_knn_catalog_records",
            "Item catalog records applied, by outcome (upsert, delete, dlq).",
            ["outcome"],
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "stream_knn_end_to_end_latency_seconds",
            "From the triggering event's timestamp to the emission of its recommendation.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.processing_latency = Histogram(
            "stream_knn_processing_latency_seconds",
            "Time spent by the worker on one event, from dequeue to the output send.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.index_build = Histogram(
            "stream_knn_index_build_seconds",
            "Duration of background index builds.",
            buckets=BUILD_BUCKETS,
            registry=registry,
        )
        self.index_build_errors = Counter(
            "stream_knn_index_build_errors",
            "Index builds that failed (the previous version kept serving).",
            registry=registry,
        )
        self.tuning_hit_rate = Gauge(
            "stream_knn_tuning_hit_rate",
            "Self-tuning: decayed prequential hit rate of each candidate query setting on "
            "the sampled events.",
            ["setting"],
            registry=registry,
        )
        self.tuning_served = Gauge(
            "stream_knn_tuning_served",
            "Self-tuning: 1 for the query setting lists are built with, 0 for the others.",
            ["setting"],
            registry=registry,
        )
        self.tuning_switches = Counter(
            "stream_knn_tuning_switches",
            "Self-tuning: times the served query setting changed.",
            registry=registry,
        )
        self.index_version = Gauge(
            "stream_knn_index_version", "Version number of the live index.", registry=registry
        )
        self.index_items = Gauge(
            "stream_knn_index_items", "Items in the live index.", registry=registry
        )
        self.index_age = Gauge(
            "stream_knn_index_age_seconds",
            "Seconds since the live index was built.",
            registry=registry,
        )
        self.index_pending = Gauge(
            "stream_knn_index_pending_items",
            "Items changed since the live build, searched exactly (the delta).",
            registry=registry,
        )
        self.ann_recall = Gauge(
            "stream_knn_ann_recall",
            "Recall@k of sampled live queries against exact search.",
            registry=registry,
        )
        self.cache_hits = Counter(
            "stream_knn_cache_hits", "Recommendation cache hits.", registry=registry
        )
        self.cache_misses = Counter(
            "stream_knn_cache_misses", "Recommendation cache misses.", registry=registry
        )
        self.cache_hit_ratio = Gauge(
            "stream_knn_cache_hit_ratio",
            "Share of recommendation queries answered from the cache.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "stream_knn_consumer_lag",
            "Messages between the worker's position and the end of each input partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.online_hit_rate = Gauge(
            "stream_knn_online_hit_rate",
            "Share of user events whose item was in the last list sent to that user.",
            ["variant"],
            registry=registry,
        )
        self.embedding_drift = Gauge(
            "stream_knn_embedding_drift",
            "Embedding drift between consecutive index versions "
            "(kind: item_cosine_shift, centroid_shift).",
            ["kind"],
            registry=registry,
        )
        self.neighbour_drift = Gauge(
            "stream_knn_neighbour_drift",
            "1 - mean Jaccard of probe items' top-k between consecutive index versions.",
            registry=registry,
        )
        self.input_drift = Gauge(
            "stream_knn_input_drift",
            "Jensen-Shannon divergence of the current input window against the reference "
            "(distribution: item_popularity, event_type).",
            ["distribution"],
            registry=registry,
        )
        self.items = Gauge(
            "stream_knn_items", "Item vectors known to this worker.", registry=registry
        )
        self.consumer_lag_seconds = Gauge(
            "stream_knn_consumer_lag_seconds",
            "Age of the last record consumed from each input partition that has a lag "
            "(0 when caught up).",
            ["topic", "partition"],
            registry=registry,
        )
        self.replica_lag = Gauge(
            "stream_knn_replica_lag",
            "Item-vector changelog records not yet read by this worker's replica.",
            registry=registry,
        )
        self.table_disk_bytes = Gauge(
            "stream_knn_table_disk_bytes",
            "Bytes on disk of each RocksDB table (all its partitions on this worker).",
            ["table"],
            registry=registry,
        )
        self.index_disk_bytes = Gauge(
            "stream_knn_index_disk_bytes",
            "Bytes on disk of each saved index version (index: the setting's directory).",
            ["index", "version"],
            registry=registry,
        )
        self.index_memory_bytes = Gauge(
            "stream_knn_index_memory_bytes",
            "Memory of the index managers: mapped (the live versions' memory-mapped "
            "files), vectors (the item vectors they hold in RAM).",
            ["kind"],
            registry=registry,
        )
        for event_type in sorted(EVENT_TYPES):
            self.events.labels(event_type, "ok")
        self.events.labels("invalid", "dlq")
        for reason in DLQ_REASONS:
            self.dlq.labels(reason)
        for outcome in CATALOG_OUTCOMES:
            self.catalog.labels(outcome)
        for variant in variants:
            for trigger in TRIGGERS:
                self.recommendations.labels(variant, trigger)
        # The process itself: process_* (CPU, resident memory, open file descriptors),
        # python_info and python_gc_* (collections, collected and uncollectable objects).
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
