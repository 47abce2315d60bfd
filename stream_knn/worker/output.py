"""The worker's output producer: lists, dead letters, item updates and table changelogs.

Faust's own send path costs about a tenth of a millisecond per record in Python; the
worker writes several records per event, so it hands them to confluent-kafka (C, batched,
lz4) and waits for delivery once per batch, before the batch's offsets can be committed:
at least once, with no per-record Python overhead. Changelog records report their offsets
(:meth:`OutputProducer.send` ``on_offset``) so the tables can remember what they hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from stream_knn.config import KafkaConfig
from stream_knn.errors import StreamKnnError
from stream_knn.kafka import librdkafka_settings

__all__ = ["DeliveryError", "OutputProducer"]

logger = logging.getLogger(__name__)


class DeliveryError(StreamKnnError):
    """Output records could not be delivered; the batch is not committed and is retried."""


class OutputProducer:
    """Asynchronous produce, with :meth:`flush` as the delivery barrier."""

    def __init__(self, config: KafkaConfig) -> None:
        self._producer = Producer(
            {
                **librdkafka_settings(config),
                # No linger: the worker waits for delivery once per batch, and records
                # produced in one pass still share requests while one is in flight
                # (1 ms of linger was most of the 2.7 ms median wait per batch).
                "linger.ms": 0,
                "compression.type": config.compression,
                "enable.idempotence": True,
                "acks": "all",
                # Same key hashing as the Java client and Faust, so a user's output lands on
                # the partition of that user's input.
                "partitioner": "murmur2_random",
                "message.timeout.ms": 60_000,
            }
        )
        self._failures: list[str] = []

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        on_offset: Callable[[int, int], None] | None = None,
    ) -> None:
        """Queue one record (no wait); delivery is checked by :meth:`flush`.

        ``partition`` None means the key's partition (murmur2, as Faust and Java pick it);
        ``on_offset(partition, offset)`` is called on delivery, from :meth:`flush`.
        """
        callback = self._delivered
        if on_offset is not None:

            def callback(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    self._failures.append(f"{msg.topic()}: {err}")
                else:
                    on_offset(msg.partition(), msg.offset())  # type: ignore[arg-type]

        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=callback, **extra)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)

    def send_many(self, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
        """:meth:`send` of each ``(key, value)`` to ``topic`` (the key's partition): the
        produce loop of a batch's lists, without :meth:`send`'s options per record."""
        produce, delivered = self._producer.produce, self._delivered
        for key, value in records:
            try:
                produce(topic, value, key, on_delivery=delivered)
            except BufferError:
                self.send(topic, key, value)  # waits for room

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged; raise if any failed."""
        producer = self._producer
        producer.poll(0)
        while len(producer):
            await asyncio.sleep(0.0005)
            producer.poll(0)
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(
                f"{len(failures)} output records were not delivered, first: {failures[0]}"
            )

    def close(self, timeout_s: float = 10.0) -> None:
        left = self._producer.flush(timeout_s)
        if left:
            logger.error("%d output records not delivered at shutdown", left)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(f"{msg.topic()}: {err}")

    def __len__(self) -> int:
        return len(self._producer)

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self._producer)}
