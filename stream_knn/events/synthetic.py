"""A deterministic synthetic user-event stream with planted cluster structure.

Used by ``stream-knn produce --synthetic``, tests and benchmarks: item ``i<k>`` belongs to
cluster ``k % n_clusters``; each user likes a few clusters and, after ``shift_at`` events,
switches to a disjoint set of clusters, so a model that follows changing tastes is testable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_knn.errors import ConfigError

__all__ = ["EVENT_TYPE_MIX", "SyntheticStream"]

#: Share of each event type in the stream (a typical e-commerce funnel).
EVENT_TYPE_MIX: tuple[tuple[str, float], ...] = (
    ("view", 0.80),
    ("click", 0.12),
    ("add_to_cart", 0.05),
    ("purchase", 0.03),
)

# Large enough to amortise numpy calls, small enough to keep memory flat for long streams.
_CHUNK = 65_536
_EVENT_TYPES = tuple(name for name, _ in EVENT_TYPE_MIX)
_TYPE_CDF = np.cumsum([share for _, share in EVENT_TYPE_MIX])


@dataclass(frozen=True)
class SyntheticStream:
    """A reproducible stream of user events drawn from planted taste clusters.

    Parameters
    ----------
    n_users, n_items : int
        Users ``u0..u{n_users-1}`` and items ``i0..i{n_items-1}``.
    n_clusters : int
        Item ``i<k>`` is in cluster ``k % n_clusters``.
    clusters_per_user : int
        Number of clusters each user likes.
    shift_at : int or None
        Events with index ``>= shift_at`` use every user's shifted tastes, a set of
        clusters disjoint from the original ones (needs ``2 * clusters_per_user <= n_clusters``).
    seed : int
        Same seed, same parameters: the same events, byte for byte.
    start_ms, step_ms : int
        Event ``j`` has ``ts = start_ms + j * step_ms`` (epoch milliseconds).
    noise : float
        Share of events on a random item from a cluster outside the user's current tastes.

    Examples
    --------
    >>> s = SyntheticStream(n_users=10, n_items=20, n_clusters=4, seed=1)
    >>> e = next(s.events(1))
    >>> sorted(e)
    ['event_id', 'event_type', 'item_id', 'ts', 'user_id']
    >>> e["ts"]
    1700000000000
    >>> s.cluster_of("i7")
    3
    """

    n_users: int = 1000
    n_items: int = 500
    n_clusters: int = 10
    clusters_per_user: int = 2
    shift_at: int | None = None
    seed: int = 0
    start_ms: int = 1_700_000_000_000
    step_ms: int = 10
    noise: float = 0.05

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ConfigError(f"synthetic n_users = {self.n_users} is not valid; need >= 1")
        if self.n_clusters < 1:
            raise ConfigError(f"synthetic n_clusters = {self.n_clusters} is not valid; need >= 1")
        if self.n_items < self.n_clusters:
            raise ConfigError(
                f"synthetic n_items = {self.n_items} is not valid; need at least n_clusters "
                f"({self.n_clusters}) so that every cluster has an item"
            )
        if not 1 <= self.clusters_per_user <= self.n_clusters:
            raise ConfigError(
                f"synthetic clusters_per_user = {self.clusters_per_user} is not valid; "
                f"need 1..n_clusters ({self.n_clusters})"
            )
        if self.shift_at is not None and (
            self.shift_at < 0 or 2 * self.clusters_per_user > self.n_clusters
        ):
            raise ConfigError(
                f"synthetic shift_at = {self.shift_at} is not valid; need shift_at >= 0 and "
                f"2 * clusters_per_user ({2 * self.clusters_per_user}) <= n_clusters "
                f"({self.n_clusters}) so shifted tastes are disjoint"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"synthetic noise = {self.noise} is not valid; need 0..1")
        if self.noise > 0 and self.n_clusters == self.clusters_per_user:
            raise ConfigError(
                "synthetic noise > 0 needs a cluster outside every user's tastes; "
                "use n_clusters > clusters_per_user or noise = 0"
            )
        if self.step_ms < 0:
            raise ConfigError(f"synthetic step_ms = {self.step_ms} is not valid; need >= 0")

    @cached_property
    def _orders(self) -> npt.NDArray[np.int64]:
        # One random permutation of clusters per user: the first block is the original
        # tastes, the second block the shifted tastes, so the two are disjoint by design.
        rng = np.random.default_rng([self.seed, 1])
        keys = rng.random((self.n_users, self.n_clusters))
        return np.argsort(keys, axis=1).astype(np.int64)

    @cached_property
    def _item_ids(self) -> list[str]:
        return [f"i{k}" for k in range(self.n_items)]

    @cached_property
    def _user_ids(self) -> list[str]:
        return [f"u{u}" for u in range(self.n_users)]

    def cluster_of(self, item_id: str) -> int:
        """The planted cluster of ``item_id`` (``"i<k>"`` is in cluster ``k % n_clusters``)."""
        return _index_of(item_id, "i", self.n_items) % self.n_clusters

    def tastes(self, user_id: str, shifted: bool = False) -> tuple[int, ...]:
        """The clusters ``user_id`` draws from, before or after the shift, sorted."""
        u = _index_of(user_id, "u", self.n_users)
        c = self.clusters_per_user
        if shifted and 2 * c > self.n_clusters:
            raise ConfigError(
                "shifted tastes need 2 * clusters_per_user <= n_clusters; "
                f"have {c} and {self.n_clusters}"
            )
        block = self._orders[u, c : 2 * c] if shifted else self._orders[u, :c]
        return tuple(sorted(int(x) for x in block))

    def events(self, n: int) -> Iterator[dict[str, Any]]:
        """Yield ``n`` events ``{user_id, item_id, event_type, ts, event_id}`` in time order."""
        if n < 0:
            raise ConfigError(f"number of synthetic events = {n} is not valid; need >= 0")
        rng = np.random.default_rng([self.seed, 2])
        item_ids, user_ids = self._item_ids, self._user_ids
        for start in range(0, n, _CHUNK):
            size = min(_CHUNK, n - start)
            # Always draw whole chunks so that events(n)[:m] == events(m) for m <= n.
            index = np.arange(start, start + _CHUNK, dtype=np.int64)
            users, items, types = (a[:size] for a in self._draw(rng, index))
            ts = (self.start_ms + index[:size] * self.step_ms).tolist()
            rows = zip(users.tolist(), items.tolist(), types.tolist(), strict=True)
            for j, (u, i, t) in enumerate(rows):
                yield {
                    "user_id": user_ids[u],
                    "item_id": item_ids[i],
                    "event_type": _EVENT_TYPES[t],
                    "ts": ts[j],
                    "event_id": f"syn{self.seed}-{start + j}",
                }

    def _draw(
        self, rng: np.random.Generator, index: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        size = index.shape[0]
        n_c, c = self.n_clusters, self.clusters_per_user
        orders = self._orders
        users = np.asarray(rng.integers(0, self.n_users, size=size), dtype=np.int64)
        slot = rng.integers(0, c, size=size)
        shifted = (
            index >= self.shift_at if self.shift_at is not None else np.zeros(size, dtype=bool)
        )
        # Column of the user's cluster order: tastes are [0, c), shifted tastes [c, 2c).
        column = slot + np.where(shifted, c, 0)
        is_noise = rng.random(size) < self.noise
        if n_c > c:
            # Non-taste clusters: columns [c, n_c) before the shift; [0, c) and [2c, n_c) after.
            r = rng.integers(0, n_c - c, size=size)
            noise_column = np.where(shifted, np.where(r < c, r, r + c), r + c)
            column = np.where(is_noise, noise_column, column)
        clusters = orders[users, column]
        # Items of cluster q are q, q + n_c, q + 2 n_c, ... below n_items.
        per_cluster = (self.n_items - clusters + n_c - 1) // n_c
        position = np.floor(rng.random(size) * per_cluster).astype(np.int64)
        items: npt.NDArray[np.int64] = clusters + n_c * position
        types = np.searchsorted(_TYPE_CDF, rng.random(size) * _TYPE_CDF[-1], side="right")
        return users, items, types.astype(np.int64)


def _index_of(identifier: str, prefix: str, bound: int) -> int:
    digits = identifier[len(prefix) :]
    if not identifier.startswith(prefix) or not digits.isdigit() or int(digits) >= bound:
        raise ConfigError(
            f"{identifier!r} is not a synthetic id; expected {prefix}0..{prefix}{bound - 1}"
        )
    return int(digits)
