"""A bounded LRU cache for recommendation queries, invalidated when the index swaps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["QueryCache"]

V = TypeVar("V")


class QueryCache(Generic[V]):
    """LRU keyed by (query, index version, profile version); counts hits and misses.

    Keys must include the index version and the profile version so that a stale entry can
    never be returned; :meth:`invalidate` also drops everything on an index swap to free
    memory at once.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        try:
            value = self._data[key]
        except KeyError:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: V) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def invalidate(self) -> None:
        self._data.clear()

    def discard_where(self, matches: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key ``matches``; returns how many (one pass over the
        keys: for rare events such as a user's ``forget``)."""
        gone = [key for key in self._data if matches(key)]
        for key in gone:
            del self._data[key]
        return len(gone)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._data)
