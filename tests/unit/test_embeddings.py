"""Vector codec and random-indexing sketch: byte formats, decay maths, stable user vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stream_knn.embeddings import (
    ItemState,
    RandomIndexing,
    activity_weight,
    decode_vector,
    encode_vector,
)
from stream_knn.errors import DimensionError

HOUR_MS = 3_600_000


def test_codec_round_trip_is_float32_little_endian() -> None:
    data = encode_vector(np.array([1.0, -2.0, 0.5], dtype=np.float64))
    assert data == bytes.fromhex("0000803f000000c00000003f")
    out = decode_vector(data, 3)
    assert out.dtype == np.float32
    assert out.tolist() == [1.0, -2.0, 0.5]
    out[0] = 7.0  # decoded arrays own their memory


@pytest.mark.parametrize("dims", [2, 4])
def test_decode_rejects_wrong_length(dims: int) -> None:
    with pytest.raises(DimensionError, match="expected"):
        decode_vector(encode_vector([1.0, 2.0, 3.0]), dims)


def test_codec_rejects_non_finite_and_non_1d() -> None:
    with pytest.raises(DimensionError, match="NaN or inf"):
        encode_vector([1.0, float("nan")])
    with pytest.raises(DimensionError, match="1-D"):
        encode_vector([[1.0], [2.0]])
    bad = np.array([1.0, np.inf], dtype="<f4").tobytes()
    with pytest.raises(DimensionError, match="corrupt"):
        decode_vector(bad, 2)


def test_user_vector_is_fixed_for_id_and_seed() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=10.0)
    v = ri.user_vector("u1")
    expected = [-0.26784304, -0.5857929, 0.15106474, 0.10809813,
                -0.41992867, 0.08233906, 0.32221755, 0.51347548]  # fmt: skip
    np.testing.assert_allclose(v, expected, rtol=1e-6)
    assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-6)
    assert not v.flags.writeable
    other_seed = RandomIndexing(dims=8, seed=1, half_life_seconds=10.0).user_vector("u1")
    assert not np.allclose(v, other_seed)
    assert not np.allclose(v, ri.user_vector("u2"))


def test_user_vector_is_the_same_in_another_process() -> None:
    code = (
        "from stream_knn.embeddings import RandomIndexing;"
        "print(RandomIndexing(8, 0, 10.0).user_vector('u1').tobytes().hex())"
    )
    # A fresh interpreter has a different hash() salt; the vector must not change.
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={"PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    expected = RandomIndexing(8, 0, 10.0).user_vector("u1").tobytes().hex()
    assert out.stdout.strip() == expected


def test_user_vector_cache_is_bounded() -> None:
    ri = RandomIndexing(dims=4, seed=0, half_life_seconds=1.0, cache_size=3)
    first = ri.user_vector("a").copy()
    for name in "bcdef":
        ri.user_vector(name)
    assert len(ri._cache) == 3
    np.testing.assert_array_equal(ri.user_vector("a"), first)


def test_first_event_sets_weighted_user_vector() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=3600.0)
    s = ri.update(None, "u1", 2.0, ts_ms=5)
    np.testing.assert_allclose(s.vector, 2.0 * ri.user_vector("u1"), rtol=1e-6)
    assert (s.last_ts_ms, s.count, s.popularity) == (5, 1, 2.0)


def test_update_after_one_half_life_halves_the_old_vector() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=3600.0)
    s = ri.update(None, "u1", 4.0, ts_ms=0)
    s = ri.update(s, "u2", 1.0, ts_ms=HOUR_MS)
    expected = 2.0 * ri.user_vector("u1") + ri.user_vector("u2")
    np.testing.assert_allclose(s.vector, expected, rtol=1e-6)
    assert (s.last_ts_ms, s.count, s.popularity) == (HOUR_MS, 2, 3.0)
    s = ri.update(s, "u3", 0.0, ts_ms=3 * HOUR_MS)  # two more half-lives: a quarter
    np.testing.assert_allclose(s.vector, expected / 4, rtol=1e-6)
    assert s.popularity == 0.75


def test_out_of_order_event_decays_the_contribution_not_the_vector() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=3600.0)
    s = ri.update(None, "u1", 1.0, ts_ms=2 * HOUR_MS)
    s = ri.update(s, "u2", 1.0, ts_ms=HOUR_MS)
    np.testing.assert_allclose(
        s.vector, ri.user_vector("u1") + 0.5 * ri.user_vector("u2"), rtol=1e-6
    )
    assert (s.last_ts_ms, s.count, s.popularity) == (2 * HOUR_MS, 2, 1.5)


def test_applying_an_event_twice_adds_it_twice() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=3600.0)
    s = ri.update(ri.update(None, "u1", 1.0, 0), "u1", 1.0, 0)
    np.testing.assert_allclose(s.vector, 2 * ri.user_vector("u1"), rtol=1e-6)


def test_update_many_equals_sequential_updates_in_any_order() -> None:
    ri = RandomIndexing(dims=16, seed=3, half_life_seconds=60.0)
    users = ["a", "b", "c", "a", "d"]
    weights = [1.0, 2.0, 0.5, 3.0, 1.0]
    times = [10_000, 70_000, 40_000, 130_000, 5_000]
    start = ri.update(None, "z", 1.0, 0)
    sequential = start
    for u, w, t in zip(users, weights, times, strict=True):
        sequential = ri.update(sequential, u, w, t)
    batch = ri.update_many(start, users, weights, times)
    reverse = ri.update_many(start, users[::-1], weights[::-1], times[::-1])
    for other in (batch, reverse):
        np.testing.assert_allclose(other.vector, sequential.vector, rtol=1e-5, atol=1e-7)
        assert other.last_ts_ms == sequential.last_ts_ms == 130_000
        assert other.count == sequential.count == 6
        assert other.popularity == pytest.approx(sequential.popularity)
    fresh = ri.update_many(None, ["a"], [2.0], [7])
    np.testing.assert_allclose(fresh.vector, ri.update(None, "a", 2.0, 7).vector)
    with pytest.raises(ValueError, match="equal lengths"):
        ri.update_many(None, ["a"], [1.0, 2.0], [1])


def test_item_state_bytes_round_trip_and_dims_check() -> None:
    ri = RandomIndexing(dims=8, seed=0, half_life_seconds=3600.0)
    s = ri.update(ri.update(None, "u1", 1.0, 1), "u2", 2.0, 2)
    data = s.to_bytes()
    assert len(data) == 25 + 4 * 8
    back = ItemState.from_bytes(data, 8)
    np.testing.assert_array_equal(back.vector, s.vector)
    assert (back.last_ts_ms, back.count, back.popularity) == (2, 2, s.popularity)
    with pytest.raises(DimensionError, match="dims=16"):
        ItemState.from_bytes(data, 16)
    with pytest.raises(DimensionError, match="format version"):
        ItemState.from_bytes(b"\x09" + data[1:], 8)
    with pytest.raises(DimensionError, match="shape"):
        RandomIndexing(dims=4, seed=0, half_life_seconds=1.0).update(s, "u1", 1.0, 3)


def test_cosine_of_sketches_tracks_item_knn_cosine() -> None:
    # Items a and b share 40 of their 50 users, c shares none with a: the sketch cosine
    # must be close to the exact cosines 0.8 and 0.0 (error ~ 1/sqrt(dims)).
    ri = RandomIndexing(dims=256, seed=0, half_life_seconds=1e9)
    a = ri.update_many(None, [f"u{k}" for k in range(50)], [1.0] * 50, [0] * 50)
    b = ri.update_many(None, [f"u{k}" for k in range(10, 60)], [1.0] * 50, [0] * 50)
    c = ri.update_many(None, [f"u{k}" for k in range(100, 150)], [1.0] * 50, [0] * 50)

    def cos(x: ItemState, y: ItemState) -> float:
        return float(x.vector @ y.vector / np.linalg.norm(x.vector) / np.linalg.norm(y.vector))

    assert cos(a, b) == pytest.approx(0.8, abs=0.1)
    assert cos(a, c) == pytest.approx(0.0, abs=0.15)


def test_activity_weight() -> None:
    assert activity_weight(1) == 1.0
    assert activity_weight(3) == 0.5
    assert activity_weight(0) == 1.0
