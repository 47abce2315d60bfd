"""What ``stream-knn topics apply`` says when a keyed input topic with state grows."""

from __future__ import annotations

from aiokafka.partitioner import murmur2

from stream_knn.topics.admin import Change, growth_note, moved_key_share


def test_moved_share_matches_the_partitioner_on_real_keys() -> None:
    keys = [f"user-{n}".encode() for n in range(20_000)]
    hashes = [murmur2(k) & 0x7FFFFFFF for k in keys]
    moved = sum(h % 4 != h % 12 for h in hashes) / len(hashes)
    assert abs(moved - moved_key_share(4, 12)) < 0.02
    assert moved_key_share(4, 12) == 2 / 3
    assert moved_key_share(3, 4) == 0.75  # lcm 12: h % 3 == h % 4 for h in {0, 1, 2}


def test_growth_note_names_the_moved_share_the_state_and_the_way_out() -> None:
    note = growth_note(
        Change("user-events", "add_partitions", old="4", new="12"), "user_id", state_partitions=4
    )
    assert "67% of keys change partition" in note
    assert "worker.partitions = 4" in note
    assert "set worker.partitions to 12" in note
    assert "new worker.app_id" in note
