"""The contract every index backend passes, for every metric it supports."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from stream_knn.config import IndexConfig
from stream_knn.errors import ConfigError, DimensionError, IndexError_
from stream_knn.index import (
    AnnoyIndex,
    ExactIndex,
    HnswIndex,
    Index,
    create_index,
    make_index,
)
from stream_knn.index.base import AutoIndex, HiddenIds, search_many

CASES = [
    *[("annoy", m) for m in ("angular", "euclidean", "dot", "manhattan")],
    *[("exact", m) for m in ("angular", "euclidean", "dot", "manhattan")],
    *[("hnsw", m) for m in ("angular", "euclidean", "dot")],
    # "auto" without parameters searches exactly up to 0 items: Annoy here.
    *[("auto", m) for m in ("angular", "euclidean", "dot", "manhattan")],
]
IDS = ["a", "b", "c", "d", "e"]
TINY = np.array([[1, 0], [0, 1], [2, 2], [-1, 0], [3, 0.5]], dtype=np.float32)
QUERY = np.array([1, 0.2], dtype=np.float32)
_QN = math.sqrt(1.04)
#: Neighbours of QUERY in TINY, worked out by hand, best first.
EXPECTED = {
    "angular": [
        ("e", 3.1 / (math.sqrt(9.25) * _QN)),
        ("a", 1 / _QN),
        ("c", 2.4 / (math.sqrt(8) * _QN)),
        ("b", 0.2 / _QN),
        ("d", -1 / _QN),
    ],
    "dot": [("e", 3.1), ("c", 2.4), ("a", 1.0), ("b", 0.2), ("d", -1.0)],
    "euclidean": [
        ("a", -0.2),
        ("b", -math.sqrt(1.64)),
        ("d", -math.sqrt(4.04)),
        ("e", -math.sqrt(4.09)),
        ("c", -math.sqrt(4.24)),
    ],
    "manhattan": [("a", -0.2), ("b", -1.8), ("d", -2.2), ("e", -2.3), ("c", -2.8)],
}


def _new(backend: str, metric: str, dims: int) -> Index:
    return create_index(backend, metric, dims, {})


def _built(backend: str, metric: str, ids: list[str], vectors: npt.NDArray[np.float32]) -> Index:
    index = _new(backend, metric, vectors.shape[1])
    index.build(ids, vectors)
    return index


def _clustered(n: int, dims: int, seed: int) -> npt.NDArray[np.float32]:
    """Gaussian blobs of about 50 items around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 50, 1), dims))
    labels = rng.integers(0, len(centres), size=n)
    return (centres[labels] + 0.5 * rng.normal(size=(n, dims))).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    data = _clustered(5_100, 32, seed=7)
    return [f"i{n}" for n in range(5_000)], data[:5_000], data[5_000:]


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_tiny_set_gives_the_hand_computed_neighbours(backend: str, metric: str) -> None:
    index = _built(backend, metric, IDS, TINY)
    found = index.search(QUERY, 5)
    assert [i for i, _ in found] == [i for i, _ in EXPECTED[metric]]
    assert [s for _, s in found] == pytest.approx([s for _, s in EXPECTED[metric]], abs=1e-5)
    assert index.search(QUERY, 2) == found[:2]
    assert index.search(QUERY, 50) == found


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_recall_at_10_against_exact_at_default_settings(
    backend: str,
    metric: str,
    clustered: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> None:
    ids, vectors, queries = clustered
    oracle = ExactIndex(32, metric)  # type: ignore[arg-type]
    oracle.build(ids, vectors)
    truth = oracle.search_batch(queries, 10)
    index = _built(backend, metric, ids, vectors)
    hits = 0
    for query, expected in zip(queries, truth, strict=True):
        found = index.search(query, 10)
        assert len(found) == 10
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
        hits += len({i for i, _ in found} & {i for i, _ in expected})
    assert hits / (10 * len(queries)) >= 0.95


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_save_load_round_trip_gives_identical_results(
    backend: str,
    metric: str,
    tmp_path: Path,
    clustered: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> None:
    ids, vectors, queries = clustered
    index = _built(backend, metric, ids[:500], vectors[:500])
    index.save(tmp_path)
    # What the saving process serves once saved (Annoy reopens its file): a threaded
    # Annoy build orders its tree roots by when each thread finished, and the file fixes
    # one order, so answers from before the save may differ when the search budget ends
    # between tied roots (seen once in ~600 runs on a busy machine).
    before = [index.search(q, 10) for q in queries[:20]]
    loaded = create_index(backend, metric, 32, index.params)
    loaded.load(tmp_path)
    assert len(loaded) == 500
    assert list(loaded.ids) == ids[:500]
    assert [loaded.search(q, 10) for q in queries[:20]] == before
    assert (loaded.vector(ids[3]) == index.vector(ids[3])).all()  # type: ignore[union-attr]
    assert loaded.vector("nope") is None


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_excluded_ids_are_skipped_and_k_results_still_returned(backend: str, metric: str) -> None:
    index = _built(backend, metric, IDS, TINY)
    order = [i for i, _ in EXPECTED[metric]]
    found = index.search(QUERY, 3, exclude={order[0], order[2], "unknown"})
    assert [i for i, _ in found] == [order[1], order[3], order[4]]
    assert [i for i, _ in index.search(QUERY, 5, exclude=order[:2])] == order[2:]
    assert index.search(QUERY, 3, exclude=IDS) == []


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_empty_index_returns_nothing_and_round_trips(
    backend: str, metric: str, tmp_path: Path
) -> None:
    index = _built(backend, metric, [], np.empty((0, 4), dtype=np.float32))
    assert len(index) == 0
    assert index.search(np.ones(4, dtype=np.float32), 10) == []
    index.save(tmp_path)
    loaded = _new(backend, metric, 4)
    loaded.load(tmp_path)
    assert len(loaded) == 0
    assert loaded.search(np.ones(4, dtype=np.float32), 10) == []


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_wrong_dimensions_and_non_finite_values_are_rejected(backend: str, metric: str) -> None:
    with pytest.raises(DimensionError):
        _new(backend, metric, 3).build(IDS, TINY)
    with pytest.raises(DimensionError):
        _new(backend, metric, 2).build(["a", "b"], [[1.0, 2.0], [1.0, 2.0, 3.0]])  # type: ignore[arg-type]
    with pytest.raises(DimensionError):
        _new(backend, metric, 2).build(["a"], np.array([[np.nan, 1]], dtype=np.float32))
    index = _built(backend, metric, IDS, TINY)
    with pytest.raises(DimensionError):
        index.search(np.ones(3, dtype=np.float32), 2)
    with pytest.raises(DimensionError):
        index.search(np.array([np.inf, 0], dtype=np.float32), 2)


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_build_is_once_with_unique_ids(backend: str, metric: str) -> None:
    index = _built(backend, metric, IDS, TINY)
    assert isinstance(index, Index)
    with pytest.raises(IndexError_):
        index.build(IDS, TINY)
    with pytest.raises(IndexError_):
        _new(backend, metric, 2).build(["a", "a", "b", "c", "d"], TINY)
    with pytest.raises(IndexError_):
        _new(backend, metric, 2).build(["a"], TINY)


def test_hnsw_rejects_manhattan_with_the_valid_metrics() -> None:
    with pytest.raises(ConfigError, match="valid values: angular, dot, euclidean"):
        HnswIndex(4, "manhattan")


def test_make_index_follows_the_config() -> None:
    annoy = make_index(IndexConfig(backend="annoy", n_trees=7, search_k=300, build_threads=1), 8)
    assert isinstance(annoy, AnnoyIndex)
    assert dict(annoy.params) == {"n_trees": 7, "search_k": 300, "build_threads": 1}
    exact = make_index(IndexConfig(backend="exact", metric="dot"), 8)
    assert isinstance(exact, ExactIndex)
    assert (exact.metric, exact.dims) == ("dot", 8)
    hnsw = make_index(IndexConfig(backend="hnsw", hnsw_m=8, hnsw_ef_search=32), 8)
    assert isinstance(hnsw, HnswIndex)
    assert hnsw.params["m"] == 8
    assert hnsw.params["ef_search"] == 32


def test_auto_searches_exactly_up_to_exact_max_items_and_saves_as_the_chosen_backend(
    tmp_path: Path,
    clustered: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> None:
    ids, vectors, queries = clustered
    config = IndexConfig(exact_max_items=1_000, n_trees=5, search_k=-1, build_threads=1)
    for n, backend, kind in ((1_000, "exact", ExactIndex), (1_001, "annoy", AnnoyIndex)):
        index = make_index(config, 32)
        assert isinstance(index, AutoIndex) and index.backend == "auto"
        assert index.search(queries[0], 3) == []
        index.build(ids[:n], vectors[:n])
        assert isinstance(index.chosen, kind) and index.backend == backend
        assert index.params == index.chosen.params
        directory = tmp_path / backend
        directory.mkdir()
        index.save(directory)
        # What the version store does: the saved backend and parameters make the index.
        loaded = create_index(index.backend, "angular", 32, index.params)
        loaded.load(directory)
        assert [loaded.search(q, 10) for q in queries[:5]] == [
            index.search(q, 10) for q in queries[:5]
        ]
    assert dict(make_index(config, 32).params) == {
        "exact_max_items": 1_000,
        "n_trees": 5,
        "search_k": -1,
        "build_threads": 1,
    }


@pytest.mark.parametrize(("backend", "metric"), CASES)
def test_search_many_equals_single_searches(
    backend: str,
    metric: str,
    clustered: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> None:
    ids, vectors, queries = clustered
    index = _built(backend, metric, ids[:2_000], vectors[:2_000])
    rng = np.random.default_rng(4)
    excludes = [{ids[int(i)] for i in rng.integers(0, 2_000, 3)} for _ in range(60)]
    shared = ({ids[int(i)] for i in rng.integers(0, 2_000, 300)}, {"i5", "gone"})
    with ThreadPoolExecutor(1) as pool:
        many = search_many(index, queries[:60], 10, excludes, shared, pool, threads=2)
    hidden_shared = shared[0] | shared[1]
    for query, exclude, got in zip(queries[:60], excludes, many, strict=True):
        one = index.search(query, 10, HiddenIds(exclude, shared, 10))
        assert [i for i, _ in got] == [i for i, _ in one]
        # Float32 rounding: a matrix product of many rows may sum in another order.
        assert [s for _, s in got] == pytest.approx([s for _, s in one], rel=1e-6, abs=1e-5)
        assert len(got) == 10 and not {i for i, _ in got} & (exclude | hidden_shared)
    with pytest.raises(ValueError, match="2 exclusion sets for 60 queries"):
        search_many(index, queries[:60], 10, excludes[:2])


def test_exact_search_many_returns_fewer_when_most_items_are_excluded() -> None:
    index = _built("exact", "dot", IDS, TINY)
    got = search_many(index, np.stack([QUERY, QUERY]), 4, [{"a", "b"}, set()], [{"e"}])
    assert [[i for i, _ in row] for row in got] == [["c", "d"], ["c", "a", "b", "d"]]
    assert [s for _, s in got[1]] == pytest.approx([2.4, 1.0, 0.2, -1.0])


def test_exact_search_batch_equals_single_searches() -> None:
    index = _built("exact", "euclidean", IDS, TINY)
    queries = np.stack([QUERY, -QUERY, np.zeros(2, dtype=np.float32)])
    assert index.search_batch(queries, 3, exclude={"b"}) == [  # type: ignore[attr-defined]
        index.search(q, 3, exclude={"b"}) for q in queries
    ]
