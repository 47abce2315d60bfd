"""A small in-process ring of metric samples: rates and latency percentiles over the last
minutes, for the worker's dashboard page and ``stream-knn status`` (no Prometheus needed).

Plain Python over prometheus-client's registry: :func:`read_registry` flattens what a
scrape would show; :class:`MetricHistory` keeps a bounded ring of totals and histogram
bucket counts and derives per-second rates and quantiles from differences between samples,
as PromQL's ``rate`` and ``histogram_quantile`` do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

__all__ = [
    "MetricHistory",
    "Sample",
    "Snapshot",
    "histogram_quantile",
    "read_registry",
    "series_key",
]

#: One scrape: ``series_key(name, labels)`` -> value.
Snapshot = dict[str, float]


def series_key(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The series as the exposition format writes it: ``name{a="x",b="y"}`` (labels in
    name order, as prometheus-client writes them), or the bare name."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def read_registry(registry: CollectorRegistry) -> Snapshot:
    """Every sample of ``registry`` (what ``/metrics`` would show right now), by series."""
    out: Snapshot = {}
    for family in registry.collect():
        for sample in family.samples:
            out[series_key(sample.name, sample.labels)] = float(sample.value)
    return out


def histogram_quantile(
    q: float, bounds: Sequence[float], cumulative: Sequence[float]
) -> float | None:
    """The ``q`` quantile of a histogram as PromQL's ``histogram_quantile`` estimates it.

    ``bounds`` are the buckets' upper bounds (the last one ``+Inf``) and ``cumulative``
    their cumulative counts. Linear interpolation inside the bucket holding the rank; a
    rank in the ``+Inf`` bucket gives the highest finite bound. None without observations.

    >>> histogram_quantile(0.5, [0.01, 0.02, math.inf], [0, 10, 10])
    0.015
    >>> histogram_quantile(0.99, [0.01, 0.02, math.inf], [10, 10, 20])
    0.02
    """
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Sample:
    """One point of the ring: when, named values (counter totals and a few gauges),
    cumulative bucket counts."""

    at: float
    totals: Mapping[str, float]
    buckets: tuple[float, ...]


class MetricHistory:
    """A ring of at most ``max_samples`` samples of named totals and one histogram.

    Parameters
    ----------
    bounds
        The histogram's bucket upper bounds, ``+Inf`` last (``Histogram._upper_bounds``).
    max_samples
        Samples kept; with one every ``interval`` seconds this is the chart's span.
    """

    def __init__(self, bounds: Sequence[float], max_samples: int = 300) -> None:
        self.bounds = tuple(bounds)
        self.samples: deque[Sample] = deque(maxlen=max_samples)

    def record(self, at: float, totals: Mapping[str, float], buckets: Sequence[float]) -> None:
        """Add a sample; ``buckets`` are the histogram's cumulative counts (same length as
        ``bounds``)."""
        if len(buckets) != len(self.bounds):
            raise ValueError(f"got {len(buckets)} bucket counts for {len(self.bounds)} bounds")
        self.samples.append(Sample(at, dict(totals), tuple(buckets)))

    def _pairs(self, window: float) -> Iterable[tuple[Sample, Sample]]:
        """Each sample with the newest one at least ``window`` seconds older."""
        samples = list(self.samples)
        start = 0
        for new in samples[1:]:
            while start + 1 < len(samples) and new.at - samples[start + 1].at >= window:
                start += 1
            old = samples[start]
            if old is not new and new.at > old.at:
                yield old, new

    def _latest_pair(self, window: float) -> tuple[Sample, Sample] | None:
        if len(self.samples) < 2:
            return None
        new = self.samples[-1]
        old = self.samples[0]
        for sample in reversed(self.samples):
            if new.at - sample.at >= window:
                old = sample
                break
        return (old, new) if new.at > old.at else None

    @staticmethod
    def _rate(old: Sample, new: Sample, name: str) -> float:
        # A counter that went down was reset (a restart): count from zero, as rate() does.
        before, after = old.totals.get(name, 0.0), new.totals.get(name, 0.0)
        delta = after - before if after >= before else after
        return delta / (new.at - old.at)

    def rate(self, name: str, window: float = 10.0) -> float | None:
        """Per-second increase of total ``name`` over about the last ``window`` seconds."""
        pair = self._latest_pair(window)
        return None if pair is None else self._rate(pair[0], pair[1], name)

    def rate_series(self, name: str, window: float = 10.0) -> list[tuple[float, float]]:
        """``(time, per-second rate over the preceding window)`` for each sample."""
        return [(new.at, self._rate(old, new, name)) for old, new in self._pairs(window)]

    def value_series(self, name: str) -> list[tuple[float, float]]:
        """``(time, value)`` of ``name`` as recorded (for gauges kept in the ring)."""
        return [(s.at, s.totals[name]) for s in self.samples if name in s.totals]

    def _quantile(self, old: Sample, new: Sample, q: float) -> float | None:
        delta = [b - a for a, b in zip(old.buckets, new.buckets, strict=True)]
        if any(d < 0 for d in delta):  # reset
            delta = list(new.buckets)
        return histogram_quantile(q, self.bounds, delta)

    def quantile(self, q: float, window: float = 60.0) -> float | None:
        """The ``q`` quantile of the observations of about the last ``window`` seconds."""
        pair = self._latest_pair(window)
        return None if pair is None else self._quantile(pair[0], pair[1], q)

    def quantile_series(self, q: float, window: float = 10.0) -> list[tuple[float, float]]:
        """``(time, q quantile over the preceding window)`` where there were observations."""
        out = []
        for old, new in self._pairs(window):
            value = self._quantile(old, new, q)
            if value is not None:
                out.append((new.at, value))
        return out
