"""Coalescing of emissions: at most one list per user per interval, the latest state wins.

Under a burst from one user the first event is answered at once; later events inside the
interval only mark the user as pending (keeping the newest trigger), and the pending user
gets one list, computed from the newest state, when the interval has passed. Nothing is
lost at the end of a burst: every pending user is flushed by :meth:`EmitGate.due`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["EmitGate"]

T = TypeVar("T")


class EmitGate(Generic[T]):
    """Decides, per user, whether to emit now or defer.

    Parameters
    ----------
    interval_seconds
        Minimum time between two emissions for one user; 0 emits on every event.
    max_users
        Users whose last emission time is remembered (older ones are forgotten, which at
        worst allows one early emission).

    Examples
    --------
    >>> gate: EmitGate[str] = EmitGate(1.0)
    >>> gate.offer("u1", "e1", now=0.0)   # first event: emit now
    True
    >>> gate.offer("u1", "e2", now=0.3)   # inside the interval: deferred
    False
    >>> gate.offer("u1", "e3", now=0.6)   # still deferred; the newest trigger wins
    False
    >>> gate.due(now=0.9)
    []
    >>> gate.due(now=1.0)
    [('u1', 'e3')]
    """

    def __init__(self, interval_seconds: float, max_users: int = 1_000_000) -> None:
        self.interval = interval_seconds
        self.max_users = max_users
        self._last: OrderedDict[str, float] = OrderedDict()
        self._pending: dict[str, T] = {}

    def offer(self, user_id: str, trigger: T, now: float) -> bool:
        """True if ``user_id`` may be answered now (and records it); else defers ``trigger``."""
        if self.interval <= 0:
            return True
        last = self._last.get(user_id)
        if last is None or now - last >= self.interval:
            self._pending.pop(user_id, None)
            self._mark(user_id, now)
            return True
        self._pending[user_id] = trigger
        return False

    def due(self, now: float) -> list[tuple[str, T]]:
        """Pending users whose interval has passed, with their newest trigger (now emitted)."""
        ready = [
            (user, trigger)
            for user, trigger in self._pending.items()
            if now - self._last.get(user, float("-inf")) >= self.interval
        ]
        for user, _ in ready:
            del self._pending[user]
            self._mark(user, now)
        return ready

    def due_all(self, now: float) -> list[tuple[str, T]]:
        """Every pending user with its newest trigger, interval passed or not (now emitted):
        the flush before a user's partition moves to another worker."""
        ready = list(self._pending.items())
        self._pending.clear()
        for user, _ in ready:
            self._mark(user, now)
        return ready

    def drop(self, user_id: str) -> None:
        """Forget a user (after a forget record)."""
        self._pending.pop(user_id, None)
        self._last.pop(user_id, None)

    def holds(self, user_id: str) -> bool:
        """Whether the gate keeps anything of ``user_id`` (a time or a deferred trigger)."""
        return user_id in self._last or user_id in self._pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _mark(self, user_id: str, now: float) -> None:
        self._last[user_id] = now
        self._last.move_to_end(user_id)
        while len(self._last) > self.max_users:
            self._last.popitem(last=False)  # a pending user stays pending: due() emits it
