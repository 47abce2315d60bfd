"""One batch of user events -> new profiles, item updates, item states and the lists to send.

The learning rule of stream-knn, written once:

1. each event adds its item to the user's profile (:meth:`UserProfile.add`: bounded,
   repeated items decayed and accumulated), in arrival order; a ``forget`` event deletes
   the profile;
2. the events are regrouped by item (``users, weights, times`` per item: the item updates
   the worker re-keys onto its item topic);
3. each item's events are applied to its sketch state in one step
   (:meth:`RandomIndexing.update_many`, order-independent);
4. every learned event may get a list, built from the profile as it stood right after that
   event, without the event's own item (:meth:`RecommendationService.recommend_many`).

Plain Python and numpy over mappings: the worker passes what it read from RocksDB, the
replay and the tests pass dicts.

Examples
--------
>>> from stream_knn.config import ModelConfig
>>> from stream_knn.events.schema import UserEvent
>>> ev = lambda u, i, t: UserEvent(u, i, "view", t, 1.0, f"{u}-{t}", None, None)
>>> batch = learn_user_events([ev("u1", "a", 0), ev("u1", "b", 5), ev("u2", "a", 7)], {},
...                           ModelConfig())
>>> [item for item, _, _ in batch.profiles["u1"].items]
['a', 'b']
>>> batch.item_events["a"]
(['u1', 'u2'], [1.0, 1.0], [0, 7])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stream_knn.config import ModelConfig
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState, RandomIndexing, activity_weight
from stream_knn.events.schema import UserEvent

__all__ = [
    "Emission",
    "ItemEvents",
    "UserBatch",
    "learn_item_events",
    "learn_user_events",
    "merge_item_events",
]

#: The events of one item: parallel lists of user ids, weights and event times (epoch ms).
ItemEvents = tuple[list[str], list[float], list[int]]

_EMPTY = UserProfile()


@dataclass(frozen=True, slots=True)
class Emission:
    """A learned event, the user's profile right after it (what its list is built from)
    and the event's position in the batch given to :func:`learn_user_events`."""

    event: UserEvent
    profile: UserProfile
    index: int


@dataclass
class UserBatch:
    """What one batch of user events changes.

    Attributes
    ----------
    profiles
        The new profile of every user the batch touched; ``None`` for a user whose profile
        is deleted (a ``forget`` event, not followed by a learned one).
    item_events
        Per item, the batch's events on it, in arrival order.
    emissions
        One per learned event, in arrival order.
    forgotten
        Users whose ``forget`` event the batch holds (their process state is dropped too).
    """

    profiles: dict[str, UserProfile | None] = field(default_factory=dict)
    item_events: dict[str, ItemEvents] = field(default_factory=dict)
    emissions: list[Emission] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


def learn_user_events(
    events: Iterable[UserEvent],
    stored: Mapping[str, UserProfile | None],
    model: ModelConfig,
    *,
    activity_weighting: bool = False,
) -> UserBatch:
    """Apply ``events`` to the users' profiles and regroup them by item.

    Parameters
    ----------
    events
        Validated events, in arrival order.
    stored
        The stored profile of (at least) every user in ``events``; a missing key or
        ``None`` is a user without one.
    model
        ``profile_max_items`` and ``profile_half_life_seconds`` are read.
    activity_weighting
        Scale each event's item weight by :func:`activity_weight` of the user's event
        count (the profile's version after the event).

    Returns
    -------
    UserBatch
    """
    cap, half_life = model.profile_max_items, model.profile_half_life_seconds
    out = UserBatch()
    profiles = out.profiles
    item_events = out.item_events
    emissions = out.emissions
    for position, ev in enumerate(events):
        user = ev.user_id
        if ev.event_type == "forget" or ev.item_id is None:
            profiles[user] = None
            out.forgotten.append(user)
            continue
        current = profiles[user] if user in profiles else stored.get(user)
        profile = (current or _EMPTY).add(ev.item_id, ev.ts_ms, ev.weight, cap, half_life)
        profiles[user] = profile
        weight = ev.weight * activity_weight(profile.version) if activity_weighting else ev.weight
        found = item_events.get(ev.item_id)
        if found is None:
            item_events[ev.item_id] = ([user], [weight], [ev.ts_ms])
        else:
            found[0].append(user)
            found[1].append(weight)
            found[2].append(ev.ts_ms)
        emissions.append(Emission(ev, profile, position))
    return out


def merge_item_events(into: dict[str, ItemEvents], more: Mapping[str, ItemEvents]) -> None:
    """Append ``more``'s events of each item to ``into`` (in place)."""
    for item_id, (users, weights, times) in more.items():
        found = into.get(item_id)
        if found is None:
            into[item_id] = (list(users), list(weights), list(times))
        else:
            found[0].extend(users)
            found[1].extend(weights)
            found[2].extend(times)


def learn_item_events(
    item_events: Mapping[str, ItemEvents],
    stored: Mapping[str, ItemState | None],
    sketch: RandomIndexing,
) -> dict[str, ItemState]:
    """The new sketch state of every item in ``item_events``.

    Parameters
    ----------
    item_events
        Per item, its events (see :data:`ItemEvents`); each list non-empty.
    stored
        The stored state of the items; a missing key or ``None`` learns the item afresh.
    sketch
        The model's :class:`RandomIndexing`.
    """
    return {
        item_id: sketch.update_many(stored.get(item_id), users, weights, times)
        for item_id, (users, weights, times) in item_events.items()
    }
