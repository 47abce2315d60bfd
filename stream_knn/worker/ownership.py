"""Which input partition each user with per-process state came from.

The worker keeps some state per user outside its tables (the coalescing gate, the deferred
profile, the last list): it is only right while the worker owns the user's partition.
:class:`UserPartitions` remembers the partition of each such user, noted once per chunk of
events, so that a rebalance can drop exactly the users of the partitions that moved away.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

__all__ = ["UserPartitions"]


class UserPartitions:
    """User -> input partition, for the users a worker keeps process state for.

    Parameters
    ----------
    has_state
        Whether the worker still keeps state for a user; users without any are forgotten
        when the map is compacted.
    min_compact
        The map is compacted when it holds more than twice as many users as it kept at the
        last compaction, and at least this many.

    Examples
    --------
    >>> users = UserPartitions(has_state=lambda user: True)
    >>> users.note({"u1": 0, "u2": 1, "u3": 0})
    >>> sorted(users.drop_except({1}))
    ['u1', 'u3']
    >>> users.drop_except({1})
    []
    >>> users.partition("u2")
    1
    """

    def __init__(self, has_state: Callable[[str], bool], min_compact: int = 100_000) -> None:
        self._has_state = has_state
        self._of: dict[str, int] = {}
        self._limit = min_compact
        self._min_compact = min_compact

    def note(self, partition_of: Mapping[str, int]) -> None:
        """Record the partitions of a chunk's users (one dict update per chunk)."""
        self._of.update(partition_of)
        if len(self._of) > self._limit:
            self._compact()

    def partition(self, user_id: str) -> int | None:
        return self._of.get(user_id)

    def drop_except(self, kept: Collection[int]) -> list[str]:
        """Forget and return the users of every partition but those in ``kept``."""
        keep = set(kept)
        gone = [user for user, p in self._of.items() if p not in keep]
        for user in gone:
            del self._of[user]
        return gone

    def __len__(self) -> int:
        return len(self._of)

    def _compact(self) -> None:
        has_state = self._has_state
        self._of = {user: p for user, p in self._of.items() if has_state(user)}
        self._limit = max(self._min_compact, 2 * len(self._of))
