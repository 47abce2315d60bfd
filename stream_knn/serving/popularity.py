"""Recent popularity: exponentially decayed event counts per item.

Serves the documented cold-start fallback (a user with no usable history, or no index yet)
and the popularity term of the ``popularity_blend`` weight function.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Collection

__all__ = ["Popularity"]


class Popularity:
    """Decayed counts ``c_i(t) = sum_e w_e * 2**(-(t - t_e) / half_life)``.

    Counts are kept relative to a moving reference time so they never overflow; ranking
    is unaffected by the common scale.
    """

    def __init__(
        self, half_life_seconds: float, max_items: int = 1_000_000, refresh_seconds: float = 0.5
    ) -> None:
        self._rate = math.log(2) / (half_life_seconds * 1000.0)
        self._counts: dict[str, float] = {}
        self._ref_ms: int | None = None
        self._max_items = max_items
        # The ranking is recomputed at most every `refresh_seconds` while counts change:
        # a cold-start answer per event must not sort the whole catalog.
        self._refresh = refresh_seconds
        self._ranked: list[tuple[str, float]] | None = None
        #: The ranking with scores relative to the top item (what :meth:`top` returns).
        self._scaled: list[tuple[str, float]] = []
        self._ranked_at = 0.0
        self._ranked_size = 0
        # With refresh_seconds = 0 (a replay, which must not depend on its own speed) the
        # ranking is recomputed when the counts changed since it was made, not per ask.
        self._ranked_stale = True

    def observe(self, item_id: str, weight: float, ts_ms: int) -> None:
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        # Store w * exp(rate * (t - ref)): later events weigh more, as the decay demands.
        exponent = self._rate * (ts_ms - self._ref_ms)
        if exponent > 50.0:
            self._rebase(ts_ms)
            exponent = 0.0
        self._counts[item_id] = self._counts.get(item_id, 0.0) + weight * math.exp(exponent)
        self._ranked_stale = True
        if len(self._counts) > self._max_items:
            self._evict()

    def set(self, item_id: str, count: float, ts_ms: int) -> None:
        """Replace an item's count with ``count`` as of ``ts_ms`` (e.g. from item state)."""
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = self._rate * (ts_ms - self._ref_ms)
        if exponent > 50.0:
            self._rebase(ts_ms)
            exponent = 0.0
        self._counts[item_id] = count * math.exp(exponent)
        self._ranked_stale = True
        if len(self._counts) > self._max_items:
            self._evict()

    def remove(self, item_id: str) -> None:
        self._counts.pop(item_id, None)
        self._ranked = None  # a deleted item must never be served from the cached ranking
        self._ranked_stale = True

    def score(self, item_id: str) -> float:
        """The item's count relative to the most popular item, in [0, 1]."""
        ranked = self._ranking(1)
        if not ranked:
            return 0.0
        top = ranked[0][1]
        return self._counts.get(item_id, 0.0) / top if top > 0 else 0.0

    def top(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` most popular items not in ``exclude``, scores relative to the top item."""
        self._ranking(k + len(exclude))
        scaled = self._scaled
        if not exclude or k <= 0:
            return scaled[: max(k, 0)]
        # Stop at the k-th kept item: the ranking holds hundreds (one list per cold event).
        out: list[tuple[str, float]] = []
        for pair in scaled:
            if pair[0] not in exclude:
                out.append(pair)
                if len(out) == k:
                    break
        return out

    def _ranking(self, want: int) -> list[tuple[str, float]]:
        """The most popular items, best first, at least ``want`` of them when there are."""
        if not self._counts:
            self._scaled = []
            return []
        now = time.monotonic()
        ranked = self._ranked
        if (
            ranked is None
            or want > self._ranked_size
            or (
                now - self._ranked_at >= self._refresh and (self._refresh > 0 or self._ranked_stale)
            )
            # The ranking held every item and items were added since: a short catalog
            # (the start of a stream) must not serve short lists for half a second.
            or (len(ranked) < self._ranked_size and len(self._counts) != len(ranked))
        ):
            size = max(want, 256)
            ranked = heapq.nlargest(size, self._counts.items(), key=lambda kv: kv[1])
            self._ranked, self._ranked_at, self._ranked_size = ranked, now, size
            self._ranked_stale = False
            top = ranked[0][1] if ranked[0][1] > 0 else 1.0
            self._scaled = [(item, count / top) for item, count in ranked]
        return ranked

    def __len__(self) -> int:
        return len(self._counts)

    def _rebase(self, ts_ms: int) -> None:
        assert self._ref_ms is not None
        factor = math.exp(-self._rate * (ts_ms - self._ref_ms))
        self._counts = {k: v * factor for k, v in self._counts.items() if v * factor > 1e-12}
        self._ref_ms = ts_ms

    def _evict(self) -> None:
        keep = heapq.nlargest(self._max_items * 9 // 10, self._counts.items(), key=lambda kv: kv[1])
        self._counts = dict(keep)
