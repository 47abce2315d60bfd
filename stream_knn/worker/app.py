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
import dataclasses
import gc
import logging
import math
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from faust.types import TP
from prometheus_client import CollectorRegistry

from stream_knn.config import Config
from stream_knn.core.batch import (
    ItemEvents,
    learn_item_events,
    learn_user_events,
    merge_item_events,
)
from stream_knn.embeddings.catalog import CatalogFeatures
from stream_knn.embeddings.codec import encode_vector
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState, RandomIndexing
from stream_knn.errors import DimensionError
from stream_knn.events.producer import TokenBucket
from stream_knn.events.pseudonym import pseudonymiser_for
from stream_knn.events.schema import (
    CatalogRecord,
    DlqRecord,
    Request,
    UserEvent,
    parse_catalog_record,
    parse_request,
    parse_user_event,
)
from stream_knn.kafka import faust_settings
from stream_knn.logs import RecentProblems
from stream_knn.metrics.history import MetricHistory, read_registry
from stream_knn.metrics.registry import Metrics, observe_many
from stream_knn.metrics.resources import index_version_sizes, table_sizes
from stream_knn.serving.coalesce import EmitGate
from stream_knn.serving.recommender import ListRequest, Recommendation
from stream_knn.serving.service import RecommendationService
from stream_knn.worker.catalog_owner import (
    STATE_KEY,
    forwarded,
    read_forwarded,
    read_last_state,
    state_record,
)
from stream_knn.worker.consumer import BatchMessage, SeekSafeConsumer
from stream_knn.worker.output import OutputProducer
from stream_knn.worker.ownership import UserPartitions
from stream_knn.worker.replica import VectorReplica
from stream_knn.worker.tables import BatchTable
from stream_knn.worker.web import register_pages

__all__ = ["HISTORY_INTERVAL_SECONDS", "WorkerApp", "create_app", "history_sample"]

logger = logging.getLogger(__name__)

_LAST_LISTS = 200_000  # users whose last list is kept for the online hit rate
#: Fetched partition batches waiting for the batch handler before the agent stops taking
#: more from Faust (back pressure).
_INBOX_BATCHES = 256
#: Events learned and answered in one synchronous pass of the batch core.
_CHUNK_EVENTS = 500
#: How old the consumer's cluster metadata may get before it is fetched again, ms.
_METADATA_MAX_AGE_MS = 5_000
#: Replaced item states logged one by one before the log goes quiet about them.
_REPLACED_STATES_LOGGED = 20
#: The dashboard's ring of samples: one every this many seconds, this many kept (5 min).
HISTORY_INTERVAL_SECONDS = 2.0
_HISTORY_SAMPLES = 150
#: Disk sizes and the replica's lag are read this often (walks of the state directories).
_RESOURCES_INTERVAL_SECONDS = 5.0


