"""Batch reads and writes of the worker's Faust tables, past Faust's per-key path.

A Faust table write costs about 140 us (a Python changelog send per key); the worker writes
thousands of keys per second. :class:`BatchTable` keeps the table (its RocksDB partition
stores, its changelog topic, Faust's recovery and standbys) and replaces only the write
path: one RocksDB write batch per partition per batch of events, the same key/value bytes
produced to the table's changelog partition through librdkafka, and, once they are
delivered, the changelog offset stored in the partition's database exactly where Faust's
own delivery callback stores it (``Store.set_persisted_offset``). A restart therefore
recovers from the changelog from that offset on, and a deleted RocksDB directory from the
start of the changelog, as for any Faust table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import rocksdict
from faust.types import TP

from stream_knn.worker.output import OutputProducer

__all__ = ["BatchTable", "MemoryTable"]

logger = logging.getLogger(__name__)


class BatchTable:
    """One Faust table (``raw`` keys and values, RocksDB store) read and written in batches.

    Parameters
    ----------
    table
        The Faust table (``app.Table(..., options={"driver": "rocksdict"})``).
    output
        The producer of the table's changelog records.
    """

    def __init__(self, table: Any, output: OutputProducer) -> None:
        self.table = table
        self.output = output
        #: Newest delivered changelog offset per partition, not yet stored in RocksDB.
        self._delivered: dict[int, int] = {}

    @property
    def changelog_topic(self) -> str:
        name: str = self.table.changelog_topic.get_topic_name()
        return name

    def _db(self, partition: int) -> Any:
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """The stored values of ``keys`` in ``partition``'s store (None where absent)."""
        if not keys:
            return []
        values: list[bytes | None] = self._db(partition).get(keys)
        return values

    def write(self, partition: int, values: Mapping[bytes, bytes | None]) -> None:
        """Store ``values`` (None deletes) in ``partition`` and queue their changelog records.

        The store is written at once (readers see it); the changelog offset is stored by
        :meth:`persist_offsets` after :meth:`OutputProducer.flush` has seen delivery.
        """
        if not values:
            return
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in values.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._db(partition).write(batch)
        key_index = self.table.data._key_index
        topic = self.changelog_topic
        send = self.output.send
        for key, value in values.items():
            if value is None:
                key_index.pop(key, None)  # a deleted key leaves no trace in the process
            else:
                key_index[key] = partition
            send(topic, key, value, partition=partition, on_offset=self._on_offset)

    def _on_offset(self, partition: int, offset: int) -> None:
        if offset > self._delivered.get(partition, -1):
            self._delivered[partition] = offset

    def persist_offsets(self) -> None:
        """Store the newest delivered changelog offset of each written partition.

        Call after the output flush: what Faust's recovery reads from then on starts past
        records the store already holds.
        """
        if not self._delivered:
            return
        delivered, self._delivered = self._delivered, {}
        store = self.table.data
        topic = self.changelog_topic
        for partition, offset in delivered.items():
            store.set_persisted_offset(TP(topic, partition), offset)


class MemoryTable:
    """:class:`BatchTable`'s reads and writes on dicts (partition -> key -> value): the
    worker's batch path without RocksDB or a changelog, for tests and benchmarks."""

    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = {}

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        part = self.data.get(partition, {})
        return [part.get(key) for key in keys]

    def write(self, partition: int, values: Mapping[bytes, bytes | None]) -> None:
        part = self.data.setdefault(partition, {})
        for key, value in values.items():
            if value is None:
                part.pop(key, None)
            else:
                part[key] = value

    def persist_offsets(self) -> None:
        """Nothing to persist: there is no changelog."""
