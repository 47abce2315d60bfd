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
from pathlib import Path
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from stream_knn.config import Config
from stream_knn.embeddings.catalog import CatalogFeatures
from stream_knn.embeddings.codec import encode_vector
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState, RandomIndexing
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
from stream_knn.serving.service import RecommendationService
from stream_knn.worker.replica import VectorReplica
from stream_knn.worker.web import register_pages

__all__ = ["WorkerApp", "create_app"]

logger = logging.getLogger(__name__)

_LAST_LISTS = 200_000  # users whose last list is kept for the online hit rate


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
            config.model.dims, config.model.seed, config.model.half_life_seconds
        )
        self.service = RecommendationService(config, self.data_dir / "index", self.metrics)
        self.replica = VectorReplica(self)
        self.last_lists: OrderedDict[str, frozenset[str]] = OrderedDict()
        self.online_hits: dict[str, list[int]] = {}
        self.catalog_features = CatalogFeatures(
            config.model.dims, config.model.pca, config.model.pca_warmup_items, config.model.seed
        )

        app = faust.App(
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
        self.recommendations = app.topic(k.recommendations_topic, **raw)
        self.dlq = app.topic(k.dlq_topic, **raw)
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
        app.timer(2.0)(self._check_broker)
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
        await self.dlq.send(key=record.key, value=record.to_value())

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
        cfg = self.config
        metrics = self.metrics
        async for event in stream.events():
            started = time.perf_counter()
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
                continue
            await self._apply_user_event(parsed, message.timestamp, started)

    async def _apply_user_event(self, ev: UserEvent, produced_s: float, started: float) -> None:
        cfg = self.config
        user_key = ev.user_id.encode()
        if ev.event_type == "forget":
            self.profiles.pop(user_key, None)
            self.last_lists.pop(ev.user_id, None)
            self.metrics.events.labels("forget", "ok").inc()
            return
        assert ev.item_id is not None
        raw_profile = self.profiles.get(user_key)
        profile = UserProfile.from_bytes(raw_profile) if raw_profile else UserProfile()
        variant = self.service.assigner.assign(ev.user_id)
        self._note_online_hit(ev.user_id, ev.item_id, variant.name)
        profile = profile.add(
            ev.item_id,
            ev.ts_ms,
            ev.weight,
            cfg.model.profile_max_items,
            cfg.model.profile_half_life_seconds,
        )
        self.profiles[user_key] = profile.to_bytes()
        self.service.observe(ev)
        await self.item_updates.send(
            key=ev.item_id.encode(),
            value=orjson.dumps({"u": ev.user_id, "w": ev.weight, "t": ev.ts_ms}),
        )
        self.metrics.events.labels(ev.event_type, "ok").inc()
        rec = self.service.recommend(
            ev.user_id, profile, variant.k, ev.ts_ms, exclude=(ev.item_id,), variant=variant
        )
        emitted_ms = int(time.time() * 1000)
        record = {
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
        await self.recommendations.send(key=ev.user_id.encode(), value=orjson.dumps(record))
        self._remember_list(ev.user_id, rec.items)
        self.metrics.recommendations.labels(variant.name, "event").inc()
        self.metrics.processing_latency.observe(time.perf_counter() - started)
        self.metrics.end_to_end_latency.observe(max(0.0, emitted_ms / 1000.0 - produced_s))

    async def _on_item_updates(self, stream: Any) -> None:
        dims = self.config.model.dims
        async for event in stream.events():
            item_key: bytes = event.key
            update = orjson.loads(event.value)
            if update.get("d"):
                self.items.pop(item_key, None)
                continue
            raw_state = self.items.get(item_key)
            state = ItemState.from_bytes(raw_state, dims) if raw_state else None
            state = self.sketch.update(state, update["u"], float(update["w"]), int(update["t"]))
            self.items[item_key] = state.to_bytes()

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
                continue
            await self._apply_catalog(parsed)

    async def _apply_catalog(self, record: CatalogRecord) -> None:
        key = record.item_id.encode()
        if record.deleted:
            self.contents.pop(key, None)
            await self.item_updates.send(key=key, value=orjson.dumps({"d": True}))
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
                continue
            await self._answer_request(parsed)

    async def _answer_request(self, req: Request) -> None:
        now_ms = int(time.time() * 1000)
        body = self.answer(req.user_id, req.item_id, req.k, now_ms, trigger="request")
        body["request_id"] = req.request_id
        key = (req.user_id or req.item_id or "").encode()
        await self.recommendations.send(key=key, value=orjson.dumps(body))

    def answer(
        self, user_id: str | None, item_id: str | None, k: int | None, now_ms: int, trigger: str
    ) -> dict[str, Any]:
        """The JSON body of an on-demand answer (Kafka request or HTTP)."""
        if user_id is not None:
            variant = self.service.assigner.assign(user_id)
            kk = k or variant.k
            raw_profile = self.profiles.get(user_id.encode())
            profile = UserProfile.from_bytes(raw_profile) if raw_profile else None
            rec = self.service.recommend(user_id, profile, kk, now_ms, variant=variant)
            body: dict[str, Any] = {"user_id": user_id, "variant": variant.name}
            if profile is None:
                body["cold_start"] = True
        else:
            assert item_id is not None
            variant = self.service.assigner.variants[0]
            kk = k or variant.k
            found = self.service.similar(item_id, kk, variant=variant)
            if found is None:
                return {"item_id": item_id, "error": "unknown item", "items": [], "k": kk}
            rec = found
            body = {"item_id": item_id, "variant": variant.name}
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
        self.metrics.recommendations.labels(variant.name, trigger).inc()
        return body

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
            ok = await asyncio.wait_for(self.replica.ping(), timeout=5.0)
        except TimeoutError:
            ok = False
        if ok:
            self.broker_ok_at = time.time()
        else:
            return
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
