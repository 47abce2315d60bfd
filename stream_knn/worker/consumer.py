"""Faust's aiokafka consumer with read offsets that stay honest across seeks.

Faust (faust-streaming 0.15) remembers, per partition, the offset of the last message it
handed to the streams (the *read offset*) and drops any fetched message below it as
already read. After a rebalance or a restart, table recovery seeks every stream partition
back to its committed offset and resets the read offsets to match. Two kinds of message
can still arrive *after* that seek although they were fetched *before* it:

* a batch the fetcher (running in the consumer thread) already held, whose first message
  then looks like a jump over the offsets between the committed one and itself. Faust
  records that jump as a "gap" (offsets treated as acknowledged, as for compacted or
  transactional topics) and commits over messages it never delivered;
* the message being handed over while the seek ran: Faust then stores its offset as the
  read offset, above the committed one, and drops the re-fetched messages below it, so
  they are not processed and the group's committed offset stops there until the next
  restart.

Both were observed here after ``kill -9`` restarts. This consumer numbers each partition's
seeks (an *epoch*): a fetched batch that began before a seek of its partition is
discarded (the re-fetch from the new position delivers those messages again), and the
read offset of a message yielded before a seek is not recorded after it. At-least-once
delivery is kept: nothing is skipped; a message processed just before the seek may be
processed again after it.

It also shortens how long the broker may hold a fetch (:data:`FETCH_MAX_WAIT_MS`): see
``_SeekSafeThread._create_worker_consumer``.

**Whole fetches.** Faust's per-message machinery (message, event, channel, ack) costs about
55 us per record, a ceiling of about 18k records/s per process whatever the agent does. For
the topics named in ``batch_topics`` this consumer hands Faust one :class:`BatchMessage` per
partition per fetch instead: its offset is the last record's, its ``records`` are the
fetched records, and acknowledging it acknowledges every offset it covers, so the commit
moves past the whole batch only once the agent has finished it (at least once).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage, ack_lock

__all__ = ["FETCH_MAX_WAIT_MS", "BatchMessage", "SeekSafeConsumer"]

#: Longest time the broker may hold a fetch of the worker's consumer, ms.
FETCH_MAX_WAIT_MS = 20

logger = logging.getLogger(__name__)


class _FetchedBatch:
    """One partition's records of one fetch, standing in for a single aiokafka record."""

    __slots__ = ("first_offset", "offset", "records", "timestamp", "timestamp_type", "topic")

    def __init__(self, records: Sequence[Any]) -> None:
        last = records[-1]
        self.records = records
        self.topic = last.topic
        self.offset = last.offset
        self.first_offset = records[0].offset
        self.timestamp = last.timestamp
        self.timestamp_type = last.timestamp_type


class BatchMessage(ConsumerMessage):
    """The records of one partition from one fetch, delivered to Faust as one message.

    ``offset`` is the last record's offset; ``records`` are aiokafka ``ConsumerRecord``s
    (``key``, ``value``, ``offset``, ``timestamp`` in ms, ``partition``). Acknowledging
    the message acknowledges ``first_offset .. offset``.
    """

    __slots__ = ("first_offset", "records")

    records: Sequence[Any]
    first_offset: int


class _Batch(dict[TP, list[Any]]):
    """Records of one fetch, with the seek epoch of each partition when they were fetched."""

    def __init__(self, records: Mapping[TP, list[Any]], epochs: dict[TP, int]) -> None:
        super().__init__(records)
        self.epochs = epochs


