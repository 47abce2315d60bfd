"""Every worker's full copy of the item vectors, read from the vector tables' changelogs.

Item state is partitioned by item across workers, but each worker's index must hold every
item, so each worker reads both changelog topics (behaviour vectors and catalog content
vectors) from the beginning, all partitions, outside the consumer group, and feeds the
blended vectors to its index managers. Kafka's compacted changelog is the source of truth.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream_knn.config import Config
from stream_knn.embeddings.catalog import blend
from stream_knn.embeddings.codec import decode_vector
from stream_knn.embeddings.projection import Projection, SketchProjector
from stream_knn.embeddings.sketch import ItemState
from stream_knn.errors import DimensionError
from stream_knn.serving.service import RecommendationService

__all__ = ["VectorReplica"]

#: Skipped changelog records logged one by one before the log goes quiet about them.
_SKIPPED_LOGGED = 20

logger = logging.getLogger(__name__)


class VectorReplica:
    """Tails ``<app>-item-vectors-changelog`` and ``<app>-item-contents-changelog``."""

    def __init__(self, config: Config, service: RecommendationService) -> None:
        self.config = config
        self.service = service
        app_id = config.worker.app_id
        self.behaviour_topic = f"{app_id}-item-vectors-changelog"
        self.content_topic = f"{app_id}-item-contents-changelog"
        #: Wide behaviour states and their projection to the index dimension.
        self.projector = SketchProjector(config.model)
        self.content: dict[str, npt.NDArray[np.float32]] = {}
        self.caught_up = False
        self.records = 0
        self.refits = 0
        #: Changelog records that could not be read (wrong width, corrupt) and were skipped.
        self.skipped = 0
        self._last_refit: float | None = None
        self._gauge_due = 0.0
        self._consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        cfg = self.config
        # The saved index version the service warm-started from was built in some basis:
        # project the replayed states the same way, or queries would mix two bases.
        while not self.service.started:
            await asyncio.sleep(0.05)
        self.adopt_basis(self.service.primary.basis)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_poll_records=5000,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = await self._wait_for_partitions(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            pending = {tp for tp, off in end.items() if off > 0}
            self.caught_up = not pending
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, messages in batches.items():
                    for msg in messages:
                        self.apply(tp.topic, msg.key, msg.value)
                    if tp in pending and messages and messages[-1].offset + 1 >= end[tp]:
                        pending.discard(tp)
                if not self.caught_up and not pending:
                    self.caught_up = True
                    logger.info("item vectors replicated: %d items", len(self.known_items()))
                if self.caught_up:
                    await self.maybe_refit()
                if time.monotonic() >= self._gauge_due:
                    # Counting means a union of the id sets: once a second, not per batch.
                    self._gauge_due = time.monotonic() + 1.0
                    self.service.metrics.items.set(len(self.known_items()))
        finally:
            self._consumer = None
            await consumer.stop()

    async def ping(self) -> bool | None:
        """True when the broker answered a metadata request just now; None before the
        replica's consumer has started (nothing to say yet)."""
        consumer = self._consumer
        if consumer is None:
            return None
        try:
            await consumer._client.fetch_all_metadata()
        except (OSError, KafkaError) as exc:
            logger.debug("broker ping failed: %s", exc)
            return False
        return True

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Log-end offsets of ``partitions`` (for the consumer-lag gauge)."""
        consumer = self._consumer
        if consumer is None or not partitions:
            return {}
        result: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return result

    async def _wait_for_partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        # Faust creates the changelog topics when the app starts; wait until both exist.
        while True:
            await consumer._client.force_metadata_update()
            found: list[TopicPartition] = []
            for topic in (self.behaviour_topic, self.content_topic):
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    break
                found.extend(TopicPartition(topic, p) for p in sorted(parts))
            else:
                return found
            await asyncio.sleep(0.5)

    def known_items(self) -> set[str]:
        return set(self.projector) | self.content.keys()

    def _blended(self, item_id: str) -> npt.NDArray[np.float32] | None:
        return blend(
            self.projector.project(item_id),
            self.content.get(item_id),
            self.config.model.catalog_weight,
        )

    def adopt_basis(self, basis: bytes | None) -> bool:
        """Project with the basis saved with an index version; False if there is none or
        it does not fit this configuration (then the current projection stays)."""
        if basis is None:
            return False
        try:
            projection = Projection.from_bytes(basis)
        except DimensionError as exc:
            logger.error("ignoring the saved embedding basis: %s", exc)
            return False
        model = self.config.model
        if (projection.sketch_dims, projection.dims) != (model.sketch_dims, model.dims):
            logger.error(
                "ignoring the saved embedding basis: it maps %d to %d dims, the configuration "
                "%d (model.sketch_dims) to %d (model.dims)",
                projection.sketch_dims,
                projection.dims,
                model.sketch_dims,
                model.dims,
            )
            return False
        self.projector.projection = projection
        logger.info("projecting with the saved embedding basis version %d", projection.version)
        return True

    def refit_now(self) -> bool:
        """Refit the projection and serve every item in the new basis (blocking: index
        builds); False when no new basis was fitted (no items, or ``sketch_dims == dims``)."""
        if not self.projector.refit():
            return False
        vectors = {}
        for item_id in self.known_items():
            vector = self._blended(item_id)
            if vector is not None:
                vectors[item_id] = vector
        self.service.replace_all(vectors, self.projector.projection.to_bytes())
        return True

    async def maybe_refit(self, force: bool = False) -> bool:
        """Refit the projection when it is due and the interval allows; True if refitted.

        The fit and the index builds run in a thread; meanwhile this replica applies no
        records (they wait in Kafka), so nothing is upserted in the old basis.
        """
        projector = self.projector
        interval = self.config.model.projection_refit_interval_seconds
        now = time.monotonic()
        if not force:
            if not projector.refit_due:
                return False
            if self._last_refit is not None and now - self._last_refit < interval:
                return False
        if self.service.pinned():
            return False  # a pinned version is served as is; its basis must stay
        self._last_refit = now
        started = time.perf_counter()
        changed = await asyncio.to_thread(self.refit_now)
        if changed:
            self.refits += 1
            logger.info(
                "projection version %d: %d items re-expressed and indexed in %.2f s",
                projector.projection.version,
                len(projector),
                time.perf_counter() - started,
            )
        return changed

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (``value`` None is a tombstone) to the service.

        Behaviour records also carry the item's decayed event weight, which becomes its
        recent popularity: the same on every worker and after a restart.
        """
        if key is None:
            return
        item_id = key.decode()
        model = self.config.model
        behaviour = topic == self.behaviour_topic
        self.records += 1
        if value is None:
            if behaviour:
                self.projector.remove(item_id)
                self.service.popularity.remove(item_id)
            else:
                self.content.pop(item_id, None)
        else:
            try:
                if behaviour:
                    state = ItemState.from_bytes(value, model.sketch_dims)
                    self.projector.set(item_id, state)
                    self.service.popularity.set(item_id, state.popularity, state.last_ts_ms)
                else:
                    self.content[item_id] = decode_vector(value, model.dims)
            except DimensionError as exc:
                # E.g. states of another model.sketch_dims in an old changelog: each is
                # replaced when its item is next updated. Logged one by one up to a limit.
                self.skipped += 1
                if self.skipped <= _SKIPPED_LOGGED:
                    logger.error("skipping item %s from %s: %s", item_id, topic, exc)
                elif self.skipped == _SKIPPED_LOGGED + 1:
                    logger.error("more records skipped for the same reason; not logged each")
                return
        vector = self._blended(item_id)
        if vector is None:
            self.service.delete(item_id)
        else:
            self.service.upsert(item_id, vector)
