"""One owner for the catalog's feature statistics, kept in a compacted topic.

Content vectors of feature records depend on running statistics and on a PCA fitted once,
both learned in the order the records arrive. With several workers each consuming some
``item-catalog`` partitions, each would learn its own statistics and compute vectors in its
own basis. So every worker forwards its valid catalog records, in order, to one internal
topic of a single partition (``<app_id>-catalog-ordered``); whichever worker owns that
partition computes every content vector. After each record it saves the statistics with the
record's offset to a compacted topic (``<app_id>-catalog-features``, one key); a new owner,
after a rebalance or a restart, resumes from the last saved state and skips the records it
already covers, so each record is learned exactly once and every content vector is the one
a single uninterrupted process would have computed.
"""

from __future__ import annotations

import logging

import orjson
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as KafkaPartition

from stream_knn.config import KafkaConfig
from stream_knn.embeddings.catalog import CatalogFeatures
from stream_knn.kafka import librdkafka_settings

__all__ = ["STATE_KEY", "forwarded", "read_forwarded", "read_last_state", "state_record"]

logger = logging.getLogger(__name__)

#: The single key of the statistics topic.
STATE_KEY = b"catalog-features"


def forwarded(source_partition: int, value: bytes | None) -> bytes:
    """The ordered topic's value for a catalog record (None: a tombstone) read from
    ``source_partition``: the content table keeps each item in the partition of its
    catalog record.

    >>> read_forwarded(forwarded(3, b'{"item_id": "a"}'))
    (3, b'{"item_id": "a"}')
    >>> read_forwarded(forwarded(0, None))
    (0, None)
    """
    return b"%d\n%s" % (source_partition, b"" if value is None else value)


def read_forwarded(value: bytes) -> tuple[int, bytes | None]:
    """The source partition and the catalog record of a :func:`forwarded` value."""
    head, _, record = value.partition(b"\n")
    return int(head), record or None


def state_record(offset: int, features: CatalogFeatures) -> bytes:
    """The saved statistics: ``features`` after the ordered record at ``offset``."""
    return b'{"offset":%d,"state":%s}' % (offset, features.to_bytes())


def read_last_state(
    kafka: KafkaConfig, topic: str, timeout_s: float = 30.0
) -> tuple[int, CatalogFeatures] | None:
    """The last saved statistics and the ordered offset they cover; None if none was saved.

    Blocking (run it in a thread): reads the newest record of the topic's only partition.
    """
    consumer = Consumer(
        {
            **librdkafka_settings(kafka),
            "group.id": f"{topic}-reader",  # assigned, never joined
            "enable.auto.commit": False,
            "logger": logger,
        }
    )
    try:
        low, high = consumer.get_watermark_offsets(KafkaPartition(topic, 0), timeout=timeout_s)
        if high <= low:
            return None
        consumer.assign([KafkaPartition(topic, 0, high - 1)])
        message = consumer.poll(timeout_s)
        if message is None:
            raise KafkaException(f"{topic}: no record at offset {high - 1} in {timeout_s} s")
        if message.error() is not None:
            raise KafkaException(message.error())
        value = message.value()
        if value is None or message.key() != STATE_KEY:
            return None
        saved = orjson.loads(value)
        return int(saved["offset"]), CatalogFeatures.from_state(saved["state"])
    finally:
        consumer.close()