class _SeekSafeThread(AIOKafkaConsumerThread):
    """The consumer thread, where fetches and seeks are ordered.

    aiokafka drops its own buffered records of a partition when it is sought; only a
    batch already returned can be stale. Both the fetch and the seek run on this thread's
    event loop, and the epoch changes in the same step as the seek (no await between), so
    a batch tagged with an older epoch than its partition's current one was fetched
    before that seek, and one tagged with the current epoch after it.
    """

    epochs: dict[TP, int]

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust asks the broker to hold a fetch up to 1.5 s. aiokafka leaves out of a fetch
        # the partitions whose records are still being handed over, so a fetch often
        # covers only quiet partitions (other topics, changelogs) and the next records of
        # the busy ones wait for it to time out: stalls of up to 1.5 s at steady rates.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    def __post_init__(self) -> None:
        super().__post_init__()
        self.epochs = {}

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        epochs = self.epochs
        return _Batch(records, {tp: epochs.get(tp, 0) for tp in records})

    def _seek_now(self, partition: TP, offset: int) -> None:
        self.epochs[partition] = self.epochs.get(partition, 0) + 1
        self._ensure_consumer().seek(partition, offset)

    async def _seek_to_committed_now(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        committed: dict[TP, int] = {}
        for tp in consumer.assignment():
            committed[tp] = await consumer.committed(tp)
        for tp, offset in committed.items():
            if offset and offset > 0:
                self._seek_now(tp, offset)
        return committed

    async def _seek_async(self, partition: TP, offset: int) -> None:
        self._seek_now(partition, offset)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek every assigned partition to its committed offset, on the consumer thread."""
        result: Mapping[TP, int] = await self.call_thread(self._seek_to_committed_now)
        return result

    async def seek_on_thread(self, partition: TP, offset: int) -> None:
        """Seek one partition, on the consumer thread."""
        await self.call_thread(self._seek_async, partition, offset)


class _ReadOffsets(defaultdict[TP, int | None]):
    """Faust's read-offset map that ignores the late write of a message from before a seek.

    Faust's fetch loop writes ``read_offset[tp] = offset`` right after handing a message
    to the streams; the consumer tells this map which message that is (``in_flight``)
    and the seek epoch its partition had when it was yielded.
    """

    def __init__(self, consumer: SeekSafeConsumer) -> None:
        super().__init__(lambda: None)
        self._consumer = consumer

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        consumer = self._consumer
        in_flight = consumer.in_flight
        if (
            in_flight is not None
            and in_flight[0] == tp
            and in_flight[1] == offset
            and consumer.seek_epoch(tp) != in_flight[2]
        ):
            consumer.late_writes_ignored += 1
            logger.info(
                "%s: message at offset %s was handed over while the partition was "
                "sought; keeping the sought read offset %s",
                tp,
                offset,
                self.get(tp),
            )
            return
        super().__setitem__(tp, offset)


class SeekSafeConsumer(AIOKafkaConsumer):
    """The aiokafka consumer of Faust, with seeks that no stale message can undo.

    Attributes
    ----------
    stale_discarded
        Messages fetched before a seek of their partition and discarded after it.
    late_writes_ignored
        Read-offset writes of messages yielded before a seek and ignored after it.
    """

    _thread: _SeekSafeThread

    def __init__(self, *args: Any, batch_topics: Collection[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Topics delivered as one :class:`BatchMessage` per partition per fetch.
        self.batch_topics = frozenset(batch_topics)
        #: First offset of the batch in flight, per partition (clips Faust's gap records).
        self._batch_first: dict[TP, int] = {}
        self.in_flight: tuple[TP, int, int] | None = None
        self.stale_discarded = 0
        self.late_writes_ignored = 0
        self._batch_epochs: dict[TP, int] = {}
        self._read_offset = _ReadOffsets(self)

    def _new_consumer_thread(self) -> _SeekSafeThread:
        return _SeekSafeThread(self, loop=self.loop, beacon=self.beacon)

    def seek_epoch(self, tp: TP) -> int:
        """How many times ``tp`` has been sought by this consumer."""
        return self._thread.epochs.get(tp, 0)

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        records: Any = await super()._getmany(active_partitions, timeout)
        self._batch_epochs = getattr(records, "epochs", {})
        batch_topics = self.batch_topics
        if batch_topics:
            for tp, fetched in records.items():
                if fetched and tp.topic in batch_topics:
                    records[tp] = [_FetchedBatch(fetched)]
        return records

    def _to_message(self, tp: TP, record: Any) -> ConsumerMessage:
        if type(record) is not _FetchedBatch:
            return super()._to_message(tp, record)
        message = BatchMessage(
            record.topic,
            tp.partition,
            record.offset,
            record.timestamp / 1000.0,
            record.timestamp_type,
            None,
            None,
            b"",
            None,
            0,
            0,
            tp,
            generation_id=self.app.consumer_generation_id,
        )
        message.records = record.records
        message.first_offset = record.first_offset
        return message

    def ack(self, message: Message) -> bool:
        """Acknowledge a message; for a :class:`BatchMessage`, every offset it covers."""
        acked = super().ack(message)
        if acked and type(message) is BatchMessage and message.first_offset < message.offset:
            tp = message.tp
            with ack_lock:
                committed = self._committed_offset[tp]
                start = message.first_offset
                if committed is not None:
                    start = max(start, committed)
                index = self._acked_index[tp]
                fresh = [o for o in range(start, message.offset) if o not in index]
                index.update(fresh)
                self._acked[tp].extend(fresh)
        return acked

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust records the offsets between the last message read and this one as a gap
        # (acknowledged as a block once a later offset is). For a batch those offsets are
        # its own records, acknowledged with it: only the part before the batch is a gap.
        first = self._batch_first.get(tp)
        if first is not None:
            offset_to = min(offset_to, first - 1)
        if offset_from <= offset_to:
            await super()._add_gap(tp, offset_from, offset_to)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        """Faust's fetch, less the messages of partitions sought since they were fetched."""
        current = self._thread.epochs
        async for tp, message in super().getmany(timeout):
            fetched = self._batch_epochs.get(tp, 0)
            if current.get(tp, 0) != fetched:
                self.stale_discarded += 1
                if self.stale_discarded % 1000 == 1:
                    logger.info(
                        "%s: discarding messages fetched before the partition was sought "
                        "(offset %s; %d so far); they are fetched again",
                        tp,
                        message.offset,
                        self.stale_discarded,
                    )
                continue
            self.in_flight = (tp, message.offset, fetched)
            if type(message) is BatchMessage:
                self._batch_first[tp] = message.first_offset
            else:
                self._batch_first.pop(tp, None)
            yield tp, message

    async def _seek(self, partition: TP, offset: int) -> None:
        await self._thread.seek_on_thread(partition, offset)

    async def seek(self, partition: TP, offset: int) -> None:
        """Seek one partition to ``offset``; its read offset follows, whatever is in flight."""
        await super().seek(partition, offset)
        # Written past the guard: the seek's own value wins over any late write.
        read_offsets: dict[TP, int | None] = self._read_offset  # type: ignore[assignment]
        dict.__setitem__(read_offsets, partition, offset if offset else None)
