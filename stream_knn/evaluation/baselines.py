"""Reference recommenders for the offline replay: recent popularity and exact item-kNN.

Both learn the same weighted events as the streaming model and never recommend an item the
user has already interacted with in the replay. Ties are broken by catalog order (the order
in which items first appeared in the replay), so results are deterministic.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_knn.errors import ConfigError

__all__ = [
    "DEFAULT_BASELINE_MEMORY_MB",
    "ItemKnnBaseline",
    "PopularityBaseline",
    "Recommender",
    "item_knn_bytes",
    "top_k_indices",
]

#: Memory the exact item-kNN co-occurrence matrix may take by default, MiB.
DEFAULT_BASELINE_MEMORY_MB = 2048

Scores = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]

# Exponent past which decayed popularity counts are rebased, so they never overflow.
_REBASE_EXPONENT = 50.0


class Recommender(Protocol):
    """What the replay needs from a method: learn an event, serve a top-k list.

    ``recommend`` must never return an item ``user_id`` interacted with in an earlier
    ``learn`` call (seen items are excluded for every method, so all compete on new items).
    """

    name: str

    def learn(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> None:
        """Apply one event."""

    def recommend(self, user_id: str, k: int, now_ms: int) -> list[str]:
        """Up to ``k`` item ids, best first, none already seen by ``user_id``."""


def top_k_indices(scores: Scores, k: int) -> Indices:
    """Indices of the ``k`` highest finite scores, best first, ties by lower index.

    Entries set to ``-inf`` (excluded items) are never returned.

    Examples
    --------
    >>> top_k_indices(np.array([0.5, 2.0, -np.inf, 2.0, 1.0]), 3).tolist()
    [1, 3, 4]
    """
    m = scores.shape[0]
    if k <= 0 or m == 0:
        return np.empty(0, dtype=np.int64)
    if k < m:
        kth = np.partition(scores, m - k)[m - k]
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(m, dtype=np.int64)
    order = np.lexsort((candidates, -scores[candidates]))
    top = candidates[order][:k]
    return top[np.isfinite(scores[top])].astype(np.int64)


def item_knn_bytes(n_items: int) -> int:
    """Memory of the dense float64 item-item co-occurrence matrix for ``n_items`` items."""
    return n_items * n_items * 8


class _Catalog:
    """Item ids in order of first appearance, and their dense indices."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, item_id: str) -> int:
        ix = self.index.get(item_id)
        if ix is None:
            ix = len(self.ids)
            self.index[item_id] = ix
            self.ids.append(item_id)
        return ix


class _UserItems:
    """One user's distinct items: dense indices, summed weights, last interaction order."""

    __slots__ = ("items", "last", "n", "slot", "weights")

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}
        self.items = np.empty(8, dtype=np.int64)
        self.weights = np.empty(8, dtype=np.float64)
        self.last = np.empty(8, dtype=np.int64)
        self.n = 0

    def add(self, item: int, weight: float, seq: int) -> float:
        """Add ``weight`` to ``item``; return the item's previous summed weight."""
        slot = self.slot.get(item)
        if slot is None:
            if self.n == self.items.shape[0]:
                size = 2 * self.n
                self.items = np.resize(self.items, size)
                self.weights = np.resize(self.weights, size)
                self.last = np.resize(self.last, size)
            slot = self.n
            self.slot[item] = slot
            self.items[slot] = item
            self.weights[slot] = 0.0
            self.n += 1
        old = float(self.weights[slot])
        self.weights[slot] = old + weight
        self.last[slot] = seq
        return old

    def seen(self) -> Indices:
        return self.items[: self.n]

    def recent(self, limit: int) -> Indices:
        """The ``limit`` items interacted with most recently (all when fewer)."""
        if self.n <= limit:
            return self.items[: self.n]
        newest = np.argpartition(-self.last[: self.n], limit - 1)[:limit]
        return self.items[newest]


