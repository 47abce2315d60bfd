"""The benchmark's event load: users drawn uniformly, items by a Zipf popularity.

Every event carries a unique ``event_id`` (``<tag>-<n>``), so a list on the output topic can
be matched to the event that caused it; ``ts`` is the wall time the event is made, in ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from stream_knn.events.synthetic import EVENT_TYPE_MIX

__all__ = ["ZipfEvents"]

_TYPES = tuple(name for name, _ in EVENT_TYPE_MIX)
_TYPE_P = np.array([share for _, share in EVENT_TYPE_MIX]) / sum(s for _, s in EVENT_TYPE_MIX)
_CHUNK = 16_384


class ZipfEvents:
    """Events of ``n_users`` users over ``n_items`` items whose popularity follows Zipf(``s``).

    The item of popularity rank ``r`` (1 = most popular) is drawn with probability
    proportional to ``r ** -s``; ranks are a seeded permutation of ``i0..i{n_items-1}``, so
    popularity does not follow the catalog's cluster of an item (``k % 50``).

    Examples
    --------
    >>> events = ZipfEvents(n_users=100, n_items=50, seed=1, tag="t")
    >>> key, event = events.next_event()
    >>> sorted(event), event["event_id"], key == event["user_id"].encode()
    (['event_id', 'event_type', 'item_id', 'ts', 'user_id'], 't-0', True)
    """

    def __init__(
        self, n_users: int, n_items: int, *, s: float = 1.0, seed: int = 0, tag: str = "ev"
    ) -> None:
        self.n_users, self.n_items, self.s, self.tag = n_users, n_items, s, tag
        self._rng = np.random.default_rng(seed)
        weights = np.arange(1, n_items + 1, dtype=np.float64) ** -s
        self._item_p = weights / weights.sum()
        self._by_rank = self._rng.permutation(n_items)
        self._n = 0
        self._chunk: Iterator[tuple[int, int, int]] = iter(())
        #: Users in the order of their first event (asked in the HTTP phase).
        self.seen_users: dict[str, None] = {}

    def _refill(self) -> Iterator[tuple[int, int, int]]:
        users = self._rng.integers(0, self.n_users, size=_CHUNK)
        ranks = self._rng.choice(self.n_items, size=_CHUNK, p=self._item_p)
        items = self._by_rank[ranks]
        types = self._rng.choice(len(_TYPES), size=_CHUNK, p=_TYPE_P)
        return zip(users.tolist(), items.tolist(), types.tolist(), strict=True)

    def next_event(self) -> tuple[bytes, dict[str, Any]]:
        """The next event (``ts`` = now) and its key, the user id."""
        try:
            u, i, t = next(self._chunk)
        except StopIteration:
            self._chunk = self._refill()
            u, i, t = next(self._chunk)
        user = f"u{u}"
        event = {
            "user_id": user,
            "item_id": f"i{i}",
            "event_type": _TYPES[t],
            "ts": int(time.time() * 1000),
            "event_id": f"{self.tag}-{self._n}",
        }
        self._n += 1
        self.seen_users.setdefault(user, None)
        return user.encode(), event

    def backlog(self, n: int) -> list[tuple[bytes, bytes, str]]:
        """``n`` events serialised ahead of time: (key, value, event id) each."""
        out = []
        for _ in range(n):
            key, event = self.next_event()
            out.append((key, orjson.dumps(event), str(event["event_id"])))
        return out
