"""Ranking metrics of a prequential replay: hit rate, NDCG, MRR, coverage and latency.

Every scored event has exactly one relevant item (the one the user interacted with next),
so HR@c is the share of scored events whose item is in the top ``c`` of the list the user
was served, NDCG@c is ``1 / log2(1 + rank)`` for a hit at ``rank <= c`` and 0 otherwise,
and MRR is the reciprocal rank of the hit *within the cutoff* (0 when the item is not in
the top ``c``), i.e. MRR@c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MethodResult", "MethodStats", "merge_stats", "percentile_us"]


@dataclass
class MethodStats:
    """Running tallies of one method over one scored window of a replay.

    Parameters
    ----------
    k : int
        Length of the lists the method served; hit ranks are counted up to ``k``.
    """

    k: int
    #: Number of scored events.
    n_scored: int = 0
    #: ``rank_counts[r]`` = scored events whose item was at rank ``r`` (1-based); index 0
    #: counts misses.
    rank_counts: list[int] = field(default_factory=list)
    #: Distinct items that appeared in any served list.
    recommended: set[str] = field(default_factory=set)
    #: Wall time of each ``recommend`` call, nanoseconds.
    latencies_ns: list[int] = field(default_factory=list)
    #: Wall time spent learning events, nanoseconds.
    learn_ns: int = 0
    #: Events learned while this window was open.
    n_learned: int = 0

    def __post_init__(self) -> None:
        if not self.rank_counts:
            self.rank_counts = [0] * (self.k + 1)

    def record(self, served: list[str], item_id: str, latency_ns: int) -> int:
        """Count one scored event; return the 1-based rank of ``item_id`` (0 for a miss)."""
        self.n_scored += 1
        self.latencies_ns.append(latency_ns)
        self.recommended.update(served)
        try:
            rank = served.index(item_id) + 1
        except ValueError:
            rank = 0
        if rank > self.k:
            rank = 0
        self.rank_counts[rank] += 1
        return rank

    def result(self, cutoff: int, catalog_size: int) -> MethodResult:
        """The metrics at ``cutoff`` (``<= k``) over a catalog of ``catalog_size`` items."""
        cutoff = min(cutoff, self.k)
        n = self.n_scored
        hits = sum(self.rank_counts[1 : cutoff + 1])
        dcg = sum(c / math.log2(1 + r) for r, c in enumerate(self.rank_counts) if 1 <= r <= cutoff)
        rr = sum(c / r for r, c in enumerate(self.rank_counts) if 1 <= r <= cutoff)
        recommend_ns = sum(self.latencies_ns)
        total_s = (recommend_ns + self.learn_ns) / 1e9
        return MethodResult(
            cutoff=cutoff,
            n_scored=n,
            hits=hits,
            hr=hits / n if n else 0.0,
            ndcg=dcg / n if n else 0.0,
            mrr=rr / n if n else 0.0,
            coverage=len(self.recommended) / catalog_size if catalog_size else 0.0,
            p50_us=percentile_us(self.latencies_ns, 50.0),
            p99_us=percentile_us(self.latencies_ns, 99.0),
            events_per_s=self.n_learned / total_s if total_s > 0 else 0.0,
        )


def merge_stats(parts: list[MethodStats]) -> MethodStats:
    """The tallies of consecutive windows as one window over all of them."""
    total = MethodStats(k=parts[0].k)
    for part in parts:
        total.n_scored += part.n_scored
        total.rank_counts = [
            a + b for a, b in zip(total.rank_counts, part.rank_counts, strict=True)
        ]
        total.recommended |= part.recommended
        total.latencies_ns.extend(part.latencies_ns)
        total.learn_ns += part.learn_ns
        total.n_learned += part.n_learned
    return total


@dataclass(frozen=True)
class MethodResult:
    """Metrics of one method at one cutoff.

    ``hr``, ``ndcg`` and ``mrr`` are means over the ``n_scored`` events; ``coverage`` is
    distinct items ever recommended divided by distinct catalog items seen in the replay;
    ``p50_us``/``p99_us`` are per-call ``recommend`` latencies in microseconds and
    ``events_per_s`` counts events learned per second of this method's own learn plus
    recommend time.
    """

    cutoff: int
    n_scored: int
    hits: int
    hr: float
    ndcg: float
    mrr: float
    coverage: float
    p50_us: float
    p99_us: float
    events_per_s: float


def percentile_us(latencies_ns: list[int], q: float) -> float:
    """The ``q``-th percentile of nanosecond latencies, in microseconds (0.0 if empty).

    Examples
    --------
    >>> percentile_us([1000, 2000, 3000], 50.0)
    2.0
    """
    if not latencies_ns:
        return 0.0
    return float(np.percentile(np.asarray(latencies_ns, dtype=np.float64), q)) / 1000.0
