"""The Faust wiring of a stream-knn worker: topics, tables, agents, timers and web pages.

This module only moves data between Kafka and the plain-Python core (events, embeddings,
index, serving); every decision is made there, so the offline replay runs the same code.

Data flow per worker (1..N processes in one consumer group ``worker.app_id``):

- ``user-events`` (key user_id) -> validate -> user profile table (RocksDB, changelog)
  -> re-key by item onto ``<app_id>-item-updates`` -> recommendation to ``recommendations``;
  bad records go to ``events-dlq`` with a reason;
- ``<app_id>-item-updates`` (key item_id) -> item vector table (RocksDB, changelog);
- ``item-catalog`` (key item_id) -> content vector table (RocksDB, changelog);
- every worker reads both vector changelogs in full (:mod:`stream_knn.worker.replica`) into
  its index manager, which rebuilds the index in the background;
- ``recommendation-requests`` -> answered on ``recommendations`` with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry

from stream_knn.config import Config
from stream_knn.embeddings.catalog import CatalogFeatures
from stream_knn.embeddings.codec import encode_vector
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState, RandomIndexing
from stream_knn.errors import DimensionError
from stream_knn.events.schema import (
    CatalogRecord,
    DlqRecord,
    Request,
    UserEvent,
    parse_catalog_record,
    parse_request,
    parse_user_event,
)
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.coalesce import EmitGate
from stream_knn.serving.service import RecommendationService
from stream_knn.worker.consumer import SeekSafeConsumer
from stream_knn.worker.output import OutputProducer
from stream_knn.worker.replica import VectorReplica
from stream_knn.worker.web import register_pages

__all__ = ["WorkerApp", "create_app"]

logger = logging.getLogger(__name__)

_LAST_LISTS = 200_000  # users whose last list is kept for the online hit rate
#: Micro-batch of an agent: Faust's per-event cost is fixed, table writes are coalesced.
_BATCH_EVENTS = 1000
_BATCH_SECONDS = 0.005
#: Replaced item states logged one by one before the log goes quiet about them.
_REPLACED_STATES_LOGGED = 20


@contextmanager
def _event_context(stream: Any, event: Any) -> Iterator[None]:
    """Make ``event`` the current event for table access inside a micro-batch.

    Faust's tables pick the partition store and the changelog partition of a key from the
    current event, which ``take_events`` batches do not set. The stream's own setter is the
    one Faust's iterator uses; the previous value is restored at once, synchronously, so
    the take buffer (which reads the stream's current event) never sees ours.
    """
    previous = stream.current_event
    stream._set_current_event(event)
    try:
        yield
    finally:
        stream._set_current_event(previous)


@lru_cache(maxsize=200_000)
def item_partition(item_id: str, partitions: int) -> int:
    """The partition of an item key, as Kafka's (and aiokafka's) default partitioner picks it."""
    hashed: int = murmur2(item_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


class _App(faust.App):
    """Faust's app with a consumer that keeps read offsets honest across seeks."""

    def _new_consumer(self) -> Any:
        return SeekSafeConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.loop,
        )


