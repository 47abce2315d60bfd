"""User profiles: bounded recent items, repeats, query vector maths, byte round trip."""

from __future__ import annotations

import numpy as np
import pytest

from stream_knn.embeddings import UserProfile
from stream_knn.errors import DimensionError

DAY_MS = 86_400_000
DAY_S = 86_400.0


def test_cap_keeps_newest_in_order() -> None:
    p = UserProfile()
    for k in range(5):
        p = p.add(f"i{k}", k, 1.0, cap=3)
    assert [i for i, _, _ in p.items] == ["i2", "i3", "i4"]
    assert p.version == 5
    assert p.recent_items() == frozenset({"i2", "i3", "i4"})


def test_repeat_moves_item_to_the_end_and_accumulates_weight() -> None:
    p = UserProfile().add("a", 10, 1.0, cap=3).add("b", 20, 2.0, cap=3)
    p = p.add("a", 30, 3.0, cap=3)
    assert p.items == (("b", 20, 2.0), ("a", 30, 4.0))
    assert p.version == 3
    # With a half-life the old weight is decayed to the newer time first.
    q = UserProfile().add("a", 0, 4.0, cap=3).add("a", DAY_MS, 1.0, cap=3, half_life_seconds=DAY_S)
    assert q.items == (("a", DAY_MS, 3.0),)
    # An older repeat keeps the newer time and is itself decayed.
    r = UserProfile().add("a", DAY_MS, 1.0, cap=3).add("a", 0, 4.0, cap=3, half_life_seconds=DAY_S)
    assert r.items == (("a", DAY_MS, 3.0),)


def test_add_does_not_modify_the_original() -> None:
    p = UserProfile().add("a", 1, 1.0, cap=2)
    p.add("b", 2, 1.0, cap=2)
    assert p.items == (("a", 1, 1.0),)
    with pytest.raises(ValueError, match="cap"):
        p.add("b", 2, 1.0, cap=0)


def test_query_vector_is_decayed_weighted_sum_of_unit_vectors() -> None:
    vectors = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([0.0, 0.5], np.float32)}
    p = UserProfile().add("a", 0, 2.0, cap=5).add("b", DAY_MS, 1.0, cap=5).add("gone", 0, 9.0, 5)
    q = p.query_vector(vectors.get, now_ms=2 * DAY_MS, half_life_seconds=DAY_S)
    assert q is not None
    # Decayed to the newest interaction (day 1), not to now (the ranking is the same):
    # a: 2 * 1/2 = 1 along x; b: 1 * 1 = 1 along y; "gone" has no vector.
    np.testing.assert_allclose(q, [1.0, 1.0])
    # The future is not decayed (never grows either).
    q_future = p.query_vector(vectors.get, now_ms=0, half_life_seconds=DAY_S)
    assert q_future is not None
    np.testing.assert_allclose(q_future, np.array([2.0, 1.0]))
    ids, coefficients = p.query_weights(2 * DAY_MS, DAY_S)
    assert ids == ["a", "b", "gone"]
    np.testing.assert_allclose(coefficients, [1.0, 1.0, 9.0 / 2])
    # A history thousands of half-lives old still gives a direction (no float underflow).
    q_old = p.query_vector(vectors.get, now_ms=5000 * DAY_MS, half_life_seconds=DAY_S)
    assert q_old is not None
    np.testing.assert_allclose(q_old, [1.0, 1.0])


def test_query_vector_none_without_vectors() -> None:
    p = UserProfile().add("a", 0, 1.0, cap=5)
    assert p.query_vector(lambda _: None, 0, DAY_S) is None
    assert UserProfile().query_vector(lambda _: np.ones(2, np.float32), 0, DAY_S) is None


def test_bytes_round_trip() -> None:
    p = UserProfile().add("a", 1_700_000_000_000, 1.5, cap=5).add("ü-2", -3, 0.1, cap=5)
    data = p.to_bytes()
    assert len(data) == 13 + 16 * 2 + len(b'["a","\xc3\xbc-2"]')
    assert UserProfile.from_bytes(data) == p
    assert UserProfile.from_bytes(UserProfile().to_bytes()) == UserProfile()


@pytest.mark.parametrize("cut", [5, 20, -1])
def test_from_bytes_rejects_truncated(cut: int) -> None:
    data = UserProfile().add("a", 1, 1.0, cap=5).add("b", 2, 1.0, cap=5).to_bytes()
    with pytest.raises(DimensionError, match="corrupt"):
        UserProfile.from_bytes(data[:cut])
