"""Turns a user's profile into a top-k list: query, search, exclude, score, fall back.

Plain Python over the index manager's search; the worker, the HTTP endpoints, the request
agent and ``stream-knn recommend`` all answer through :class:`Recommender`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_knn.embeddings.profile import UserProfile, query_vectors
from stream_knn.serving.cache import QueryCache
from stream_knn.serving.popularity import Popularity
from stream_knn.serving.tuning import QuerySetting

__all__ = [
    "ListRequest",
    "Recommendation",
    "Recommender",
    "VectorSearch",
    "apply_weight_function",
]

Neighbours = list[tuple[str, float]]


class VectorSearch(Protocol):
    """What the recommender needs of an index manager."""

    @property
    def version(self) -> int | None: ...

    @property
    def change_seq(self) -> int: ...

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours: ...

    def search_many(
        self,
        queries: npt.ArrayLike,
        k: int,
        excludes: Sequence[Collection[str]],
        executor: Executor | None = None,
        threads: int = 1,
    ) -> list[Neighbours]: ...

    def similar(self, item_id: str, k: int) -> Neighbours | None: ...

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None: ...


@dataclass(frozen=True)
class ListRequest:
    """One list wanted from a batch (:meth:`Recommender.for_many`).

    Attributes
    ----------
    user_id
        The user (assigns the A/B variant).
    profile
        The user's profile; ``None`` for an unknown user (the popularity fallback).
    exclude
        Items never to return besides the profile's own (e.g. the item just consumed).
    now_ms
        Time the profile is decayed to, epoch ms; ``None``: the batch's time.
    k
        List length; ``None``: the user's variant's ``k``.
    """

    user_id: str
    profile: UserProfile | None
    exclude: Collection[str] = ()
    now_ms: int | None = None
    k: int | None = None


@dataclass(frozen=True)
class Recommendation:
    """A top-k list and how it was made.

    ``fallback`` names the documented cold-start answer when it was used: ``"popular"``
    (recent popularity, because the user has no usable history or no item is indexed yet).
    """

    items: Neighbours
    index_version: int | None
    fallback: str | None = None


def apply_weight_function(
    neighbours: Neighbours,
    function: str,
    metric: str,
    popularity: Popularity | None = None,
    popularity_weight: float = 0.0,
) -> Neighbours:
    """Re-score search results (higher-is-nearer scores) and re-rank them.

    - ``similarity``: the index score itself (cosine for ``angular``, dot for ``dot``,
      negated distance for ``euclidean``/``manhattan``);
    - ``distance``: ``1 / (1 + d)`` with ``d`` the metric's distance (for ``angular``
      ``d = sqrt(2 - 2 cos)``, Annoy's angular distance);
    - ``popularity_blend``: ``(1 - a) * similarity_rank_score + a * popularity`` where the
      similarity term is min-max scaled over the candidates and popularity is relative
      to the most popular item, ``a = popularity_weight``.
    """
    if function == "similarity" or not neighbours:
        return neighbours
    if function == "distance":
        rescored = [(item, 1.0 / (1.0 + _distance(score, metric))) for item, score in neighbours]
    elif function == "popularity_blend":
        scores = [s for _, s in neighbours]
        lo, hi = min(scores), max(scores)
        span = hi - lo if hi > lo else 1.0
        pop = popularity.score if popularity is not None else (lambda _item: 0.0)
        rescored = [
            (item, (1 - popularity_weight) * (s - lo) / span + popularity_weight * pop(item))
            for item, s in neighbours
        ]
    else:
        raise ValueError(f"unknown weight function {function!r}")
    rescored.sort(key=lambda pair: pair[1], reverse=True)
    return rescored


def _distance(score: float, metric: str) -> float:
    if metric == "angular":
        return math.sqrt(max(0.0, 2.0 - 2.0 * score))
    if metric == "dot":
        return -score
    return -score


class Recommender:
    """Answers "what next for this user" and "what is like this item"."""

    def __init__(
        self,
        search: VectorSearch,
        popularity: Popularity,
        *,
        metric: str,
        weight_function: str,
        popularity_weight: float,
        profile_half_life_seconds: float,
        setting: QuerySetting | None = None,
        cache: QueryCache[Recommendation] | None = None,
    ) -> None:
        self.index = search
        self.popularity = popularity
        self.metric = metric
        self.weight_function = weight_function
        self.popularity_weight = popularity_weight
        self.profile_half_life_seconds = profile_half_life_seconds
        #: How queries are made (the self-tuning's served setting; the service replaces it).
        self.setting = setting or QuerySetting("configured", math.inf)
        self.cache = cache

    def for_user(
        self,
        user_id: str,
        profile: UserProfile | None,
        k: int,
        now_ms: int,
        exclude: Collection[str] = (),
    ) -> Recommendation:
        """Top ``k`` for ``user_id``, never an item of the profile or of ``exclude``:
        :meth:`for_many` of one request, through the query cache."""
        key = None
        if self.cache is not None and profile is not None:
            key = (
                "user",
                user_id,
                k,
                self.index.version,
                self.index.change_seq,
                profile.version,
                frozenset(exclude),
                self.setting,
            )
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        request = ListRequest(user_id, profile, tuple(exclude), now_ms, k)
        result = self.for_many([request], k, now_ms)[0]
        if key is not None and self.cache is not None:
            self.cache.put(key, result)
        return result

    def for_many(
        self,
        requests: Sequence[ListRequest],
        k: int,
        now_ms: int,
        executor: Executor | None = None,
        threads: int = 1,
        setting: QuerySetting | None = None,
    ) -> list[Recommendation]:
        """:meth:`for_user` of every request, made in bulk; the same lists.

        ``setting`` (a self-tuning candidate) replaces the recommender's own
        (:attr:`setting`).

        The query vectors come from one numpy pass (:func:`query_vectors`), the index is
        searched once for all of them (:meth:`VectorSearch.search_many`, Annoy from
        ``threads`` threads of which ``threads - 1`` on ``executor``). The query cache is
        neither read nor written: on the event path every profile is new, so it never hits.
        ``k`` and ``now_ms`` apply to the requests that do not set their own.
        """
        if not requests:
            return []
        version = self.index.version
        sizes = [r.k if r.k is not None else k for r in requests]
        seen: list[set[str]] = []
        for r in requests:
            hidden = set(r.exclude)
            if r.profile is not None:
                hidden |= r.profile.recent_items()
            seen.append(hidden)
        setting = setting or self.setting
        if setting.popularity:
            return [
                Recommendation(self.popularity.top(size, hidden), version, fallback="popular")
                for size, hidden in zip(sizes, seen, strict=True)
            ]
        queries, usable = query_vectors(
            [r.profile for r in requests],
            self.index.vector,
            [r.now_ms if r.now_ms is not None else now_ms for r in requests],
            self.profile_half_life_seconds,
            half_life_events=setting.half_life_events,
            max_items=setting.max_items,
        )
        function, weight = self._weighting(setting)
        # Over-fetch when re-ranking so the blend can promote popular candidates.
        factor = 3 if function == "popularity_blend" else 1
        found: dict[int, Neighbours] = {}
        asked = usable.nonzero()[0].tolist()
        for size in sorted({sizes[i] for i in asked}):
            rows = [i for i in asked if sizes[i] == size]
            lists = self.index.search_many(
                queries[rows], size * factor, [seen[i] for i in rows], executor, threads
            )
            found.update(zip(rows, lists, strict=True))
        out: list[Recommendation] = []
        for i, size in enumerate(sizes):
            neighbours = found.get(i)
            if not neighbours:
                out.append(
                    Recommendation(self.popularity.top(size, seen[i]), version, fallback="popular")
                )
                continue
            items = apply_weight_function(
                neighbours, function, self.metric, self.popularity, weight
            )[:size]
            out.append(Recommendation(items, version))
        return out

    def _weighting(self, setting: QuerySetting) -> tuple[str, float]:
        """The weight function and popularity weight of a list: the variant's own, unless
        ``setting`` blends with recent popularity."""
        if setting.popularity_weight > 0.0:
            return "popularity_blend", setting.popularity_weight
        return self.weight_function, self.popularity_weight

    def similar(self, item_id: str, k: int) -> Recommendation | None:
        """Items nearest ``item_id`` (never itself), or None for an unknown item."""
        key = ("item", item_id, k, self.index.version, self.index.change_seq)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        found = self.index.similar(item_id, k)
        if found is None:
            return None
        result = Recommendation(
            apply_weight_function(
                found, self.weight_function, self.metric, self.popularity, self.popularity_weight
            )[:k],
            self.index.version,
        )
        if self.cache is not None:
            self.cache.put(key, result)
        return result
