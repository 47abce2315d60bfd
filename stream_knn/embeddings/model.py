"""The in-memory streaming model: sketch, catalog and profiles composed, with exact search.

Used by the offline replay (prequential evaluation: recommend, then learn) and as the
reference the worker's table-backed composition is tested against. The worker runs the
same pieces (:class:`RandomIndexing`, :class:`SketchProjector`, :class:`CatalogFeatures`,
:class:`UserProfile`, :func:`blend`) with RocksDB tables instead of dicts.

Item state is a ``sketch_dims``-wide sketch; the vectors searched are its projection to
``dims`` (see :mod:`stream_knn.embeddings.projection`), blended with catalog content.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

# A module import: stream_knn.core.batch imports this package (cycle resolved at call time).
import stream_knn.core.batch as core
from stream_knn.config import EventsConfig, ModelConfig
from stream_knn.embeddings.catalog import CatalogFeatures, Features, blend, unit
from stream_knn.embeddings.profile import UserProfile, query_vectors
from stream_knn.embeddings.projection import Projection, SketchProjector
from stream_knn.embeddings.sketch import ItemState, RandomIndexing
from stream_knn.events.schema import UserEvent
from stream_knn.index.exact import top_k
from stream_knn.serving.tuning import QuerySetting

__all__ = ["StreamingModel"]

logger = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

_INITIAL_CAPACITY = 1024


class StreamingModel:
    """Online item embeddings, catalog content and user profiles, searched exactly.

    Parameters
    ----------
    config
        The ``[model]`` settings.
    events
        The ``[events]`` settings (event-type weights for :meth:`learn_event`).
    activity_weighting
        Scale each event's contribution to the item sketch by
        :func:`~stream_knn.embeddings.sketch.activity_weight` of the user's event count.

    Examples
    --------
    >>> from stream_knn.config import ModelConfig
    >>> m = StreamingModel(ModelConfig(dims=16))
    >>> for user, item in [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a")]:
    ...     m.learn_one(user, item, 1.0, ts_ms=0)
    >>> [item for item, _ in m.recommend("u3", k=1, now_ms=0)]
    ['b']
    """

    def __init__(
        self,
        config: ModelConfig,
        events: EventsConfig | None = None,
        *,
        activity_weighting: bool = False,
    ) -> None:
        self.config = config
        self.events = events or EventsConfig()
        self.activity_weighting = activity_weighting
        self.sketch = RandomIndexing(config.sketch_dims, config.seed, config.half_life_seconds)
        self.projector = SketchProjector(config)
        self.catalog = CatalogFeatures(
            config.dims, config.pca, config.pca_warmup_items, config.seed
        )
        self._content: dict[str, Vector] = {}
        # Raw catalog records, kept to recompute content vectors when the PCA basis changes.
        self._records: dict[str, tuple[Vector | None, dict[str, Any] | None]] = {}
        self._profiles: dict[str, UserProfile] = {}
        self._matrix = np.zeros((_INITIAL_CAPACITY, config.dims), dtype=np.float32)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    # -- learning ---------------------------------------------------------------------------

    def learn_one(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> None:
        """Learn one interaction: update the item's sketch and the user's profile.

        Parameters
        ----------
        user_id, item_id
            Who did what.
        weight
            Event weight (see :meth:`learn_event` for weights from event types).
        ts_ms
            Event time, epoch ms.
        """
        # The worker's learning rule (stream_knn.core), one event at a time.
        event = UserEvent(user_id, item_id, "learn", int(ts_ms), float(weight), "", None, None)
        batch = core.learn_user_events(
            (event,), self._profiles, self.config, activity_weighting=self.activity_weighting
        )
        self._profiles[user_id] = batch.emissions[0].profile
        states = core.learn_item_events(
            batch.item_events, {item_id: self.projector.get(item_id)}, self.sketch
        )
        self.projector.set(item_id, states[item_id])
        if self.projector.refit_due and self.projector.refit():
            self._refresh_all()
        else:
            self._refresh(item_id)

    def learn_event(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        ts_ms: int,
        weight: float | None = None,
    ) -> None:
        """:meth:`learn_one` with the weight of ``event_type`` unless ``weight`` is given."""
        self.learn_one(
            user_id, item_id, self.events.weight_of(event_type) if weight is None else weight, ts_ms
        )

    def forget_user(self, user_id: str) -> bool:
        """Delete the user's profile; returns whether there was one.

        The user's past contributions to item vectors are anonymous and fade with the item
        half-life; they are not subtracted.
        """
        return self._profiles.pop(user_id, None) is not None

    def set_catalog(
        self,
        item_id: str,
        vector: npt.ArrayLike | None = None,
        features: Features | None = None,
    ) -> None:
        """Set (or replace) the catalog record of an item.

        Raises
        ------
        DimensionError
            See :meth:`CatalogFeatures.content_vector`; the model is unchanged then.
        """
        version = self.catalog.pca_version
        content = self.catalog.content_vector(vector, features)
        explicit = None if vector is None else np.asarray(vector, dtype=np.float32)
        self._records[item_id] = (explicit, None if features is None else dict(features))
        if content is None:
            self._content.pop(item_id, None)
        else:
            self._content[item_id] = content
        if self.catalog.pca_version != version:
            self._recompute_content()
        else:
            self._refresh(item_id)

    def delete_item(self, item_id: str) -> bool:
        """Remove everything known about an item; returns whether it existed."""
        # Pop from every store (a generator inside any() would stop at the first hit).
        popped = [self.projector.remove(item_id)] + [
            store.pop(item_id, None) is not None for store in (self._content, self._records)
        ]
        existed = any(popped) or item_id in self._rows
        self._remove_row(item_id)
        return existed

    # -- reading ----------------------------------------------------------------------------

    def item_vector(self, item_id: str) -> Vector | None:
        """The item's blended vector, unit length (a copy), ``None`` if it has none."""
        row = self._rows.get(item_id)
        return None if row is None else self._matrix[row].copy()

    def item_state(self, item_id: str) -> ItemState | None:
        """The item's wide sketch state (behaviour only), ``None`` if no event was seen."""
        return self.projector.get(item_id)

    @property
    def projection(self) -> Projection:
        """The current sketch -> ``dims`` projection (its version counts the fits)."""
        return self.projector.projection

    def item_matrix(self) -> tuple[list[str], Vector]:
        """All items that have a vector, and their unit blended vectors (copies), row-aligned."""
        n = len(self._ids)
        return list(self._ids), self._matrix[:n].copy()

    def profile(self, user_id: str) -> UserProfile | None:
        """The user's profile, ``None`` for an unknown (or forgotten) user."""
        return self._profiles.get(user_id)

    def query_vector(
        self, user_id: str, now_ms: int, setting: QuerySetting | None = None
    ) -> Vector | None:
        """The user's unit query vector at ``now_ms``, ``None`` if none can be built.

        ``setting`` (a self-tuning candidate) replaces the configured rank half-life.
        """
        profile = self._profiles.get(user_id)
        if profile is None:
            return None
        # The worker's query step (stream_knn.embeddings.profile.query_vectors), one user.
        queries, usable = query_vectors(
            [profile],
            self._row_vector,
            now_ms,
            self.config.profile_half_life_seconds,
            half_life_events=(
                self.config.profile_half_life_events
                if setting is None
                else setting.half_life_events
            ),
            max_items=None if setting is None else setting.max_items,
        )
        return unit(queries[0]) if usable[0] else None

    def _row_vector(self, item_id: str) -> Vector | None:
        row = self._rows.get(item_id)
        return None if row is None else self._matrix[row]

    def recommend(
        self,
        user_id: str,
        k: int,
        now_ms: int,
        exclude_seen: bool = True,
        exclude: Collection[str] = (),
        setting: QuerySetting | None = None,
    ) -> list[tuple[str, float]]:
        """Top-``k`` items by cosine with the user's query vector, best first.

        Parameters
        ----------
        user_id
            The user.
        k
            Number of items wanted (fewer if the catalog is small).
        now_ms
            Time the profile is decayed to, epoch ms.
        exclude_seen
            Leave out the items in the user's profile (its recent items).
        exclude
            Further items to leave out (e.g. everything the user ever saw, which the
            bounded profile does not remember).

        Returns
        -------
        list of (item_id, cosine)
            Empty for an unknown user or one whose items have no vector.
        """
        query = self.query_vector(user_id, now_ms, setting)
        if query is None:
            return []
        excluded = frozenset(exclude)
        if exclude_seen:
            excluded |= self._profiles[user_id].recent_items()
        return self._search(query, k, excluded)

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` items nearest ``item_id`` by cosine (itself excluded), best first."""
        vector = self.item_vector(item_id)
        if vector is None:
            return []
        return self._search(vector, k, frozenset((item_id,)))

    def __len__(self) -> int:
        """Number of items with a vector."""
        return len(self._ids)

    @property
    def n_users(self) -> int:
        """Number of users with a profile."""
        return len(self._profiles)

    # -- internals --------------------------------------------------------------------------

    def _search(self, query: Vector, k: int, exclude: frozenset[str]) -> list[tuple[str, float]]:
        n = len(self._ids)
        if n == 0 or k <= 0:
            return []
        scores = self._matrix[:n] @ query
        for item_id in exclude:
            row = self._rows.get(item_id)
            if row is not None:
                scores[row] = -np.inf
        available = n - sum(1 for i in exclude if i in self._rows)
        k = min(k, available)
        if k <= 0:
            return []
        return [(self._ids[r], float(scores[r])) for r in top_k(scores, k).tolist()]

    def _refresh_all(self) -> None:
        # A new basis moves every behaviour vector; content-only items are unchanged.
        # An item whose old projection was zero has no row yet: visit those too.
        for item_id in [*self._rows, *(i for i in self.projector if i not in self._rows)]:
            self._refresh(item_id)

    def _refresh(self, item_id: str) -> None:
        vector = unit(
            blend(
                self.projector.project(item_id),
                self._content.get(item_id),
                self.config.catalog_weight,
            )
        )
        if vector is None:
            self._remove_row(item_id)
            return
        row = self._rows.get(item_id)
        if row is None:
            row = len(self._ids)
            if row == self._matrix.shape[0]:
                grown = np.zeros((2 * row, self.config.dims), dtype=np.float32)
                grown[:row] = self._matrix
                self._matrix = grown
            self._ids.append(item_id)
            self._rows[item_id] = row
        self._matrix[row] = vector

    def _remove_row(self, item_id: str) -> None:
        row = self._rows.pop(item_id, None)
        if row is None:
            return
        # Keep the matrix contiguous: the last row moves into the hole.
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._matrix[row] = self._matrix[last]
            self._ids[row] = moved
            self._rows[moved] = row
        self._ids.pop()

    def _recompute_content(self) -> None:
        logger.info(
            "catalog basis changed (pca_version %d): recomputing %d content vectors",
            self.catalog.pca_version,
            len(self._records),
        )
        for item_id, (vector, features) in self._records.items():
            content = self.catalog.transform(vector, _as_features(features))
            if content is None:
                self._content.pop(item_id, None)
            else:
                self._content[item_id] = content
            self._refresh(item_id)


def _as_features(features: Mapping[str, Any] | None) -> Features | None:
    return features
