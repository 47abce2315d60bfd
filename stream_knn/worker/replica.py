"""Every worker's full copy of the item vectors, read from the vector tables' changelogs.

Item state is partitioned by item across workers, but each worker's index must hold every
item, so each worker reads both changelog topics (behaviour vectors and catalog content
vectors) from the beginning, all partitions, outside the consumer group, and feeds the
blended vectors to its index managers. Kafka's compacted changelog is the source of truth.
Each fetched batch of records is applied at once: one projection, one blend and one index
update for all the items it touches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import TopicPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaPartition

from stream_knn.config import Config
from stream_knn.embeddings.codec import decode_vector
from stream_knn.embeddings.projection import Projection, SketchProjector
from stream_knn.embeddings.sketch import ItemState
from stream_knn.errors import DimensionError
from stream_knn.kafka import librdkafka_settings
from stream_knn.serving.service import RecommendationService

__all__ = ["Record", "VectorReplica"]

#: Skipped changelog records logged one by one before the log goes quiet about them.
_SKIPPED_LOGGED = 20
#: How often the reader's librdkafka reports its statistics (the replica's lag).
_STATS_INTERVAL_MS = 2000

logger = logging.getLogger(__name__)

#: One changelog record: topic, key (the item id) and value (``None``: a tombstone).
Record = tuple[str, bytes | None, bytes | None]


@runtime_checkable
class _BatchFeed(Protocol):
    """A service that takes many item vectors at once (one index update per batch)."""

    def upsert_many(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None: ...


def _unit_rows(
    matrix: npt.NDArray[np.float32], present: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Rows scaled to unit length, and which are usable: present, finite and not zero."""
    norms = np.linalg.norm(matrix, axis=1)
    usable = present & np.isfinite(norms) & (norms > 0.0)
    scale = np.where(usable, norms, np.float32(1.0)).astype(np.float32)
    return (matrix / scale[:, None]).astype(np.float32, copy=False), usable


