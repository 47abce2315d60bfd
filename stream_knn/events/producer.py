"""Publish user events to Kafka at a steady rate, with every delivery accounted for.

Used by ``stream-knn produce``, integration tests and benchmarks. Events are JSON (orjson)
keyed by ``user_id``; the producer is idempotent with ``acks=all`` so a success count means
the broker has the records exactly once.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm

from stream_knn.errors import BrokerError
from stream_knn.kafka import Connection, kafka_config, librdkafka_settings

__all__ = ["ProduceReport", "TokenBucket", "pace", "produce_events", "producer_config"]

logger = logging.getLogger(__name__)

# How long the final flush may take before undelivered records count as failed.
_FLUSH_TIMEOUT_S = 60.0
# Tokens a bucket may bank: 10 ms of traffic, so a stall is not followed by a long burst.
_BURST_SECONDS = 0.01
_ERRORS_KEPT = 5


@dataclass(frozen=True)
class ProduceReport:
    """What happened to the events handed to :func:`produce_events`."""

    sent: int
    acked: int
    failed: int
    seconds: float
    #: The first few distinct delivery errors, for the message shown to the user.
    errors: tuple[str, ...] = ()
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """Every sent event was acknowledged and the run was not interrupted."""
        return self.acked == self.sent and self.failed == 0 and not self.interrupted

    @property
    def rate(self) -> float:
        """Acknowledged events per second of wall time."""
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for humans: counts, time and rate."""
        text = (
            f"sent {self.sent}, acked {self.acked}, failed {self.failed} "
            f"in {self.seconds:.2f} s ({self.rate:,.0f} events/s)"
        )
        if self.interrupted:
            text += ", interrupted"
        if self.errors:
            text += "; errors: " + "; ".join(self.errors)
        return text


def pace(producer: Producer, bucket: TokenBucket) -> None:
    """Wait for ``bucket``'s next token while serving ``producer``'s delivery reports.

    librdkafka's poll timeout is whole milliseconds (``poll(0.0004)`` returns at once), so
    a wait below 1 ms is served as 1 ms: the bucket's banked tokens absorb the difference,
    where polling the exact wait would spin a core between events.
    """
    wait = bucket.wait()
    while wait > 0:
        producer.poll(max(wait, 0.001))
        wait = bucket.wait()


class TokenBucket:
    """A token bucket on monotonic time: a steady ``rate`` with at most ``capacity`` banked.

    Examples
    --------
    >>> now = [0.0]
    >>> bucket = TokenBucket(100.0, capacity=1.0, clock=lambda: now[0])
    >>> bucket.wait()  # the first token is there
    0.0
    >>> round(bucket.wait(), 6)  # the next one comes 1/100 s later
    0.01
    >>> now[0] = 0.01
    >>> bucket.wait()
    0.0
    """

    def __init__(
        self, rate: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._tokens = 1.0
        self._last = clock()

    def wait(self) -> float:
        """Take a token and return 0.0, or return the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def producer_config(connection: Connection, compression: str = "lz4") -> dict[str, Any]:
    """The confluent-kafka settings of the event producer."""
    return {
        **librdkafka_settings(connection),
        "linger.ms": 5,
        "compression.type": compression,
        "enable.idempotence": True,
        "acks": "all",
        # Same key -> partition mapping as the Java client and aiokafka (Faust), so a user's
        # events land where the worker's user-partitioned state expects them.
        "partitioner": "murmur2_random",
        # A dead broker should fail the command in a minute, not after the 5 min default.
        "message.timeout.ms": 60_000,
    }


def produce_events(
    connection: Connection,
    topic: str,
    events: Iterable[dict[str, Any]],
    *,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = False,
    compression: str = "lz4",
) -> ProduceReport:
    """Publish ``events`` to ``topic`` keyed by ``user_id`` and wait for every delivery.

    Parameters
    ----------
    connection : KafkaConfig or str
        The ``[kafka]`` settings, or a bootstrap address (PLAINTEXT).
    topic : str
        Destination topic.
    events : iterable of dict
        User-event objects; each needs a ``user_id`` (the record key).
    rate : float or None
        Events per second to hold (token bucket on monotonic time); ``None`` = as fast as
        possible.
    limit : int or None
        Send at most this many events.
    progress : bool
        Show a tqdm progress bar on stderr.
    compression : str
        ``compression.type`` of the producer.

    Returns
    -------
    ProduceReport
        Counts of sent, acknowledged and failed events; ``Ctrl-C`` stops sending, flushes
        and returns a report with ``interrupted=True``.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s, got {rate}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    counts = {"acked": 0, "failed": 0}
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            counts["acked"] += 1
            return
        counts["failed"] += 1
        text = str(err)
        if text not in errors and len(errors) < _ERRORS_KEPT:
            errors.append(text)

    def on_error(err: KafkaError) -> None:
        logger.warning("kafka producer: %s", err)
        if err.fatal():
            raise BrokerError(f"the Kafka producer hit a fatal error: {err}")

    config = producer_config(connection, compression)
    config["error_cb"] = on_error
    try:
        producer = Producer(config)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot create a Kafka producer for {kafka_config(connection).bootstrap_servers}: "
            f"{exc}"
        ) from None
    stream = events if limit is None else itertools.islice(events, limit)
    total = len(events) if isinstance(events, Sized) else None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bucket = TokenBucket(rate, capacity=rate * _BURST_SECONDS) if rate else None
    bar = tqdm(total=total, unit="ev", file=sys.stderr, disable=not progress, smoothing=0.1)
    sent = 0
    interrupted = False
    started = time.monotonic()
    try:
        for event in stream:
            if bucket is not None:
                pace(producer, bucket)
            value = orjson.dumps(event)
            key = str(event["user_id"]).encode()
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain it
            sent += 1
            producer.poll(0)
            if sent & 255 == 0:
                bar.update(256)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted after %d events; flushing what was sent", sent)
    finally:
        bar.update(sent - bar.n)
        bar.close()
        remaining = producer.flush(_FLUSH_TIMEOUT_S)
    seconds = time.monotonic() - started
    failed = counts["failed"] + remaining
    if remaining:
        errors.append(f"{remaining} events still undelivered after {_FLUSH_TIMEOUT_S:.0f} s")
    return ProduceReport(sent, counts["acked"], failed, seconds, tuple(errors), interrupted)