class WorkerApp:
    """A configured Faust app plus the core objects its agents feed."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        w, k = config.worker, config.kafka
        self.data_dir = Path(w.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        self.broker_ok_at = time.time()

        self.sketch = RandomIndexing(
            config.model.sketch_dims, config.model.seed, config.model.half_life_seconds
        )
        self.service = RecommendationService(config, self.data_dir / "index", self.metrics)
        self.replica = VectorReplica(config, self.service)
        self.last_lists: OrderedDict[str, frozenset[str]] = OrderedDict()
        self.gate: EmitGate[tuple[UserEvent, float]] = EmitGate(
            config.serving.emit_interval_seconds
        )
        #: Newest profile of users with a deferred emission (coalescing).
        self.latest_profiles: dict[str, UserProfile] = {}
        self.online_hits: dict[str, list[int]] = {}
        #: Stored item states of another layout replaced by fresh ones (see _stored_item).
        self.replaced_states = 0
        self.catalog_features = CatalogFeatures(
            config.model.dims, config.model.pca, config.model.pca_warmup_items, config.model.seed
        )

        app = _App(
            w.app_id,
            broker=f"kafka://{k.bootstrap_servers}",
            store="rocksdb://",
            datadir=str(self.data_dir / "faust"),
            web_enabled=True,
            web_host=w.web_host,
            web_port=w.web_port,
            web_bind=w.web_host,
            topic_partitions=w.partitions,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            key_serializer="raw",
            value_serializer="raw",
            producer_compression_type=None if k.compression == "none" else k.compression,
            producer_linger_ms=1,
            broker_commit_every=1000,
            broker_session_timeout=w.session_timeout_seconds,
            broker_heartbeat_interval=w.heartbeat_interval_seconds,
            broker_commit_interval=1.0,
            table_key_index_size=100_000,
            stream_wait_empty=False,
            loghandlers=[],
        )
        self.app = app
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.user_events = app.topic(k.user_events_topic, **raw)
        self.catalog = app.topic(k.item_catalog_topic, **raw)
        self.requests = app.topic(k.requests_topic, **raw)
        self.recommendations_topic = k.recommendations_topic
        self.dlq_topic = k.dlq_topic
        self.output = OutputProducer(k)
        self.item_updates = app.topic(
            f"{w.app_id}-item-updates", partitions=w.partitions, internal=True, **raw
        )
        table_opts: dict[str, Any] = {
            "partitions": w.partitions,
            "key_type": bytes,
            "value_type": bytes,
            "options": {"driver": "rocksdict"},
        }
        self.profiles = app.Table("user-profiles", default=None, **table_opts)
        self.items = app.Table("item-vectors", default=None, **table_opts)
        self.contents = app.Table("item-contents", default=None, **table_opts)

        app.agent(self.user_events, name="user-events")(self._on_user_events)
        app.agent(self.item_updates, name="item-updates")(self._on_item_updates)
        app.agent(self.catalog, name="item-catalog")(self._on_catalog)
        app.agent(self.requests, name="requests")(self._on_requests)
        app.task(self._run_replica)
        app.timer(1.0)(self._refresh_gauges)
        # Check the broker a few times per timeout so /health never flaps between checks.
        app.timer(min(2.0, w.broker_timeout_seconds / 3))(self._check_broker)
        if config.serving.emit_interval_seconds > 0:
            app.timer(min(0.1, config.serving.emit_interval_seconds / 2))(self._flush_coalesced)
        app.service(self.service)  # type: ignore[arg-type]
        register_pages(self)

    # -- helpers -------------------------------------------------------------------------

    async def _send_dlq(self, record: DlqRecord) -> None:
        self.metrics.dlq.labels(record.reason).inc()
        logger.warning(
            "dead-lettered %s[%s]@%s: %s (%s)",
            record.topic,
            record.partition,
            record.offset,
            record.reason,
            record.error,
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "key": record.key,
                "reason": record.reason,
            },
        )
        self.output.send(self.dlq_topic, record.key, record.to_value())

    def _note_online_hit(self, user_id: str, item_id: str, variant: str) -> None:
        last = self.last_lists.get(user_id)
        if last is None:
            return
        counts = self.online_hits.setdefault(variant, [0, 0])
        counts[0] += item_id in last
        counts[1] += 1

    def _remember_list(self, user_id: str, items: list[tuple[str, float]]) -> None:
        self.last_lists[user_id] = frozenset(item for item, _ in items)
        self.last_lists.move_to_end(user_id)
        if len(self.last_lists) > _LAST_LISTS:
            self.last_lists.popitem(last=False)

    # -- agents ----------------------------------------------------------------------------

    async def _on_user_events(self, stream: Any) -> None:
        """Micro-batches of user events: profiles written once per user per batch, item
        updates sent once per item partition per batch, one list per event (or coalesced)."""
        async for events in stream.take_events(_BATCH_EVENTS, within=_BATCH_SECONDS):
            # take_events acks the batch in a `finally`, also when the agent is cancelled
            # (shutdown, restart): finish the batch first so its outputs are sent before
            # its offsets can be committed.
            batch = asyncio.ensure_future(self._user_batch(stream, events))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                await batch
                raise

    async def _user_batch(self, stream: Any, events: list[Any]) -> None:
        cfg = self.config
        metrics = self.metrics
        started = time.perf_counter()
        valid: list[tuple[Any, UserEvent]] = []
        for event in events:
            message = event.message
            parsed = parse_user_event(
                event.value,
                config=cfg.events,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=event.key,
                broker_ts_ms=int(message.timestamp * 1000),
            )
            if isinstance(parsed, DlqRecord):
                metrics.events.labels("invalid", "dlq").inc()
                await self._send_dlq(parsed)
            else:
                valid.append((event, parsed))

        profiles: dict[str, UserProfile | None] = {}
        last_event: dict[str, Any] = {}
        item_updates: dict[str, tuple[list[str], list[float], list[int]]] = {}
        emissions: list[tuple[UserEvent, UserProfile, float]] = []
        deferred: set[str] = set()
        now = time.time()
        for event, ev in valid:
            user = ev.user_id
            if user not in profiles:
                with _event_context(stream, event):
                    raw = self.profiles.get(user.encode())
                profiles[user] = UserProfile.from_bytes(raw) if raw else None
            last_event[user] = event
            if ev.event_type == "forget":
                profiles[user] = None
                self.last_lists.pop(user, None)
                self.gate.drop(user)
                metrics.events.labels("forget", "ok").inc()
                continue
            assert ev.item_id is not None
            variant = self.service.assigner.assign(user)
            self._note_online_hit(user, ev.item_id, variant.name)
            profile = (profiles[user] or UserProfile()).add(
                ev.item_id,
                ev.ts_ms,
                ev.weight,
                cfg.model.profile_max_items,
                cfg.model.profile_half_life_seconds,
            )
            profiles[user] = profile
            self.service.observe(ev)
            users, weights, times = item_updates.setdefault(ev.item_id, ([], [], []))
            users.append(user)
            weights.append(ev.weight)
            times.append(ev.ts_ms)
            metrics.events.labels(ev.event_type, "ok").inc()
            if self.gate.offer(user, (ev, event.message.timestamp), now):
                emissions.append((ev, profile, event.message.timestamp))
            else:
                deferred.add(user)

        # One table write per user per batch, in the partition of that user's events.
        for user, maybe_profile in profiles.items():
            with _event_context(stream, last_event[user]):
                if maybe_profile is None:
                    self.profiles.pop(user.encode(), None)
                else:
                    self.profiles[user.encode()] = maybe_profile.to_bytes()
            if maybe_profile is not None and user in deferred:
                self.latest_profiles[user] = maybe_profile
            else:
                self.latest_profiles.pop(user, None)
        await self._send_item_updates(item_updates)
        for ev, profile, produced_s in emissions:
            await self._emit(ev, profile, produced_s)
        # Delivered before take_events acks the batch: at least once.
        await self.output.flush()
        if valid:
            metrics.processing_latency.observe((time.perf_counter() - started) / len(valid))

    async def _send_item_updates(
        self, updates: dict[str, tuple[list[str], list[float], list[int]]]
    ) -> None:
        """Re-key by item: one record per item partition carrying that partition's items."""
        n = self.config.worker.partitions
        by_partition: dict[int, dict[str, tuple[list[str], list[float], list[int]]]] = {}
        for item_id, update in updates.items():
            by_partition.setdefault(item_partition(item_id, n), {})[item_id] = update
        for partition, items in by_partition.items():
            first = next(iter(items))
            await self.item_updates.send(
                key=first.encode(), value=orjson.dumps(items), partition=partition
            )

    async def _emit(self, ev: UserEvent, profile: UserProfile, produced_s: float) -> None:
        variant = self.service.assigner.assign(ev.user_id)
        rec = self.service.recommend(
            ev.user_id, profile, variant.k, ev.ts_ms, exclude=(ev.item_id or "",), variant=variant
        )
        emitted_ms = int(time.time() * 1000)
        record: dict[str, Any] = {
            "user_id": ev.user_id,
            "items": [{"item_id": i, "score": round(s, 6)} for i, s in rec.items],
            "k": variant.k,
            "index_version": rec.index_version,
            "variant": variant.name,
            "trigger": "event",
            "event_id": ev.event_id,
            "event_ts": ev.ts_ms,
            "emitted_ts": emitted_ms,
        }
        if rec.fallback:
            record["fallback"] = rec.fallback
        self.output.send(self.recommendations_topic, ev.user_id.encode(), orjson.dumps(record))
        self._remember_list(ev.user_id, rec.items)
        self.metrics.recommendations.labels(variant.name, "event").inc()
        self.metrics.end_to_end_latency.observe(max(0.0, emitted_ms / 1000.0 - produced_s))

    async def _flush_coalesced(self) -> None:
        """Emit the newest list of every user whose coalescing interval has passed."""
        for user, (ev, produced_s) in self.gate.due(time.time()):
            profile = self.latest_profiles.pop(user, None)
            if profile is not None:
                await self._emit(ev, profile, produced_s)
        await self.output.flush()

    async def _on_item_updates(self, stream: Any) -> None:
        """Apply item updates, one table read and write per item per batch."""
        sketch_dims = self.config.model.sketch_dims
        async for events in stream.take_events(_BATCH_EVENTS, within=_BATCH_SECONDS):
            merged: dict[str, tuple[list[str], list[float], list[int]]] = {}
            deleted: set[str] = set()
            last_event: dict[str, Any] = {}
            for event in events:
                for item_id, update in orjson.loads(event.value).items():
                    last_event[item_id] = event
                    if update is None:  # a catalog delete
                        deleted.add(item_id)
                        merged.pop(item_id, None)
                        continue
                    deleted.discard(item_id)
                    users, weights, times = merged.setdefault(item_id, ([], [], []))
                    users.extend(update[0])
                    weights.extend(update[1])
                    times.extend(update[2])
            for item_id in deleted:
                with _event_context(stream, last_event[item_id]):
                    self.items.pop(item_id.encode(), None)
            for item_id, (users, weights, times) in merged.items():
                key = item_id.encode()
                with _event_context(stream, last_event[item_id]):
                    raw = self.items.get(key)
                    state = self._stored_item(item_id, raw, sketch_dims)
                    state = self.sketch.update_many(state, users, weights, times)
                    self.items[key] = state.to_bytes()

    def _stored_item(self, item_id: str, raw: bytes | None, sketch_dims: int) -> ItemState | None:
        """The item's stored state; None (learn afresh) for one of another layout.

        A state written with another ``model.sketch_dims`` (or by a release that stored
        64-wide states) cannot be converted: the item starts over from this update on,
        logged, instead of stopping the item agent on every update of it.
        """
        if not raw:
            return None
        try:
            return ItemState.from_bytes(raw, sketch_dims)
        except DimensionError as exc:
            self.replaced_states += 1
            if self.replaced_states <= _REPLACED_STATES_LOGGED:
                logger.error(
                    "item %s: %s; its state is learned afresh (set model.sketch_dims to the "
                    "width the table was written with to keep it)",
                    item_id,
                    exc,
                )
            return None

    async def _on_catalog(self, stream: Any) -> None:
        dims = self.config.model.dims
        async for event in stream.events():
            message = event.message
            parsed = parse_catalog_record(
                event.value,
                config=self.config.events,
                dims=dims,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=event.key,
            )
            if isinstance(parsed, DlqRecord):
                self.metrics.catalog.labels("dlq").inc()
                await self._send_dlq(parsed)
                await self.output.flush()
                continue
            await self._apply_catalog(parsed)

    async def _apply_catalog(self, record: CatalogRecord) -> None:
        key = record.item_id.encode()
        if record.deleted:
            self.contents.pop(key, None)
            await self.item_updates.send(
                key=key,
                value=orjson.dumps({record.item_id: None}),
                partition=item_partition(record.item_id, self.config.worker.partitions),
            )
            self.service.forget_item(record.item_id)
            self.metrics.catalog.labels("delete").inc()
            return
        content = self.catalog_features.content_vector(record.vector, record.features, learn=True)
        if content is None:
            self.metrics.catalog.labels("empty").inc()
            return
        self.contents[key] = encode_vector(content)
        self.metrics.catalog.labels("upsert").inc()

    async def _on_requests(self, stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            parsed = parse_request(
                event.value,
                config=self.config.events,
                max_k=self.config.serving.max_k,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=event.key,
            )
            if isinstance(parsed, DlqRecord):
                await self._send_dlq(parsed)
                await self.output.flush()
                continue
            await self._answer_request(parsed)

    async def _answer_request(self, req: Request) -> None:
        now_ms = int(time.time() * 1000)
        body = self.answer(req.user_id, req.item_id, req.k, now_ms, trigger="request")
        body["request_id"] = req.request_id
        key = (req.user_id or req.item_id or "").encode()
        self.output.send(self.recommendations_topic, key, orjson.dumps(body))
        await self.output.flush()

    def answer(
        self, user_id: str | None, item_id: str | None, k: int | None, now_ms: int, trigger: str
    ) -> dict[str, Any]:
        """The JSON body of an on-demand answer (Kafka request or HTTP)."""
        profile = None
        if user_id is not None:
            raw_profile = self.profiles.get(user_id.encode())
            profile = UserProfile.from_bytes(raw_profile) if raw_profile else None
        return self.service.answer(
            user_id=user_id, profile=profile, item_id=item_id, k=k, now_ms=now_ms, trigger=trigger
        )

    # -- background ------------------------------------------------------------------------

    async def _run_replica(self) -> None:
        await self.replica.run()

    async def _refresh_gauges(self) -> None:
        self.service.refresh_gauges()
        for variant, (hits, total) in self.online_hits.items():
            if total:
                self.metrics.online_hit_rate.labels(variant).set(hits / total)

    async def _check_broker(self) -> None:
        """Keep /health's broker clock and the consumer-lag gauges current."""
        try:
            ok = await asyncio.wait_for(
                self.replica.ping(), timeout=self.config.worker.broker_timeout_seconds
            )
        except TimeoutError:
            ok = False
        if ok is None:
            # Still starting: the broker answered the app's own start-up; not silence.
            self.broker_ok_at = time.time()
            return
        if not ok:
            return
        self.broker_ok_at = time.time()
        consumer = self.app.consumer
        inputs = {
            self.user_events.get_topic_name(),
            self.catalog.get_topic_name(),
            self.requests.get_topic_name(),
        }
        assigned = [tp for tp in consumer.assignment() if tp.topic in inputs]
        ends = await self.replica.end_offsets(
            [TopicPartition(tp.topic, tp.partition) for tp in assigned]
        )
        for tp in assigned:
            position = await consumer.position(tp)
            end = ends.get(TopicPartition(tp.topic, tp.partition))
            if position is not None and end is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, end - position)
                )

    # -- status ----------------------------------------------------------------------------

    def is_ready(self) -> tuple[bool, str]:
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        if not recovery.completed.is_set():
            return False, "table recovery in progress"
        if not self.replica.caught_up:
            return False, "item vectors not yet replicated"
        return True, "serving" if self.service.has_index else "serving popularity fallback"


def create_app(config: Config, registry: CollectorRegistry | None = None) -> WorkerApp:
    """Build the worker's Faust app from ``config``."""
    return WorkerApp(config, registry)