def _blend_rows(
    behaviour: npt.NDArray[np.float32],
    has_behaviour: npt.NDArray[np.bool_],
    content: npt.NDArray[np.float32],
    has_content: npt.NDArray[np.bool_],
    catalog_weight: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """:func:`~stream_knn.embeddings.catalog.blend` of every row at once, and which rows
    have a vector (the others are to be deleted)."""
    b, has_b = _unit_rows(behaviour, has_behaviour)
    c, has_c = _unit_rows(content, has_content)
    w = np.float32(catalog_weight)
    both = (has_b & has_c)[:, None]
    out = np.where(both, (np.float32(1.0) - w) * b + w * c, np.where(has_b[:, None], b, c))
    return out.astype(np.float32, copy=False), has_b | has_c


#: Fetched batches the reader thread may hand over before the event loop applies them.
_INBOX_BATCHES = 8


def _high_watermarks(
    consumer: Consumer, partitions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """Log-end offset of each ``(topic, partition)`` (blocking: run it off the loop)."""
    out: dict[tuple[str, int], int] = {}
    for topic, partition in partitions:
        _, high = consumer.get_watermark_offsets(
            KafkaPartition(topic, partition), timeout=10.0, cached=False
        )
        out[(topic, partition)] = int(high)
    return out


def _list_topic(consumer: Consumer, topic: str) -> Any:
    """The cluster's metadata of ``topic`` (blocking: run it off the loop)."""
    return consumer.list_topics(topic, timeout=5.0)


def _read_changelogs(
    consumer: Consumer,
    loop: asyncio.AbstractEventLoop,
    inbox: asyncio.Queue[list[Message]],
    room: threading.BoundedSemaphore,
    stop: threading.Event,
) -> None:
    """The reader thread: whole fetches from librdkafka to the loop, at most
    :data:`_INBOX_BATCHES` waiting (the loop applies them in order)."""
    while not stop.is_set():
        if not room.acquire(timeout=0.2):
            continue
        messages: list[Message] = []
        while not messages and not stop.is_set():
            try:
                got = consumer.consume(num_messages=5000, timeout=0.2)
            except (KafkaException, RuntimeError) as exc:  # closed, or a fatal error
                logger.warning("vector replica stopped reading: %s", exc)
                room.release()
                return
            for message in got:
                error = message.error()
                if error is None:
                    messages.append(message)
                else:
                    logger.warning("vector replica: %s", error)
        if not messages:
            room.release()
            return
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, messages)
        except RuntimeError:  # the loop is closed: the worker is stopping
            return


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
        self._consumer: Consumer | None = None
        #: Changelog records not yet read, from the reader's librdkafka statistics (log end
        #: minus the next offset to hand over, per partition); None until the first ones.
        self.lag: int | None = None
        # Checked once: a runtime protocol check costs tens of us, more than a record.
        self._upsert_many = service.upsert_many if isinstance(service, _BatchFeed) else None

    async def run(self) -> None:
        cfg = self.config
        # The saved index version the service warm-started from was built in some basis:
        # project the replayed states the same way, or queries would mix two bases.
        while not self.service.started:
            await asyncio.sleep(0.05)
        self.adopt_basis(self.service.primary.basis)
        # librdkafka reads and decodes the changelogs in its own threads and one thread of
        # ours waits on it: the event loop only applies whole batches (with aiokafka on the
        # loop, fetching and decoding these records cost as much as applying them).
        settings = {
            **librdkafka_settings(cfg.kafka),
            "group.id": f"{cfg.worker.app_id}-vector-replica",  # assigned, never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "logger": logger,
        }
        consumer = Consumer(
            {
                **settings,
                "fetch.wait.max.ms": 20,
                # The reader's lag comes from librdkafka's own figures, in its thread: a call
                # on the handle from the loop would wait for the reader's consume().
                "statistics.interval.ms": _STATS_INTERVAL_MS,
                "stats_cb": self._on_stats,
            }
        )
        # A second handle answers pings and log-end offsets: librdkafka holds metadata
        # requests on a handle while another thread waits in its consume().
        probe = Consumer(settings)
        self._consumer = probe
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[Message]] = asyncio.Queue()
        room = threading.BoundedSemaphore(_INBOX_BATCHES)
        stop = threading.Event()
        reader: threading.Thread | None = None
        try:
            partitions = await self._wait_for_partitions(probe)
            end = await loop.run_in_executor(None, _high_watermarks, probe, partitions)
            consumer.assign([KafkaPartition(t, p, OFFSET_BEGINNING) for t, p in partitions])
            pending = {tp for tp, high in end.items() if high > 0}
            self.caught_up = not pending
            reader = threading.Thread(
                target=_read_changelogs,
                args=(consumer, loop, inbox, room, stop),
                name="stream-knn-vector-replica",
                daemon=True,
            )
            reader.start()
            while True:
                batch = await inbox.get()
                room.release()
                while not inbox.empty():
                    batch.extend(inbox.get_nowait())
                    room.release()
                self.apply_many((m.topic() or "", m.key(), m.value()) for m in batch)
                if pending:
                    for m in batch:
                        tp = (m.topic(), m.partition())
                        if tp in pending and (m.offset() or 0) + 1 >= end[tp]:
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
            stop.set()
            if reader is not None:
                await loop.run_in_executor(None, reader.join, 10.0)
            consumer.close()
            probe.close()

    async def ping(self) -> bool | None:
        """True when the broker answered a metadata request just now; None before the
        replica's consumer has started (nothing to say yet)."""
        consumer = self._consumer
        if consumer is None:
            return None
        timeout = self.config.worker.broker_timeout_seconds
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: consumer.list_topics(timeout=timeout)
            )
        except KafkaException as exc:
            logger.debug("broker ping failed: %s", exc)
            return False
        return True

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Log-end offsets of ``partitions`` (for the consumer-lag gauge)."""
        consumer = self._consumer
        if consumer is None or not partitions:
            return {}
        try:
            ends = await asyncio.get_running_loop().run_in_executor(
                None, _high_watermarks, consumer, [(tp.topic, tp.partition) for tp in partitions]
            )
        except KafkaException as exc:
            logger.debug("log-end offsets not read: %s", exc)
            return {}
        return {TopicPartition(t, p): high for (t, p), high in ends.items()}

    def _on_stats(self, raw: str) -> None:
        """librdkafka's statistics of the reader (its thread): keep the summed lag."""
        try:
            stats = orjson.loads(raw)
            lag = 0
            for topic in stats.get("topics", {}).values():
                for number, part in topic.get("partitions", {}).items():
                    if number == "-1":  # librdkafka's internal unassigned partition
                        continue
                    high, next_offset = int(part["hi_offset"]), int(part["app_offset"])
                    if high >= 0:
                        lag += max(0, high - max(next_offset, 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            logger.debug("replica statistics not read: %s", exc)
            return
        self.lag = lag

    async def _wait_for_partitions(self, consumer: Consumer) -> list[tuple[str, int]]:
        # Faust creates the changelog topics when the app starts; wait until both exist.
        loop = asyncio.get_running_loop()
        topics = (self.behaviour_topic, self.content_topic)
        while True:
            found: list[tuple[str, int]] = []
            for topic in topics:
                try:
                    meta = await loop.run_in_executor(None, _list_topic, consumer, topic)
                except KafkaException as exc:
                    logger.debug("changelog %s not listed yet: %s", topic, exc)
                    break
                info = meta.topics.get(topic)
                if info is None or info.error is not None or not info.partitions:
                    break
                found.extend((topic, p) for p in sorted(info.partitions))
            else:
                return found
            await asyncio.sleep(0.5)

    def known_items(self) -> set[str]:
        return set(self.projector) | self.content.keys()

    def _blended(
        self, item_ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The indexed vectors of ``item_ids`` (rows) and which items have one."""
        behaviour, has_behaviour = self.projector.project_many(item_ids)
        n, dims = len(item_ids), self.config.model.dims
        content = np.zeros((n, dims), dtype=np.float32)
        has_content = np.zeros(n, dtype=np.bool_)
        for row, item_id in enumerate(item_ids):
            vector = self.content.get(item_id)
            if vector is not None:
                content[row] = vector
                has_content[row] = True
        return _blend_rows(
            behaviour, has_behaviour, content, has_content, self.config.model.catalog_weight
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
        ids = list(self.known_items())
        matrix, present = self._blended(ids)
        vectors = {ids[row]: matrix[row] for row in np.flatnonzero(present).tolist()}
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
        """Apply one changelog record (``value`` None is a tombstone); see :meth:`apply_many`."""
        self.apply_many(((topic, key, value),))

    def apply_many(self, records: Iterable[Record]) -> None:
        """Apply changelog records in order, then serve every item they touched at once.

        The states are decoded record by record; the touched items are projected in one
        matrix product, blended and upserted as one batch (items left without a vector
        are deleted). Behaviour records also carry the item's decayed event weight, which
        becomes its recent popularity: the same on every worker and after a restart.
        """
        touched: dict[str, None] = {}
        for topic, key, value in records:
            if key is not None:
                item_id = key.decode()
                if self._apply_state(topic, item_id, value):
                    touched[item_id] = None
        if not touched:
            return
        ids = list(touched)
        matrix, present = self._blended(ids)
        for row in np.flatnonzero(~present).tolist():
            self.service.delete(ids[row])
        rows = np.flatnonzero(present)
        if not len(rows):
            return
        kept = [ids[row] for row in rows.tolist()]
        if self._upsert_many is not None:
            self._upsert_many(kept, matrix[rows])
        else:
            # A service without a batch feed: its per-item upsert (one index update each).
            for item_id, vector in zip(kept, matrix[rows], strict=True):
                self.service.upsert(item_id, vector)

    def _apply_state(self, topic: str, item_id: str, value: bytes | None) -> bool:
        """Store one record's state of ``item_id``; False if it was unreadable (skipped)."""
        model = self.config.model
        behaviour = topic == self.behaviour_topic
        self.records += 1
        if value is None:
            if behaviour:
                self.projector.remove(item_id)
                self.service.popularity.remove(item_id)
            else:
                self.content.pop(item_id, None)
            return True
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
            return False
        return True