@lru_cache(maxsize=200_000)
def item_partition(item_id: str, partitions: int) -> int:
    """The partition of an item key, as Kafka's (and aiokafka's) default partitioner picks it."""
    hashed: int = murmur2(item_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


#: A list to send: the event it answers, the profile it is built from, when the event was
#: produced (broker timestamp, s).
_Due = tuple[UserEvent, UserProfile, float]


def _list_record(
    ev: UserEvent, k: int, variant: str, rec: Recommendation, emitted_ms: int, worker: str
) -> bytes:
    """The ``recommendations`` record of a list sent for event ``ev``."""
    record: dict[str, Any] = {
        "user_id": ev.output_user_id,
        # Six decimals: floor(x + 0.5) of the scaled score, a third of round(s, 6)'s cost
        # (the division by 1e6 gives the double nearest the six-decimal number).
        "items": [{"item_id": i, "score": math.floor(s * 1e6 + 0.5) / 1e6} for i, s in rec.items],
        "k": k,
        "index_version": rec.index_version,
        "variant": variant,
        "trigger": "event",
        "event_id": ev.event_id,
        "event_ts": ev.ts_ms,
        "emitted_ts": emitted_ms,
        "worker": worker,
    }
    if rec.fallback:
        record["fallback"] = rec.fallback
    return orjson.dumps(record)


class _BatchLoop:
    """Hands fetched batches to ``handle`` as they come, acknowledged once they are done.

    Each Faust event is one fetched partition batch. While ``handle`` works on some, the
    next ones gather in an inbox; the next call takes all of them at once (one pass of the
    core, one RocksDB write batch per partition, one output flush), with no waiting for a
    batch to fill. ``handle`` returns after the outputs are delivered, and only then are
    the events acknowledged (at least once): a failure leaves them unacknowledged, so the
    committed offset stays before them until they are consumed again. A handler that still
    owes outputs for a batch (deferred lists) returns a future instead; batches are
    acknowledged strictly in the order they were handled, so a later batch of the same
    partition never moves the commit past one that waits.
    """

    def __init__(
        self, handle: Callable[[list[BatchMessage]], Awaitable[asyncio.Future[None] | None]]
    ) -> None:
        self.handle = handle
        self.inbox: list[Any] = []
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        #: Set while no batch is in the handler's hands.
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False
        #: While set (a rebalance), fetched batches are left unacknowledged, not handled.
        self.paused = False
        #: Handled batches not yet acknowledged, oldest first, with what they wait for.
        self._unacked: deque[tuple[list[Any], asyncio.Future[None] | None]] = deque()
        self._runner: asyncio.Future[None] | None = None

    async def run(self, stream: Any) -> None:
        """The agent's body: take Faust's events into the inbox (back pressure past
        :data:`_INBOX_BATCHES`) while the handler works through it."""
        runner = self._runner = asyncio.ensure_future(self._handle_all())
        try:
            async for event in stream.noack().events():
                if runner.done():
                    runner.result()  # raises what stopped it
                    raise RuntimeError("the batch handler stopped")
                if self.stopping or self.paused:
                    continue  # left unacknowledged: consumed again from the committed offset
                self.inbox.append(event)
                self.arrived.set()
                if len(self.inbox) >= _INBOX_BATCHES:
                    self.room.clear()
                    await self.room.wait()
        finally:
            await self.drain()
            if not runner.cancelled() and runner.exception() is not None:
                logger.error("batch handler failed: %r", runner.exception())

    async def pause(self) -> None:
        """Stop handling (a rebalance): the inbox is dropped unacknowledged, the batch in
        hand finishes; :meth:`resume` takes batches again."""
        self.paused = True
        self.inbox = []
        self.room.set()
        await self.idle.wait()

    def resume(self) -> None:
        self.paused = False

    async def drain(self) -> None:
        """Stop taking batches: the one in hand finishes, is delivered and acknowledged
        (nothing of it is sent twice); the inbox stays unacknowledged."""
        self.stopping = True
        self.arrived.set()
        self.room.set()
        runner = self._runner
        if runner is not None and not runner.done():
            await asyncio.shield(runner)

    async def _handle_all(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            if self.stopping:
                return
            events, self.inbox = self.inbox, []
            self.room.set()
            if not events:
                continue
            self.idle.clear()
            try:
                held = await self.handle([event.message for event in events])
            finally:
                self.idle.set()
            self._unacked.append((events, held))
            if held is not None:
                held.add_done_callback(self._ack_ready)
            self._ack_ready()

    def _ack_ready(self, _: object = None) -> None:
        """Acknowledge the handled batches at the head of the queue that owe nothing."""
        unacked = self._unacked
        while unacked:
            events, held = unacked[0]
            if held is not None and not (held.done() and held.exception() is None):
                return
            unacked.popleft()
            for event in events:
                event.ack()


class _App(faust.App):
    """Faust's app with a consumer that keeps read offsets honest across seeks and hands
    over the topics of ``batch_topics`` one fetched partition batch at a time."""

    batch_topics: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The agents' batch loops, drained before the consumer's last commit.
        self.batch_loops: set[_BatchLoop] = set()
        #: Delivers what the worker still owes for the partitions it holds (deferred lists)
        #: and drops the process state of users whose partitions moved away; set by
        #: :class:`WorkerApp`.
        self.settle: Callable[[set[TP]], Awaitable[None]] | None = None
        self.keep_only: Callable[[set[TP]], None] | None = None

    async def _stop_consumer(self) -> None:
        # Faust commits the acknowledged offsets when the consumer stops, without waiting
        # for the agents (stream_wait_empty is off: a batch loop's inbox is never empty).
        # The batches in hand finish first, so what they applied is committed with them,
        # and so do the lists they deferred.
        for loop in list(self.batch_loops):
            await loop.drain()
        if self.settle is not None:
            await self.settle(set())
        await super()._stop_consumer()

    async def _on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Before Faust's own handling (which commits and may close the revoked stores): no
        # batch is handled from here to the next assignment, the batch in hand finishes,
        # and every deferred list leaves while this worker still owns its user.
        if not self.should_stop:
            for loop in list(self.batch_loops):
                await loop.pause()
            if self.settle is not None:
                await self.settle(revoked)
        await super()._on_partitions_revoked(revoked)

    async def _on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        if self.keep_only is not None:
            self.keep_only(assigned)
        await super()._on_partitions_assigned(assigned, generation_id)
        for loop in list(self.batch_loops):
            loop.resume()

    def _new_consumer(self) -> Any:
        return SeekSafeConsumer(
            self.transport,
            batch_topics=self.batch_topics,
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
        self.metrics = Metrics(self.registry, [v.name for v in config.serving.variants])
        w, k = config.worker, config.kafka
        self.data_dir = Path(w.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        #: Named in every list and answer: which worker computed it (host and web port).
        self.worker_id = f"{socket.gethostname()}:{w.web_port}"
        self.broker_ok_at = time.time()

        self.sketch = RandomIndexing(
            config.model.sketch_dims, config.model.seed, config.model.half_life_seconds
        )
        self.service = RecommendationService(config, self.data_dir / "index", self.metrics)
        #: Self-tuning samples a second, at most (see serving.tuning_max_samples_per_second).
        rate = config.serving.tuning_max_samples_per_second
        self.tuning_budget = TokenBucket(rate, capacity=rate)
        self.replica = VectorReplica(config, self.service)
        #: Pseudonyms of user ids (``privacy.pseudonymise_user_ids``), or None.
        self.pseudonymiser = pseudonymiser_for(config.privacy)
        if self.pseudonymiser is not None and config.events.dlq_raw == "full":
            logger.warning(
                "user ids are pseudonymised but dead letters keep raw values, ids included "
                "(events.dlq_raw = 'full'); set it to 'truncated' or 'none'"
            )
        #: Last list per user, as a tuple of ids: a tuple of strings leaves the garbage
        #: collector's tracking, a set never does (200k of them made every full collection
        #: longer).
        self.last_lists: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        #: Whether the start-up heap was moved out of the collector's view (see
        #: :meth:`_refresh_gauges`).
        self._heap_frozen = False
        self.gate: EmitGate[tuple[UserEvent, float]] = EmitGate(
            config.serving.emit_interval_seconds
        )
        #: Newest profile of users with a deferred emission (coalescing).
        self.latest_profiles: dict[str, UserProfile] = {}
        #: Batches that deferred lists, acknowledged once those lists are delivered: the
        #: time by which every list they deferred is due, and the future to resolve then.
        self._held: list[tuple[float, asyncio.Future[None]]] = []
        #: Whether the chunks of the batch being handled deferred any list.
        self._deferred_any = False
        #: The input partition of each user with state above, dropped when it moves away.
        self.user_partitions = UserPartitions(self._has_user_state)
        self.online_hits: dict[str, list[int]] = {}
        #: Stored item states of another layout replaced by fresh ones (see _stored_item).
        self.replaced_states = 0
        self.catalog_features = self._fresh_catalog_features()
        #: The last warnings and errors logged (dashboard, ``stream-knn status``).
        self.problems = RecentProblems().attach()
        #: Rates and latency percentiles of the last minutes, for the dashboard page.
        self.history = MetricHistory(
            self.metrics.end_to_end_latency._upper_bounds, _HISTORY_SAMPLES
        )
        #: Broker timestamp (s) of the last record consumed from each input partition.
        self.last_consumed: dict[tuple[str, int], float] = {}

        app = _App(
            w.app_id,
            **faust_settings(k),
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
            # The worker creates its internal topic (item updates) as it starts, and the
            # group can form before the broker's metadata lists it: the topic is then left
            # out of the assignment until the next metadata refresh, whose change makes the
            # consumer rejoin. Faust refreshes every 5 minutes; here every 5 seconds.
            consumer_metadata_max_age_ms=_METADATA_MAX_AGE_MS,
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
        #: The catalog's single owner (see :mod:`stream_knn.worker.catalog_owner`).
        self.catalog_ordered = app.topic(
            f"{w.app_id}-catalog-ordered", partitions=1, internal=True, **raw
        )
        self.catalog_state_topic = app.topic(
            f"{w.app_id}-catalog-features", partitions=1, internal=True, compacting=True, **raw
        )
        #: Ordered offset the catalog statistics cover; None until loaded by this owner.
        self._catalog_covered: int | None = None
        self.profiles = app.Table("user-profiles", default=None, **table_opts)
        self.items = app.Table("item-vectors", default=None, **table_opts)
        self.contents = app.Table("item-contents", default=None, **table_opts)
        # Profiles and item states are written in batches past Faust's per-key path.
        self.profile_store = BatchTable(self.profiles, self.output)
        self.item_store = BatchTable(self.items, self.output)
        self.content_store = BatchTable(self.contents, self.output)
        app.batch_topics = frozenset(
            {self.user_events.get_topic_name(), self.item_updates.get_topic_name()}
        )
        app.settle = self._settle
        app.keep_only = self._keep_only

        app.agent(self.user_events, name="user-events")(self._on_user_events)
        app.agent(self.item_updates, name="item-updates")(self._on_item_updates)
        app.agent(self.catalog, name="item-catalog")(self._on_catalog)
        app.agent(self.catalog_ordered, name="catalog-ordered")(self._on_catalog_ordered)
        app.agent(self.requests, name="requests")(self._on_requests)
        app.task(self._run_replica)
        app.timer(1.0)(self._refresh_gauges)
        app.timer(HISTORY_INTERVAL_SECONDS)(self._sample_history)
        app.timer(_RESOURCES_INTERVAL_SECONDS)(self._refresh_resources)
        # Check the broker a few times per timeout so /health never flaps between checks.
        app.timer(min(2.0, w.broker_timeout_seconds / 3))(self._check_broker)
        if config.serving.emit_interval_seconds > 0:
            app.timer(min(0.1, config.serving.emit_interval_seconds / 2))(self._flush_coalesced)
        app.service(self.service)  # type: ignore[arg-type]
        register_pages(self)

    # -- helpers -------------------------------------------------------------------------

    def _send_dlq(self, record: DlqRecord) -> None:
        if (
            self.pseudonymiser is not None
            and record.key
            and record.topic in (self.user_events.get_topic_name(), self.requests.get_topic_name())
        ):
            # Keyed by user id: the dead letter (and the log line) carry its pseudonym.
            record = dataclasses.replace(
                record, key=self.pseudonymiser.of_bytes(record.key).encode()
            )
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
        self.output.send(self.dlq_topic, record.key, record.to_value(self.config.events.dlq_raw))

    def _note_online_hit(self, user_id: str, item_id: str, variant: str) -> None:
        last = self.last_lists.get(user_id)
        if last is None:
            return
        counts = self.online_hits.setdefault(variant, [0, 0])
        counts[0] += item_id in last
        counts[1] += 1

    def _remember_list(self, user_id: str, items: list[tuple[str, float]]) -> None:
        self.last_lists[user_id] = tuple(item for item, _ in items)
        self.last_lists.move_to_end(user_id)
        if len(self.last_lists) > _LAST_LISTS:
            self.last_lists.popitem(last=False)

    # -- agents ----------------------------------------------------------------------------

    async def _on_user_events(self, stream: Any) -> None:
        """Whole fetched batches of user events through the batch core: profiles written
        once per user per batch, item updates sent once per item partition per batch, one
        list per event (or coalesced)."""
        await self._consume_batches(stream, self._user_batch)

    async def _consume_batches(
        self,
        stream: Any,
        handle: Callable[[list[BatchMessage]], Awaitable[asyncio.Future[None] | None]],
    ) -> None:
        loop = _BatchLoop(handle)
        self.app.batch_loops.add(loop)
        try:
            await loop.run(stream)
        finally:
            self.app.batch_loops.discard(loop)

    def _parse_user_records(
        self, messages: list[BatchMessage]
    ) -> tuple[list[tuple[int, float, UserEvent]], list[DlqRecord]]:
        cfg = self.config.events
        pseudonym = None if self.pseudonymiser is None else self.pseudonymiser.pseudonym
        valid: list[tuple[int, float, UserEvent]] = []
        bad: list[DlqRecord] = []
        for message in messages:
            for record in message.records:
                parsed = parse_user_event(
                    record.value,
                    config=cfg,
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    key=record.key,
                    broker_ts_ms=record.timestamp,
                    pseudonym=pseudonym,
                )
                if isinstance(parsed, DlqRecord):
                    bad.append(parsed)
                else:
                    valid.append((record.partition, record.timestamp / 1000.0, parsed))
        return valid, bad

    async def _user_batch(self, messages: list[BatchMessage]) -> asyncio.Future[None] | None:
        metrics = self.metrics
        last_consumed = self.last_consumed
        for message in messages:
            if message.records:
                last_consumed[(message.topic, message.partition)] = (
                    message.records[-1].timestamp / 1000.0
                )
        valid, bad = self._parse_user_records(messages)
        if bad:
            metrics.events.labels("invalid", "dlq").inc(len(bad))
            for record in bad:
                self._send_dlq(record)
        # A backlog arrives in fetches of thousands: the core takes them in chunks, with
        # the event loop free in between (heartbeats, HTTP, timers).
        for start in range(0, len(valid), _CHUNK_EVENTS):
            if start:
                await asyncio.sleep(0)
            self._user_chunk(valid[start : start + _CHUNK_EVENTS])
        # Delivered before the batch is acknowledged: at least once.
        await self.output.flush()
        self.profile_store.persist_offsets()
        if not self._deferred_any:
            return None
        # Lists deferred by the gate: the batch is acknowledged once they are delivered,
        # by the coalescing timer's flush after every one of them is due.
        self._deferred_any = False
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append((time.time() + self.gate.interval, held))
        return held

    def _user_chunk(self, valid: list[tuple[int, float, UserEvent]]) -> None:
        """Learn a chunk of valid events, write its state, send its item updates and lists."""
        metrics = self.metrics
        started = time.perf_counter()
        # Stored profiles of the chunk's users: one multi-get per partition.
        partition_of: dict[str, int] = {}
        counts: Counter[str] = Counter()
        for partition, _, ev in valid:
            partition_of[ev.user_id] = partition
            counts[ev.event_type] += 1
        self.user_partitions.note(partition_of)
        stored = self._read_profiles(partition_of)
        learned = learn_user_events((ev for _, _, ev in valid), stored, self.config.model)

        if learned.forgotten:
            self._forget_users(learned.forgotten, [ev for _, _, ev in valid])
        assign = self.service.assigner.assign
        observe = self.service.observe
        offer = self.gate.offer
        now = time.time()
        due: list[_Due] = []
        #: Per user, the profile its deferred (coalesced) list will be built from, if any.
        deferred: dict[str, UserProfile | None] = {}
        tuner = self.service.tuner
        #: Self-tuning samples: the user's profile before the event, and the event's item.
        samples: list[tuple[ListRequest, str]] = []
        before: dict[str, UserProfile | None] = {}
        for emission in learned.emissions:
            ev = emission.event
            produced_s = valid[emission.index][1]
            assert ev.item_id is not None
            if tuner is not None:
                pre = before[ev.user_id] if ev.user_id in before else stored.get(ev.user_id)
                before[ev.user_id] = emission.profile
                if (
                    pre is not None
                    and tuner.sampled(ev.event_id)
                    and ev.item_id not in pre.recent_items()
                    and self.tuning_budget.wait() == 0.0
                ):
                    samples.append((ListRequest(ev.user_id, pre, (), ev.ts_ms), ev.item_id))
            self._note_online_hit(ev.user_id, ev.item_id, assign(ev.user_id).name)
            observe(ev)
            if offer(ev.user_id, (ev, produced_s), now):
                due.append((ev, emission.profile, produced_s))
                deferred[ev.user_id] = None
            else:
                deferred[ev.user_id] = emission.profile

        # State: one RocksDB write batch per partition, changelog records alongside.
        by_partition: dict[int, dict[bytes, bytes | None]] = {}
        for user, profile in learned.profiles.items():
            by_partition.setdefault(partition_of[user], {})[user.encode()] = (
                None if profile is None else profile.to_bytes()
            )
        for partition, values in by_partition.items():
            self.profile_store.write(partition, values)
        for user, maybe_profile in deferred.items():
            if maybe_profile is None:
                self.latest_profiles.pop(user, None)
            else:
                self.latest_profiles[user] = maybe_profile
                self._deferred_any = True
        self._send_item_updates(learned.item_events)
        self._emit_many(due)
        self.service.shadow_score(samples, int(now * 1000))
        for event_type, n in counts.items():
            metrics.events.labels(event_type, "ok").inc(n)
        if valid:
            metrics.processing_latency.observe((time.perf_counter() - started) / len(valid))

    def _forget_users(self, users: list[str], events: list[UserEvent]) -> None:
        """Drop every trace this process keeps of ``users`` (``forget`` records; their
        profiles are deleted with the batch's state): last lists, the emit gate, deferred
        profiles, cached lists, pending tuning samples, the pseudonym cache."""
        for user in users:
            self.last_lists.pop(user, None)
            self.gate.drop(user)
            self.latest_profiles.pop(user, None)
        self.service.forget_users(set(users))
        if self.pseudonymiser is not None:
            for ev in events:
                if ev.event_type == "forget" and ev.sent_user_id is not None:
                    self.pseudonymiser.forget(ev.sent_user_id)

    def _read_profiles(self, partition_of: dict[str, int]) -> dict[str, UserProfile | None]:
        users_by_partition: dict[int, list[str]] = {}
        for user, partition in partition_of.items():
            users_by_partition.setdefault(partition, []).append(user)
        stored: dict[str, UserProfile | None] = {}
        for partition, users in users_by_partition.items():
            raws = self.profile_store.get_many(partition, [u.encode() for u in users])
            for user, raw in zip(users, raws, strict=True):
                stored[user] = UserProfile.from_bytes(raw) if raw else None
        return stored

    def _send_item_updates(self, updates: dict[str, ItemEvents]) -> None:
        """Re-key by item: one record per item partition carrying that partition's items."""
        n = self.config.worker.partitions
        by_partition: dict[int, dict[str, ItemEvents | None]] = {}
        for item_id, update in updates.items():
            by_partition.setdefault(item_partition(item_id, n), {})[item_id] = update
        topic = self.item_updates.get_topic_name()
        for partition, items in by_partition.items():
            first = next(iter(items))
            self.output.send(topic, first.encode(), orjson.dumps(items), partition=partition)

    def _emit_many(self, due: list[_Due]) -> None:
        """Build and send the lists of ``due`` (event, profile, produced at) in one pass."""
        if not due:
            return
        assign = self.service.assigner.assign
        variants = [assign(ev.user_id) for ev, _, _ in due]
        lists = self.service.recommend_many(
            [ListRequest(ev.user_id, p, (ev.item_id or "",), ev.ts_ms) for ev, p, _ in due],
            int(time.time() * 1000),
            variants,
        )
        emitted_ms = int(time.time() * 1000)
        emitted_s = emitted_ms / 1000.0
        sent: Counter[str] = Counter()
        remember = self._remember_list
        worker = self.worker_id
        records: list[tuple[bytes, bytes]] = []
        for (ev, _, _), rec, variant in zip(due, lists, variants, strict=True):
            records.append(
                (
                    ev.output_user_id.encode(),
                    _list_record(ev, variant.k, variant.name, rec, emitted_ms, worker),
                )
            )
            remember(ev.user_id, rec.items)
            sent[variant.name] += 1
        self.output.send_many(self.recommendations_topic, records)
        observe_many(
            self.metrics.end_to_end_latency,
            [max(0.0, emitted_s - produced_s) for _, _, produced_s in due],
        )
        for name, n in sent.items():
            self.metrics.recommendations.labels(name, "event").inc(n)

    async def _flush_coalesced(self) -> None:
        """Emit the newest list of every user whose coalescing interval has passed, then
        release the batches whose deferred lists are all delivered."""
        now = time.time()
        await self._emit_deferred(self.gate.due(now), now)

    async def _emit_deferred(
        self, ready: list[tuple[str, tuple[UserEvent, float]]], now: float
    ) -> None:
        due: list[_Due] = []
        for user, (ev, produced_s) in ready:
            profile = self.latest_profiles.pop(user, None)
            if profile is not None:
                due.append((ev, profile, produced_s))
        self._emit_many(due)
        await self.output.flush()
        # Every list deferred by a batch is due by its release time (offer + interval):
        # the gate's due() at ``now`` has emitted all lists of batches released by now.
        held, self._held = self._held, []
        for release_at, future in held:
            if release_at <= now:
                if not future.done():
                    future.set_result(None)
            else:
                self._held.append((release_at, future))

    async def _settle(self, revoked: set[TP]) -> None:
        """Deliver every deferred list now (a rebalance or a stop: the user may move to
        another worker), so every batch handled so far can be acknowledged."""
        now = time.time()
        self._held = [(min(release_at, now), future) for release_at, future in self._held]
        await self._emit_deferred(self.gate.due_all(now), now)
        if revoked:
            # Machine-read by the multi-worker test: from here on, no list of this worker.
            logger.info("ownership: user-events partitions [] from %.3f", time.time())

    def _keep_only(self, assigned: set[TP]) -> None:
        """Drop the process state of users whose input partition is no longer assigned;
        the catalog statistics are loaded again by their next owner."""
        self._catalog_covered = None
        topic = self.user_events.get_topic_name()
        owned = {tp.partition for tp in assigned if tp.topic == topic}
        logger.info("ownership: user-events partitions %s from %.3f", sorted(owned), time.time())
        users = self.user_partitions.drop_except(owned)
        for user in users:
            self.last_lists.pop(user, None)
            self.gate.drop(user)
            self.latest_profiles.pop(user, None)
        if users:
            logger.info(
                "state of %d users dropped: their partitions moved to other workers", len(users)
            )

    def _fresh_catalog_features(self) -> CatalogFeatures:
        m = self.config.model
        return CatalogFeatures(m.dims, m.pca, m.pca_warmup_items, m.seed)

    def _has_user_state(self, user: str) -> bool:
        return user in self.last_lists or self.gate.holds(user) or user in self.latest_profiles

    async def _on_item_updates(self, stream: Any) -> None:
        """Apply item updates in whole fetched batches, one read and write per item."""
        await self._consume_batches(stream, self._item_batch)

    async def _item_batch(self, messages: list[BatchMessage]) -> None:
        sketch_dims = self.config.model.sketch_dims
        merged: dict[int, dict[str, ItemEvents]] = {}
        deleted: dict[int, set[str]] = {}
        for message in messages:
            for record in message.records:
                partition = record.partition
                part_merged = merged.setdefault(partition, {})
                part_deleted = deleted.setdefault(partition, set())
                updates: dict[str, ItemEvents] = {}
                for item_id, update in orjson.loads(record.value).items():
                    if update is None:  # a catalog delete
                        part_deleted.add(item_id)
                        part_merged.pop(item_id, None)
                    else:
                        part_deleted.discard(item_id)
                        updates[item_id] = update
                merge_item_events(part_merged, updates)
        for partition, items in merged.items():
            keys = [item_id.encode() for item_id in items]
            raws = self.item_store.get_many(partition, keys)
            stored = {
                item_id: self._stored_item(item_id, raw, sketch_dims)
                for item_id, raw in zip(items, raws, strict=True)
            }
            states = learn_item_events(items, stored, self.sketch)
            values: dict[bytes, bytes | None] = {
                key: states[item_id].to_bytes() for key, item_id in zip(keys, items, strict=True)
            }
            for item_id in deleted.get(partition, ()):
                values[item_id.encode()] = None
            self.item_store.write(partition, values)
        for partition, gone in deleted.items():
            if partition not in merged and gone:
                self.item_store.write(partition, {item_id.encode(): None for item_id in gone})
        await self.output.flush()
        self.item_store.persist_offsets()

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

    def _parse_catalog(self, raw: bytes | None, event: Any) -> CatalogRecord | DlqRecord:
        """``raw``, a catalog record carried by ``event``, parsed with its coordinates."""
        message = event.message
        return parse_catalog_record(
            raw,
            config=self.config.events,
            dims=self.config.model.dims,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=event.key,
        )

    async def _on_catalog(self, stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            self.last_consumed[(message.topic, message.partition)] = message.timestamp
            parsed = self._parse_catalog(event.value, event)
            if isinstance(parsed, DlqRecord):
                self.metrics.catalog.labels("dlq").inc()
                self._send_dlq(parsed)
                await self.output.flush()
                continue
            # Sent with the event (Faust publishes it before the event's offset is
            # committed): the one owner of the ordered topic computes the content vector.
            await self.catalog_ordered.send(
                key=event.key,
                value=forwarded(message.partition, event.value),
                partition=0,
            )

    async def _on_catalog_ordered(self, stream: Any) -> None:
        """Catalog records of every catalog partition, in one order, applied by the one
        worker that owns this topic's partition with the statistics saved after each."""
        async for event in stream.events():
            message = event.message
            if self._catalog_covered is None:
                await self._load_catalog_state()
            assert self._catalog_covered is not None
            if message.offset <= self._catalog_covered:
                continue  # learned before the last save (by this owner or a previous one)
            source_partition, raw = read_forwarded(event.value)
            parsed = self._parse_catalog(raw, event)
            if isinstance(parsed, DlqRecord):  # validated before it was forwarded
                self.metrics.catalog.labels("dlq").inc()
                self._send_dlq(parsed)
            else:
                await self._apply_catalog(parsed, source_partition)
            self.output.send(
                self.catalog_state_topic.get_topic_name(),
                STATE_KEY,
                state_record(message.offset, self.catalog_features),
                partition=0,
            )
            await self.output.flush()
            self.content_store.persist_offsets()
            self._catalog_covered = message.offset

    async def _load_catalog_state(self) -> None:
        """Resume the catalog statistics where the last owner saved them."""
        await self.catalog_state_topic.maybe_declare()  # compacted, one partition
        saved = await asyncio.to_thread(
            read_last_state,
            self.config.kafka,
            self.catalog_state_topic.get_topic_name(),
        )
        if saved is None:
            self.catalog_features = self._fresh_catalog_features()
            self._catalog_covered = -1
            return
        self._catalog_covered, self.catalog_features = saved
        logger.info(
            "catalog statistics resumed after ordered offset %d (%d features, PCA version %d)",
            self._catalog_covered,
            len(self.catalog_features.names),
            self.catalog_features.pca_version,
        )

    async def _apply_catalog(self, record: CatalogRecord, partition: int) -> None:
        """Apply one catalog record; its content lives in ``partition`` of the content
        table (the partition of its catalog record)."""
        key = record.item_id.encode()
        if record.deleted:
            self.content_store.write(partition, {key: None})
            self.output.send(
                self.item_updates.get_topic_name(),
                key,
                orjson.dumps({record.item_id: None}),
                partition=item_partition(record.item_id, self.config.worker.partitions),
            )
            self.service.forget_item(record.item_id)
            self.metrics.catalog.labels("delete").inc()
            return
        content = self.catalog_features.content_vector(record.vector, record.features, learn=True)
        if content is None:
            self.metrics.catalog.labels("empty").inc()
            return
        self.content_store.write(partition, {key: encode_vector(content)})
        self.metrics.catalog.labels("upsert").inc()

    async def _on_requests(self, stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            self.last_consumed[(message.topic, message.partition)] = message.timestamp
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
                self._send_dlq(parsed)
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
        stored_as = user_id
        if user_id is not None:
            stored_as = self.user_key(user_id)
            raw_profile = self.profiles.get(stored_as.encode())
            profile = UserProfile.from_bytes(raw_profile) if raw_profile else None
        body = self.service.answer(
            user_id=stored_as, profile=profile, item_id=item_id, k=k, now_ms=now_ms, trigger=trigger
        )
        if user_id is not None:
            body["user_id"] = user_id  # the id as asked, whatever state is kept under
        body["worker"] = self.worker_id
        return body

    def user_key(self, user_id: str) -> str:
        """The id ``user_id``'s state is kept under: its pseudonym, or itself."""
        if self.pseudonymiser is None:
            return user_id
        return self.pseudonymiser.of_bytes(user_id.encode())

    # -- background ------------------------------------------------------------------------

    async def _run_replica(self) -> None:
        await self.replica.run()

    async def _refresh_gauges(self) -> None:
        if not self._heap_frozen and self.is_ready()[0]:
            # Faust, aiokafka and the start-up state are some 150k tracked objects that
            # live as long as the process; every full collection scanned them again: 50 to
            # 170 ms pauses of the event loop on a busy 2-core machine (10 ms after this).
            self._heap_frozen = True
            gc.collect()
            gc.freeze()
            logger.info("start-up heap frozen: %d objects", gc.get_freeze_count())
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
        now = time.time()
        for tp in assigned:
            position = await consumer.position(tp)
            end = ends.get(TopicPartition(tp.topic, tp.partition))
            if position is not None and end is not None:
                lag = max(0, end - position)
                labels = (tp.topic, str(tp.partition))
                self.metrics.consumer_lag.labels(*labels).set(lag)
                # How far behind in time: the age of the last record taken from the
                # partition while records wait behind it (its broker timestamp).
                consumed = self.last_consumed.get((tp.topic, tp.partition))
                behind = 0.0 if lag == 0 or consumed is None else max(0.0, now - consumed)
                self.metrics.consumer_lag_seconds.labels(*labels).set(behind)

    async def _sample_history(self) -> None:
        """Add a sample to the dashboard's ring: input, lists, dead letters, CPU, and the
        end-to-end latency histogram."""
        self.history.record(time.time(), *history_sample(read_registry(self.registry)))

    async def _refresh_resources(self) -> None:
        """Bytes on disk per table and per index version, index memory, replica lag."""
        m = self.metrics
        tables = [t.name for t in (self.profiles, self.items, self.contents)]
        roots = [manager.store.root for manager in self.service.managers.values()]
        tabledir = Path(self.app.conf.tabledir)
        loop = asyncio.get_running_loop()
        sizes = await loop.run_in_executor(None, table_sizes, tabledir, tables)
        versions = await loop.run_in_executor(None, index_version_sizes, roots)
        for table, size in sizes.items():
            m.table_disk_bytes.labels(table).set(size)
        m.index_disk_bytes.clear()  # pruned versions leave the exposition
        for v in versions:
            m.index_disk_bytes.labels(v.index, str(v.version)).set(v.bytes)
        mapped = 0
        vectors = 0
        live = {(v.index, v.version): v.bytes for v in versions}
        for manager in self.service.managers.values():
            if manager.version is not None:
                mapped += live.get((manager.store.root.name, manager.version), 0)
            vectors += manager.item_count * manager.dims * 4
        m.index_memory_bytes.labels("mapped").set(mapped)
        m.index_memory_bytes.labels("vectors").set(vectors)
        if self.replica.lag is not None:
            m.replica_lag.set(self.replica.lag)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the broker answered within ``worker.broker_timeout_seconds``, and the
        body of ``/health``."""
        silent = time.time() - self.broker_ok_at
        ok = silent <= self.config.worker.broker_timeout_seconds
        return ok, {
            "status": "ok" if ok else "failing",
            # Rounded up to the ms, so a failing status never shows a value at the limit.
            "broker_unreachable_seconds": math.ceil(silent * 1000.0) / 1000.0,
            "broker_timeout_seconds": self.config.worker.broker_timeout_seconds,
        }

    # -- status ----------------------------------------------------------------------------

    def is_ready(self) -> tuple[bool, str]:
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        if not recovery.completed.is_set():
            return False, "table recovery in progress"
        if not self.replica.caught_up:
            return False, "item vectors not yet replicated"
        return True, "serving" if self.service.has_index else "serving popularity fallback"


def history_sample(snapshot: dict[str, float]) -> tuple[dict[str, float], list[float]]:
    """The totals and end-to-end latency bucket counts the dashboard's ring keeps, from a
    registry snapshot (:func:`~stream_knn.metrics.history.read_registry`)."""
    totals = {"events": 0.0, "lists": 0.0, "dlq": 0.0, "cpu_seconds": 0.0, "rss_bytes": 0.0}
    prefixes = (
        ("stream_knn_events_total", "events"),
        ("stream_knn_recommendations_total", "lists"),
        ("stream_knn_dlq_total", "dlq"),
        ("process_cpu_seconds_total", "cpu_seconds"),
        ("process_resident_memory_bytes", "rss_bytes"),
    )
    buckets: list[float] = []
    for series, value in snapshot.items():
        for prefix, name in prefixes:
            if series == prefix or series.startswith(prefix + "{"):
                totals[name] += value
        if series.startswith("stream_knn_end_to_end_latency_seconds_bucket{"):
            buckets.append(value)  # the exposition lists buckets in bound order
    return totals, buckets


def create_app(config: Config, registry: CollectorRegistry | None = None) -> WorkerApp:
    """Build the worker's Faust app from ``config``."""
    return WorkerApp(config, registry)
