"""Every worker's full copy of the item vectors, read from the vector tables' changelogs.

Item state is partitioned by item across workers, but each worker's index must hold every
item, so each worker reads both changelog topics (behaviour vectors and catalog content
vectors) from the beginning, all partitions, outside the consumer group, and feeds the
blended vectors to its index managers. Kafka's compacted changelog is the source of truth.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream_knn.config import Config
from stream_knn.embeddings.catalog import blend
from stream_knn.embeddings.codec import decode_vector
from stream_knn.embeddings.sketch import ItemState
from stream_knn.errors import DimensionError
from stream_knn.serving.service import RecommendationService

__all__ = ["VectorReplica"]

logger = logging.getLogger(__name__)


class VectorReplica:
    """Tails ``<app>-item-vectors-changelog`` and ``<app>-item-contents-changelog``."""

    def __init__(self, config: Config, service: RecommendationService) -> None:
        self.config = config
        self.service = service
        app_id = config.worker.app_id
        self.behaviour_topic = f"{app_id}-item-vectors-changelog"
        self.content_topic = f"{app_id}-item-contents-changelog"
        self.behaviour: dict[str, npt.NDArray[np.float32]] = {}
        self.content: dict[str, npt.NDArray[np.float32]] = {}
        self.caught_up = False
        self.records = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        cfg = self.config
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
        return self.behaviour.keys() | self.content.keys()

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (``value`` None is a tombstone) to the service.

        Behaviour records also carry the item's decayed event weight, which becomes its
        recent popularity: the same on every worker and after a restart.
        """
        if key is None:
            return
        item_id = key.decode()
        dims = self.config.model.dims
        behaviour = topic == self.behaviour_topic
        store = self.behaviour if behaviour else self.content
        self.records += 1
        if value is None:
            store.pop(item_id, None)
            if behaviour:
                self.service.popularity.remove(item_id)
        else:
            try:
                if behaviour:
                    state = ItemState.from_bytes(value, dims)
                    store[item_id] = state.vector
                    self.service.popularity.set(item_id, state.popularity, state.last_ts_ms)
                else:
                    store[item_id] = decode_vector(value, dims)
            except DimensionError as exc:
                logger.error("skipping item %s from %s: %s", item_id, topic, exc)
                return
        vector = blend(
            self.behaviour.get(item_id),
            self.content.get(item_id),
            self.config.model.catalog_weight,
        )
        if vector is None:
            self.service.delete(item_id)
        else:
            self.service.upsert(item_id, vector)
