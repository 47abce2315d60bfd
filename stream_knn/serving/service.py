"""The serving side of a worker: one index manager per distinct index setting, one
recommender per A/B variant, recent popularity, the query cache and input drift.

No Kafka here: the worker feeds it vectors and events; ``stream-knn recommend`` uses it
over a saved index.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from mode import Service

from stream_knn.config import Config
from stream_knn.embeddings.profile import UserProfile
from stream_knn.index.manager import IndexManager
from stream_knn.metrics.drift import (
    DriftThresholds,
    InputDriftMonitor,
    embedding_drift,
    neighbour_drift,
)
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.cache import QueryCache
from stream_knn.serving.popularity import Popularity
from stream_knn.serving.recommender import ListRequest, Recommendation, Recommender
from stream_knn.serving.tuning import QuerySetting, SelfTuner, configured_setting, tuner_for
from stream_knn.serving.variants import ResolvedVariant, VariantAssigner

__all__ = ["ListRequest", "RecommendationService"]

logger = logging.getLogger(__name__)

_PROBE_K = 10
#: Self-tuning samples scored together (one search per candidate for all of them).
_SHADOW_BATCH = 32


class RecommendationService(Service):
    """Index managers, recommenders and the numbers about them, for one worker."""

    def __init__(self, config: Config, index_root: Path, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.metrics = metrics
        self.assigner = VariantAssigner(config.serving, config.index)
        self.popularity = Popularity(config.model.half_life_seconds)
        self.cache: QueryCache[Recommendation] = QueryCache(config.serving.cache_entries)
        d = config.drift
        self.thresholds = DriftThresholds(
            item_cosine_shift=d.item_cosine_shift,
            centroid_shift=d.centroid_shift,
            neighbour_drift=d.neighbour_drift,
            item_popularity=d.item_popularity,
            event_type=d.event_type,
        )
        self.input_drift = InputDriftMonitor(
            window_events=d.window_events, top_items=d.top_items, thresholds=self.thresholds
        )
        self.managers: dict[tuple[str, str, int, int], IndexManager] = {}
        self.recommenders: dict[str, Recommender] = {}
        for variant in self.assigner.variants:
            key = variant.index_key
            if key not in self.managers:
                name = "-".join(str(part) for part in key)
                root = index_root if not self.managers else index_root.parent / f"index-{name}"
                self.managers[key] = IndexManager(
                    variant.index,
                    root,
                    config.model.dims,
                    on_swap=self._on_swap,
                )
            self.recommenders[variant.name] = Recommender(
                self.managers[key],
                self.popularity,
                metric=variant.index.metric,
                weight_function=variant.weight_function,
                popularity_weight=config.serving.popularity_weight,
                profile_half_life_seconds=config.model.profile_half_life_seconds,
                setting=configured_setting(config.model.profile_half_life_events),
                cache=self.cache,
            )
        self._primary = next(iter(self.managers.values()))
        #: Self-tuning of the query step (None when off): every recommender builds its
        #: queries with the served setting.
        self.tuner: SelfTuner | None = (
            tuner_for(config.model.profile_half_life_events, config.serving.tuning_sample_rate)
            if config.serving.self_tuning
            else None
        )
        if self.tuner is not None:
            self._serve_setting(self.tuner.served)
        #: Self-tuning samples waiting to be scored together.
        self._shadow: list[tuple[ListRequest, str]] = []
        # The cache counts on the hot path; the Prometheus counters catch up on refresh.
        self._synced_hits = 0
        self._synced_misses = 0
        self._synced_build_errors = 0
        #: The probe sample: the first items seen, fixed for the life of the process.
        self._probe_ids: list[str] = []
        self._probe_before: (
            tuple[dict[str, npt.NDArray[np.float32]], dict[str, list[str]]] | None
        ) = None
        #: Set by :meth:`replace_all`: the next swap changes the basis of every vector.
        self._basis_changed = False
        #: When the drift probe last ran (monotonic seconds).
        self._probed_at = -math.inf
        #: Searches an Annoy index beside the calling thread in :meth:`recommend_many`;
        #: its threads start on first use and end on stop.
        self._search_threads = config.serving.search_threads
        self._search_pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(self._search_threads - 1, thread_name_prefix="stream-knn-search")
            if self._search_threads > 1
            else None
        )

    async def on_start(self) -> None:
        for manager in self.managers.values():
            manager.start()

    async def on_stop(self) -> None:
        for manager in self.managers.values():
            manager.stop()
        pool, self._search_pool = self._search_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- feeding ---------------------------------------------------------------------------

    def upsert(self, item_id: str, vector: npt.NDArray[np.float32]) -> None:
        for manager in self.managers.values():
            manager.upsert(item_id, vector)
        if len(self._probe_ids) < self.config.drift.probe_items and item_id not in self._probe_ids:
            self._probe_ids.append(item_id)

    def upsert_many(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        """:meth:`upsert` of many items at once (row ``i`` of ``vectors`` is ``ids[i]``'s)."""
        for manager in self.managers.values():
            manager.upsert_many(ids, vectors)
        room = self.config.drift.probe_items - len(self._probe_ids)
        if room > 0:
            known = set(self._probe_ids)
            for item_id in ids:
                if room <= 0:
                    break
                if item_id not in known:
                    known.add(item_id)
                    self._probe_ids.append(item_id)
                    room -= 1

    def replace_all(
        self, vectors: dict[str, npt.NDArray[np.float32]], basis: bytes | None = None
    ) -> None:
        """Serve a new embedding basis: every manager switches all its vectors at once.

        Blocks while the versions build (call it off the event loop). Embedding drift is
        not measured across the switch (the coordinates changed meaning); neighbour drift
        is, as the neighbours of an item do not depend on the basis.
        """
        self._basis_changed = True
        for manager in self.managers.values():
            manager.replace_all(vectors, basis)

    def pinned(self) -> bool:
        """Whether any index manager serves a pinned version."""
        return any(m.pinned is not None for m in self.managers.values())

    def delete(self, item_id: str) -> None:
        for manager in self.managers.values():
            manager.delete(item_id)
        self.popularity.remove(item_id)

    def forget_item(self, item_id: str) -> None:
        self.popularity.remove(item_id)

    def forget_users(self, users: Collection[str]) -> None:
        """Drop what this process holds of ``users`` (``forget`` records): their cached
        lists and pending self-tuning samples."""
        self.cache.discard_where(
            lambda key: isinstance(key, tuple) and key[0] == "user" and key[1] in users
        )
        self._shadow = [sample for sample in self._shadow if sample[0].user_id not in users]

    def observe(self, event: Any) -> None:
        """Count a user event for popularity and input drift.

        Popularity counts the event at once; the item changelog (applied by the vector
        replica) then replaces the item's count with the authoritative, global one.
        """
        self.popularity.observe(event.item_id, event.weight, event.ts_ms)
        self.input_drift.observe(event.item_id, event.event_type)

    # -- answering -------------------------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        profile: UserProfile | None,
        k: int,
        now_ms: int,
        exclude: Collection[str] = (),
        variant: ResolvedVariant | None = None,
    ) -> Recommendation:
        variant = variant or self.assigner.assign(user_id)
        return self.recommenders[variant.name].for_user(user_id, profile, k, now_ms, exclude)

    def recommend_many(
        self,
        requests: Sequence[ListRequest],
        now_ms: int,
        variants: Sequence[ResolvedVariant] | None = None,
        setting: QuerySetting | None = None,
    ) -> list[Recommendation]:
        """The lists of a whole batch, in request order: what :meth:`recommend` would
        answer for each request, one at a time, for the same state (``setting``: a
        self-tuning candidate's query step instead of the served one).

        Requests are grouped by A/B variant (``variants[i]`` if given, else assigned from
        the user id); each group is answered by its recommender in bulk
        (:meth:`Recommender.for_many`): one numpy pass for the query vectors, one matrix
        product for the exact delta, the live index from ``serving.search_threads``
        threads. The query cache is skipped (on the event path it can never hit); no
        metric is counted here, so the caller counts once per batch.

        Parameters
        ----------
        requests
            One :class:`ListRequest` per list; ``k`` None means the variant's ``k``,
            ``now_ms`` None means this call's ``now_ms``.
        now_ms
            Time profiles are decayed to, epoch ms, unless a request sets its own.
        variants
            The requests' variants, when the caller has assigned them already.
        """
        if variants is None:
            variants = [self.assigner.assign(r.user_id) for r in requests]
        elif len(variants) != len(requests):
            raise ValueError(f"got {len(variants)} variants for {len(requests)} requests")
        groups: dict[str, list[int]] = {}
        for pos, variant in enumerate(variants):
            groups.setdefault(variant.name, []).append(pos)
        out: list[Recommendation | None] = [None] * len(requests)
        for name, positions in groups.items():
            variant = variants[positions[0]]
            answers = self.recommenders[name].for_many(
                [requests[p] for p in positions],
                variant.k,
                now_ms,
                self._search_pool,
                self._search_threads if self._search_pool is not None else 1,
                setting,
            )
            for pos, answer in zip(positions, answers, strict=True):
                out[pos] = answer
        return [answer for answer in out if answer is not None]

    def shadow_score(self, samples: Sequence[tuple[ListRequest, str]], now_ms: int) -> None:
        """Self-tuning: score every candidate setting on ``samples`` (a request built from
        the user's profile *before* an event, and the event's item), in one batch per
        candidate once :data:`_SHADOW_BATCH` are pending (a search call per candidate for
        a handful of samples cost more than the lists); serve a better candidate when the
        tuner says so."""
        tuner = self.tuner
        if tuner is None:
            return
        self._shadow.extend(samples)
        if len(self._shadow) < _SHADOW_BATCH:
            return
        samples, self._shadow = self._shadow, []
        requests = [request for request, _ in samples]
        variants = [self.assigner.assign(r.user_id) for r in requests]
        hits: dict[str, list[bool]] = {}
        for name, setting in tuner.candidates.items():
            lists = self.recommend_many(requests, now_ms, variants, setting)
            hits[name] = [
                any(found == item for found, _ in rec.items)
                for rec, (_, item) in zip(lists, samples, strict=True)
            ]
        for row in range(len(samples)):
            if tuner.record({name: flags[row] for name, flags in hits.items()}) is not None:
                self.metrics.tuning_switches.inc()
                self._serve_setting(tuner.served)
        for name, rate in tuner.hit_rates.items():
            self.metrics.tuning_hit_rate.labels(name).set(rate)

    def _serve_setting(self, setting: QuerySetting) -> None:
        for recommender in self.recommenders.values():
            recommender.setting = setting
        assert self.tuner is not None
        for name in self.tuner.candidates:
            self.metrics.tuning_served.labels(name).set(1.0 if name == setting.name else 0.0)

    def similar(
        self, item_id: str, k: int, variant: ResolvedVariant | None = None
    ) -> Recommendation | None:
        variant = variant or self.assigner.variants[0]
        return self.recommenders[variant.name].similar(item_id, k)

    def answer(
        self,
        *,
        user_id: str | None = None,
        profile: UserProfile | None = None,
        item_id: str | None = None,
        k: int | None,
        now_ms: int,
        trigger: str,
    ) -> dict[str, Any]:
        """The JSON body of an on-demand answer (HTTP, Kafka request, batch).

        For a user: ``user_id, variant, [cold_start], items, k, index_version, trigger,
        emitted_ts, [fallback]``; ``k`` None means the user's variant's k. For an item
        (``/similar``): the same with ``item_id``, and ``error`` for an unknown item.
        """
        if user_id is not None:
            variant = self.assigner.assign(user_id)
            kk = k or variant.k
            rec = self.recommend(user_id, profile, kk, now_ms, variant=variant)
            body: dict[str, Any] = {"user_id": user_id, "variant": variant.name}
            if profile is None:
                body["cold_start"] = True
        else:
            if item_id is None:
                raise ValueError("answer() needs a user_id or an item_id")
            variant = self.assigner.variants[0]
            kk = k or variant.k
            found = self.similar(item_id, kk, variant=variant)
            body = {"item_id": item_id, "variant": variant.name}
            if found is None:
                body["error"] = f"unknown item {item_id!r}"
                rec = Recommendation([], self._primary.version)
            else:
                rec = found
        body.update(
            {
                "items": [{"item_id": i, "score": round(s, 6)} for i, s in rec.items],
                "k": kk,
                "index_version": rec.index_version,
                "trigger": trigger,
                "emitted_ts": int(time.time() * 1000),
            }
        )
        if rec.fallback:
            body["fallback"] = rec.fallback
        if "error" not in body:
            self.metrics.recommendations.labels(variant.name, trigger).inc()
        return body

    @property
    def has_index(self) -> bool:
        return self._primary.version is not None

    @property
    def primary(self) -> IndexManager:
        return self._primary

    # -- numbers ---------------------------------------------------------------------------

    def _on_swap(self, new: Any, old: Any) -> None:
        self.cache.invalidate()
        self.metrics.index_build.observe(float(new.build_seconds))
        logger.info(
            "index version %s live: %s items, built in %.3f s",
            new.version,
            new.item_count,
            new.build_seconds,
            extra={"version": new.version},
        )
        now = time.monotonic()
        # A switch of basis is always probed: the next probe must not compare across it.
        if self._basis_changed or now - self._probed_at >= self.config.drift.probe_interval_seconds:
            self._probed_at = now
            self._measure_drift(new.version)

    def _measure_drift(self, version: int) -> None:
        """Embedding and neighbour drift of the probe items against the previous version."""
        manager = self._primary
        vectors: dict[str, npt.NDArray[np.float32]] = {}
        neighbours: dict[str, list[str]] = {}
        for item_id in self._probe_ids:
            vector = manager.vector(item_id)
            if vector is not None:
                vectors[item_id] = np.array(vector, dtype=np.float32)
        if vectors:
            # All probe items in one batch search (the probe runs at every swap).
            ids = list(vectors)
            found = manager.search_many(
                np.stack([vectors[i] for i in ids]), _PROBE_K, [(i,) for i in ids]
            )
            neighbours = {i: [other for other, _ in f] for i, f in zip(ids, found, strict=True)}
        before, self._probe_before = self._probe_before, (vectors, neighbours)
        basis_changed, self._basis_changed = self._basis_changed, False
        if before is None or not vectors or not before[0]:
            return
        old_vectors, old_neighbours = before
        if basis_changed:
            moved = neighbour_drift(old_neighbours, neighbours)
            if np.isfinite(moved):
                self.metrics.neighbour_drift.set(moved)
            logger.info(
                "index version %s: new embedding basis; neighbour drift %.3f, embedding "
                "drift not comparable across the switch",
                version,
                moved,
                extra={"version": version},
            )
            return
        old_ids = list(old_vectors)
        new_ids = list(vectors)
        drift = embedding_drift(
            old_ids,
            np.stack([old_vectors[i] for i in old_ids]),
            new_ids,
            np.stack([vectors[i] for i in new_ids]),
        )
        values = dict(drift.values())
        values["neighbour_drift"] = neighbour_drift(old_neighbours, neighbours)
        for kind in ("item_cosine_shift", "centroid_shift"):
            if np.isfinite(values[kind]):
                self.metrics.embedding_drift.labels(kind).set(values[kind])
        if np.isfinite(values["neighbour_drift"]):
            self.metrics.neighbour_drift.set(values["neighbour_drift"])
        crossed = self.thresholds.crossed({k: v for k, v in values.items() if np.isfinite(v)})
        if crossed:
            logger.warning(
                "drift above threshold at index version %s: %s",
                version,
                ", ".join(f"{name}={values[name]:.3f}" for name in crossed),
                extra={"version": version},
            )

    def refresh_gauges(self) -> None:
        m, primary = self.metrics, self._primary
        if primary.version is not None:
            m.index_version.set(primary.version)
        m.index_items.set(primary.item_count)
        m.index_age.set(primary.age_seconds or 0.0)
        m.index_pending.set(primary.pending_items)
        recall = primary.sampled_recall()
        if recall is not None:
            m.ann_recall.set(recall)
        errors = sum(manager.build_errors for manager in self.managers.values())
        m.index_build_errors.inc(errors - self._synced_build_errors)
        self._synced_build_errors = errors
        m.cache_hits.inc(self.cache.hits - self._synced_hits)
        m.cache_misses.inc(self.cache.misses - self._synced_misses)
        self._synced_hits, self._synced_misses = self.cache.hits, self.cache.misses
        m.cache_hit_ratio.set(self.cache.hit_ratio)
        for name, value in self.input_drift.current().items():
            m.input_drift.labels(name).set(value)