class PopularityBaseline:
    """Recent popularity: ``c_i(t) = sum_e w_e * 2**(-(t - t_e) / half_life)``.

    The same decayed, weighted counts as :class:`stream_knn.serving.popularity.Popularity`
    (the serving fallback), with the model's ``half_life_seconds``; the user's seen items
    are excluded.

    Parameters
    ----------
    half_life_seconds : float
        Half-life of an event's contribution, seconds of event time (``inf``: all-time
        counts).
    name : str
        The method's name in a replay.
    """

    def __init__(self, half_life_seconds: float, name: str = "popularity") -> None:
        self.name = name
        self._rate = math.log(2) / (half_life_seconds * 1000.0)
        self._catalog = _Catalog()
        self._counts = np.zeros(1024, dtype=np.float64)
        self._ref_ms: int | None = None
        self._users: dict[str, _UserItems] = {}
        self._seq = 0

    def learn(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> None:
        ix = self._catalog.add(item_id)
        if ix >= self._counts.shape[0]:
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        # Store w * exp(rate * (t - ref)): later events weigh more; ranking ignores the scale.
        exponent = self._rate * (ts_ms - self._ref_ms)
        if exponent > _REBASE_EXPONENT:
            self._counts *= math.exp(-exponent)
            self._ref_ms = ts_ms
            exponent = 0.0
        self._counts[ix] += weight * math.exp(exponent)
        self._seq += 1
        self._users.setdefault(user_id, _UserItems()).add(ix, weight, self._seq)

    def recommend(self, user_id: str, k: int, now_ms: int) -> list[str]:
        scores = self._counts[: len(self._catalog.ids)].copy()
        user = self._users.get(user_id)
        if user is not None:
            scores[user.seen()] = -np.inf
        ids = self._catalog.ids
        return [ids[i] for i in top_k_indices(scores, k).tolist()]


class ItemKnnBaseline:
    """Exact item-kNN over the full weighted co-occurrence counts seen so far.

    Each user-item pair carries ``w_ui``, the sum of the weights of the user's events on
    the item (with the default weights and one rating per pair, the binary 0/1 matrix).
    The co-occurrence ``C = W^T W`` is kept as a dense float64 matrix and updated in
    ``O(items of the user)`` per event. The similarity is the cosine
    ``C_ij / sqrt(C_ii C_jj)``, and a candidate's score is the sum of its similarities to
    the user's ``history_items`` most recently used items; seen items are excluded.

    Parameters
    ----------
    n_items : int
        Distinct items the replay will contain (the matrix is allocated once).
    history_items : int
        Length of the user's history window (the model's ``profile_max_items``).
    memory_budget_mb : float
        Refuse (``ConfigError``) when the matrix would take more than this.
    """

    name = "item_knn"

    def __init__(
        self,
        n_items: int,
        history_items: int,
        memory_budget_mb: float = DEFAULT_BASELINE_MEMORY_MB,
    ) -> None:
        need = item_knn_bytes(n_items)
        if need > memory_budget_mb * 2**20:
            raise ConfigError(
                f"the exact item-kNN baseline needs {need / 2**20:,.0f} MiB for {n_items:,} "
                f"items, over the budget of {memory_budget_mb:,.0f} MiB; raise "
                "--baseline-memory-mb, or evaluate a prefix of the data with --limit"
            )
        self._history = history_items
        self._catalog = _Catalog()
        self._cooc = np.zeros((n_items, n_items), dtype=np.float64)
        self._users: dict[str, _UserItems] = {}
        self._seq = 0

    def learn(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> None:
        ix = self._catalog.add(item_id)
        if ix >= self._cooc.shape[0]:
            raise ConfigError(
                f"item-kNN baseline sized for {self._cooc.shape[0]} items met item "
                f"#{ix + 1} ({item_id!r}); pass the replay's distinct item count"
            )
        user = self._users.setdefault(user_id, _UserItems())
        items = user.seen()
        contrib = weight * user.weights[: user.n]
        slot = user.slot.get(ix)
        if slot is not None:
            contrib[slot] = 0.0
        # Items of one user are distinct, so fancy-index += adds once per item.
        self._cooc[ix, items] += contrib
        self._cooc[items, ix] += contrib
        self._seq += 1
        old = user.add(ix, weight, self._seq)
        self._cooc[ix, ix] += (old + weight) ** 2 - old**2

    def scores(self, user_id: str) -> Scores:
        """Sum-of-cosine scores of every catalog item for ``user_id``; seen items ``-inf``."""
        m = len(self._catalog.ids)
        user = self._users.get(user_id)
        if user is None or user.n == 0:
            return np.zeros(m, dtype=np.float64)
        history = user.recent(self._history)
        norms = np.sqrt(np.diagonal(self._cooc)[:m])
        # An item whose weights sum to 0 co-occurs with nothing (C_ij <= sqrt(C_ii C_jj)).
        norms = np.where(norms > 0, norms, 1.0)
        rows = self._cooc[history, :m] / norms[history, None]
        scores: Scores = rows.sum(axis=0) / norms
        scores[user.seen()] = -np.inf
        return scores

    def recommend(self, user_id: str, k: int, now_ms: int) -> list[str]:
        ids = self._catalog.ids
        return [ids[i] for i in top_k_indices(self.scores(user_id), k).tolist()]
