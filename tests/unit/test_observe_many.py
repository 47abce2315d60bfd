"""A batch of latencies binned at once counts exactly what one observe per value counts."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream_knn.metrics.registry import LATENCY_BUCKETS, observe_many


def _series(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_one_observe_per_value() -> None:
    rng = np.random.default_rng(3)
    # Values on the bucket bounds themselves, below the first, above the last, and spread.
    values = [*rng.exponential(0.02, 5000).tolist(), *LATENCY_BUCKETS, 0.0, 99.0]
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=one)
    h_many = Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=many)
    for v in values:
        h_one.observe(v)
    observe_many(h_many, values[:2000])
    observe_many(h_many, values[2000:])
    observe_many(h_many, [])
    a, b = _series(one), _series(many)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-12), key
