"""The read-offset guard of the worker's consumer (stale writes after a seek)."""

from __future__ import annotations

from typing import Any

from faust.types import TP

from stream_knn.worker.consumer import _Batch, _ReadOffsets

P0 = TP("user-events", 0)
P1 = TP("user-events", 1)


class _Consumer:
    """What the guard reads from the consumer: the message in flight and seek epochs."""

    def __init__(self) -> None:
        self.in_flight: tuple[TP, int, int] | None = None
        self.epochs: dict[TP, int] = {}
        self.late_writes_ignored = 0

    def seek_epoch(self, tp: TP) -> int:
        return self.epochs.get(tp, 0)


def _offsets() -> tuple[_Consumer, _ReadOffsets]:
    consumer = _Consumer()
    offsets = _ReadOffsets(consumer)  # type: ignore[arg-type]
    return consumer, offsets


def test_unknown_partition_reads_none() -> None:
    _, offsets = _offsets()
    assert offsets[P0] is None


def test_write_of_a_message_from_the_current_epoch_is_kept() -> None:
    consumer, offsets = _offsets()
    consumer.in_flight = (P0, 41, 0)
    offsets[P0] = 41
    assert offsets[P0] == 41 and consumer.late_writes_ignored == 0


def test_late_write_after_a_seek_of_the_partition_is_ignored() -> None:
    consumer, offsets = _offsets()
    consumer.in_flight = (P0, 57, 0)
    # The seek (perform_seek writes with dict.update, past the guard) happens while
    # message 57 is being handed over...
    consumer.epochs[P0] = 1
    offsets.update({P0: 40})
    # ...and Faust's fetch loop then records 57 as read: that must not stick, or the
    # re-fetched messages 40..56 would be dropped as already read.
    offsets[P0] = 57
    assert offsets[P0] == 40
    assert consumer.late_writes_ignored == 1


def test_only_the_in_flight_message_of_the_sought_partition_is_ignored() -> None:
    consumer, offsets = _offsets()
    consumer.in_flight = (P0, 57, 0)
    consumer.epochs[P0] = 1
    offsets[P1] = 57  # another partition
    offsets[P0] = 58  # another offset (not the message in flight)
    assert (offsets[P1], offsets[P0], consumer.late_writes_ignored) == (57, 58, 0)


def test_batch_keeps_records_and_their_epochs() -> None:
    records: dict[TP, list[Any]] = {P0: ["a", "b"], P1: ["c"]}
    batch = _Batch(records, {P0: 2, P1: 0})
    assert dict(batch) == records
    assert batch.epochs == {P0: 2, P1: 0}
