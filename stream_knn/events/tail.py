"""Read records from a topic as they arrive, for ``stream-knn tail`` and tests.

Each call uses a fresh random consumer group and commits nothing, so tailing never moves
anyone else's offsets and can be repeated.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import orjson
from confluent_kafka import Consumer, KafkaException

from stream_knn.errors import BrokerError
from stream_knn.kafka import Connection, access_denied, kafka_config, librdkafka_settings

__all__ = ["consume", "format_record", "iter_records"]

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_BATCH = 500


def iter_records(
    connection: Connection,
    topic: str,
    *,
    limit: int | None = None,
    timeout_s: float | None = None,
    from_beginning: bool = True,
) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Yield ``(key, value)`` of records on ``topic`` as they arrive.

    Parameters
    ----------
    connection : KafkaConfig or str
        The ``[kafka]`` settings, or a bootstrap address (PLAINTEXT).
    topic : str
        Topic to read.
    limit : int or None
        Stop after this many records; ``None`` = no limit.
    timeout_s : float or None
        Stop after this many seconds without a record; ``None`` = wait forever.
    from_beginning : bool
        Start at the earliest offset instead of the end of each partition.

    Yields
    ------
    tuple of (bytes or None, bytes or None)
        Record key and value.
    """
    if limit is not None and limit <= 0:
        return
    kafka = kafka_config(connection)
    consumer_config = {
        **librdkafka_settings(kafka),
        "group.id": f"stream-knn-tail-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }
    try:
        consumer = Consumer(consumer_config)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot create a Kafka consumer for {kafka.bootstrap_servers}: {exc}"
        ) from None
    warned: set[int] = set()
    count = 0
    try:
        consumer.subscribe([topic])
        last = time.monotonic()
        while True:
            wanted = _BATCH if limit is None else min(_BATCH, limit - count)
            for message in consumer.consume(num_messages=wanted, timeout=_POLL_S):
                err = message.error()
                if err is not None:
                    if err.fatal():
                        raise BrokerError(f"reading {topic} failed: {err}")
                    denied = access_denied(err, kafka, f"reading topic {topic}")
                    if denied is not None:
                        raise BrokerError(denied)
                    if err.code() not in warned:
                        # Typical: the topic does not exist yet; keep waiting for it.
                        warned.add(err.code())
                        logger.warning("reading %s: %s", topic, err)
                    continue
                last = time.monotonic()
                count += 1
                yield message.key(), message.value()
                if limit is not None and count >= limit:
                    return
            if timeout_s is not None and time.monotonic() - last >= timeout_s:
                return
    finally:
        consumer.close()


def consume(
    connection: Connection,
    topic: str,
    *,
    limit: int | None,
    timeout_s: float,
    from_beginning: bool = True,
) -> list[tuple[bytes | None, bytes | None]]:
    """All ``(key, value)`` records read until ``limit`` or ``timeout_s`` of silence.

    See :func:`iter_records` for the parameters.
    """
    return list(
        iter_records(
            connection, topic, limit=limit, timeout_s=timeout_s, from_beginning=from_beginning
        )
    )


def format_record(key: bytes | None, value: bytes | None) -> str:
    """One line: the key, a tab, and the value as compact JSON (raw text if not JSON)."""
    key_text = "null" if key is None else key.decode("utf-8", "replace")
    if value is None:
        return f"{key_text}\tnull"
    try:
        value_text = orjson.dumps(orjson.loads(value)).decode()
    except orjson.JSONDecodeError:
        # Keep one record per line even when the raw value holds line breaks.
        value_text = value.decode("utf-8", "replace").replace("\n", "\\n")
    return f"{key_text}\t{value_text}"
