"""The index lifecycle: exact delta merged with the live index, background rebuilds, warm start."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import stream_knn.index.builder as builder_module
from stream_knn.config import IndexConfig
from stream_knn.errors import DimensionError, IndexError_
from stream_knn.index import ExactIndex, Index, IndexManager, IndexStore, VersionInfo
from stream_knn.index.manager import BASIS_FILE

DIMS = 4
QUIET = {"rebuild_interval_seconds": 3600.0, "rebuild_min_changes": 10_000}


def _config(**overrides: object) -> IndexConfig:
    values: dict[str, object] = {
        "backend": "annoy",
        "metric": "euclidean",
        "n_trees": 4,
        "recall_sample_rate": 0.0,
    }
    values.update(QUIET)
    values.update(overrides)
    return IndexConfig(**values)  # type: ignore[arg-type]


def _vec(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def _items(n: int, seed: int = 0) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {f"i{k}": rng.normal(size=DIMS).astype(np.float32) for k in range(n)}


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition``; the timeout only bounds a hang, it asserts no speed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def _exact_ids(
    vectors: dict[str, npt.NDArray[np.float32]], query: npt.NDArray[np.float32], k: int
) -> list[str]:
    oracle = ExactIndex(DIMS, "euclidean")
    oracle.build(list(vectors), np.stack(list(vectors.values())))
    return [i for i, _ in oracle.search(query, k)]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[IndexManager]:
    m = IndexManager(_config(), tmp_path / "index", DIMS)
    yield m
    m.stop()


def test_items_changed_after_the_build_are_searched_from_their_current_vector(
    manager: IndexManager,
) -> None:
    for item_id, vector in _items(50).items():
        manager.upsert(item_id, vector)
    info = manager.rebuild_now()
    assert info is not None
    assert (manager.version, info.item_count, manager.pending_items) == (1, 50, 0)
    query = _vec(5, 5, 5, 5)
    manager.upsert("fresh", _vec(5, 5, 5, 4.5))
    manager.upsert("i3", _vec(5, 5, 5, 5.25))  # moved next to the query since the build
    assert manager.pending_items == 2
    found = manager.search(query, 3)
    assert [i for i, _ in found[:2]] == ["i3", "fresh"]
    assert [s for _, s in found[:2]] == pytest.approx([-0.25, -0.5])
    current = manager.vectors_snapshot()
    assert [i for i, _ in manager.search(query, 10)] == _exact_ids(current, query, 10)
    assert manager.item_count == 51


def test_deleted_items_are_never_returned(manager: IndexManager) -> None:
    items = _items(30)
    for item_id, vector in items.items():
        manager.upsert(item_id, vector)
    manager.rebuild_now()
    manager.upsert("fresh", items["i0"] + 0.01)
    assert manager.delete("i0") is True  # in the live index
    assert manager.delete("fresh") is True  # in the delta
    assert manager.delete("never-seen") is False
    everything = {i for i, _ in manager.search(items["i0"], 100)}
    assert everything == set(items) - {"i0"}
    assert manager.similar("i0", 5) is None
    manager.rebuild_now()
    assert {i for i, _ in manager.search(items["i0"], 100)} == set(items) - {"i0"}
    # Upserting a deleted id brings it back.
    manager.upsert("i0", items["i0"])
    assert manager.search(items["i0"], 1)[0][0] == "i0"


def test_similar_excludes_the_item_itself(manager: IndexManager) -> None:
    manager.upsert("a", _vec(0, 0, 0, 0))
    manager.upsert("b", _vec(0, 0, 0, 1))
    manager.upsert("c", _vec(0, 0, 0, 3))
    manager.rebuild_now()
    manager.upsert("d", _vec(0, 0, 0, 0.5))
    assert manager.similar("a", 2) == [("d", -0.5), ("b", -1.0)]
    assert manager.similar("zzz", 2) is None


def test_bad_vectors_are_rejected_on_upsert(manager: IndexManager) -> None:
    with pytest.raises(DimensionError):
        manager.upsert("a", _vec(1, 2, 3))
    with pytest.raises(DimensionError):
        manager.upsert("a", _vec(1, 2, float("nan"), 4))
    with pytest.raises(DimensionError):
        manager.upsert("a", _vec(1, 2, float("inf"), 4))
    assert manager.item_count == 0
    with pytest.raises(DimensionError):
        manager.search(_vec(1, 2), 3)


class _GatedExact(ExactIndex):
    """An exact index whose build waits for the test to open a gate."""

    entered = threading.Event()
    gate = threading.Event()

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        type(self).entered.set()
        assert type(self).gate.wait(30)
        super().build(ids, vectors)


def test_rebuild_runs_in_the_background_while_upserts_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _GatedExact.entered = threading.Event()
    _GatedExact.gate = threading.Event()
    monkeypatch.setattr(
        builder_module, "make_index", lambda config, dims: _GatedExact(dims, config.metric)
    )
    swaps: list[tuple[VersionInfo, VersionInfo | None]] = []
    m = IndexManager(
        _config(rebuild_min_changes=40),
        tmp_path,
        DIMS,
        on_swap=lambda new, old: swaps.append((new, old)),
        build_in_process=True,  # the gate is a class of this process
    )
    m.start()
    try:
        items = _items(70)
        names = list(items)
        for item_id in names[:40]:
            m.upsert(item_id, items[item_id])
        assert _GatedExact.entered.wait(30), "the 40th change should start a build"
        # The build is blocked: upserts and searches go on meanwhile.
        for item_id in names[40:]:
            m.upsert(item_id, items[item_id])
        assert m.version is None
        assert m.search(items["i65"], 1)[0][0] == "i65"
        _GatedExact.gate.set()
        _wait_for(lambda: m.version == 1, "the swap")
        assert swaps[0][0].version == 1
        assert swaps[0][0].item_count == 40
        assert swaps[0][1] is None
        # Only the items changed after the snapshot are left in the delta.
        assert m.pending_items == 30
        for item_id in names:
            assert m.search(items[item_id], 1)[0] == (item_id, 0.0)
        assert m.last_build_seconds is not None
        assert m.age_seconds is not None
    finally:
        _GatedExact.gate.set()
        m.stop()


def test_reaching_max_delta_items_forces_a_build(tmp_path: Path) -> None:
    m = IndexManager(_config(max_delta_items=10), tmp_path, DIMS)
    m.start()
    try:
        for item_id, vector in _items(10).items():
            m.upsert(item_id, vector)
        _wait_for(lambda: m.version == 1, "the forced build")
        assert m.pending_items == 0
    finally:
        m.stop()


@pytest.mark.parametrize("backend", ["annoy", "exact"])
def test_a_stale_share_of_the_live_items_forces_a_build(tmp_path: Path, backend: str) -> None:
    # Every query scores the delta on top of the live rows, for an exact index too.
    m = IndexManager(
        _config(backend=backend, max_delta_share=0.25), tmp_path, DIMS, build_in_process=True
    )
    items = _items(400)
    for item_id, vector in items.items():
        m.upsert(item_id, vector)
    m.rebuild_now()
    # 200 of 400 live items changed: past the share (100) but under max_delta_items.
    for item_id, vector in list(items.items())[:200]:
        m.upsert(item_id, -vector)
    assert m.pending_items == 200
    assert m._due() == "max_delta_items"


def test_warm_start_serves_the_newest_valid_version(tmp_path: Path) -> None:
    items = _items(20)
    first = IndexManager(_config(), tmp_path, DIMS)
    for item_id, vector in list(items.items())[:10]:
        first.upsert(item_id, vector)
    first.rebuild_now()
    for item_id, vector in list(items.items())[10:]:
        first.upsert(item_id, vector)
    first.rebuild_now()
    first.upsert("extra", _vec(9, 9, 9, 9))
    newest = first.rebuild_now()
    assert newest is not None
    data = (newest.path / "index.ann").read_bytes()
    (newest.path / "index.ann").write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])

    swaps: list[int] = []
    second = IndexManager(
        _config(), tmp_path, DIMS, on_swap=lambda new, old: swaps.append(new.version)
    )
    second.start()
    try:
        assert (second.version, swaps) == (2, [2])
        # Served from the loaded version before any vector was fed in.
        assert second.search(items["i15"], 1)[0][0] == "i15"
        assert second.similar("i15", 1) is not None
        # Replaying the vectors it was built from changes nothing...
        for item_id, vector in items.items():
            second.upsert(item_id, vector)
        assert second.pending_items == 0
        # ...a genuinely new vector does.
        second.upsert("i4", items["i4"] + 1)
        assert second.pending_items == 1
    finally:
        second.stop()


def test_failed_write_keeps_the_old_version_serving_and_counts_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = IndexManager(_config(), tmp_path, DIMS, build_in_process=True)
    items = _items(20)
    for item_id, vector in items.items():
        m.upsert(item_id, vector)
    m.rebuild_now()
    m.upsert("fresh", _vec(7, 7, 7, 7))

    def full(directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexStore, "write", _failing_write(full))
    with pytest.raises(IndexError_, match="No space left"):
        m.rebuild_now()
    assert (m.build_errors, m.version, m.pending_items) == (1, 1, 1)
    assert m.store.write_errors == 1
    assert [v.version for v in m.store.versions()] == [1]
    assert m.search(_vec(7, 7, 7, 7), 1)[0][0] == "fresh"
    assert m.search(items["i2"], 1)[0][0] == "i2"
    m.rebuild_now(wait=False)  # in the background: counted, not raised
    _wait_for(lambda: m.build_errors == 2, "the background build error")
    assert m.version == 1


def _failing_write(
    save: Callable[[Path], None],
) -> Callable[..., VersionInfo]:
    real = IndexStore.write

    def write(
        self: IndexStore,
        index: Index,
        build_seconds: float,
        extras: Mapping[str, bytes] | None = None,
    ) -> VersionInfo:
        setattr(index, "save", save)  # noqa: B010 - replacing a method of one instance
        return real(self, index, build_seconds, extras)

    return write


def test_pinned_version_is_served_and_new_builds_are_not_swapped_in(tmp_path: Path) -> None:
    m = IndexManager(_config(), tmp_path, DIMS)
    m.upsert("a", _vec(0, 0, 0, 0))
    m.rebuild_now()
    m.upsert("b", _vec(1, 0, 0, 0))
    m.rebuild_now()
    m.store.pin(1)
    m.start()
    try:
        assert (m.version, m.pinned) == (1, 1)
        # "b" is not in version 1 but stays findable through the delta.
        assert [i for i, _ in m.search(_vec(1, 0, 0, 0), 2)] == ["b", "a"]
        info = m.rebuild_now()
        assert info is not None
        assert info.version == 3
        assert m.version == 1
        m.store.unpin()
        _wait_for(lambda: m.version == 3, "serving the newest version after unpin")
        assert m.pending_items == 0
    finally:
        m.stop()


def test_sampled_recall_compares_with_exact_search(tmp_path: Path) -> None:
    exact = IndexManager(_config(backend="exact", recall_sample_rate=1.0), tmp_path / "e", DIMS)
    poor = IndexManager(
        _config(n_trees=1, search_k=1, recall_sample_rate=1.0), tmp_path / "p", DIMS
    )
    items = _items(2000, seed=3)
    for m in (exact, poor):
        assert m.sampled_recall() is None
        for item_id, vector in items.items():
            m.upsert(item_id, vector)
        m.rebuild_now()
        for query in list(items.values())[:20]:
            m.search(query, 10)
    assert exact.sampled_recall(settle_seconds=30.0) == 1.0
    recall = poor.sampled_recall(settle_seconds=30.0)
    assert recall is not None
    assert recall < 0.9


# -- a new embedding basis ------------------------------------------------------------------


def test_replace_all_serves_the_new_vectors_at_once_and_saves_their_basis(
    tmp_path: Path,
) -> None:
    m = IndexManager(_config(), tmp_path, DIMS)
    m.upsert("a", _vec(1, 0, 0, 0))
    m.upsert("b", _vec(0, 1, 0, 0))
    m.upsert("gone", _vec(0, 0, 1, 0))
    m.rebuild_now()
    m.upsert("b", _vec(0, 2, 0, 0))  # pending in the delta of version 1
    info = m.replace_all({"a": _vec(0, 0, 0, 1), "b": _vec(0, 0, 1, 0)}, basis=b"basis-2")
    assert (info.version, m.version, m.item_count, m.pending_items) == (2, 2, 2, 0)
    assert m.basis == b"basis-2"
    a = m.vector("a")
    assert a is not None and a.tolist() == [0, 0, 0, 1]
    # Only the new vectors answer; an item left out is gone like a delete.
    assert [i for i, _ in m.search(_vec(0, 0, 1, 0), 3)] == ["b", "a"]
    assert m.vector("gone") is None
    assert m.store.read_extra(2, BASIS_FILE) == b"basis-2"
    # Later versions keep the basis; a warm start reads it back.
    m.upsert("c", _vec(0, 0, 1, 1))
    m.rebuild_now()
    assert m.store.read_extra(3, BASIS_FILE) == b"basis-2"
    warm = IndexManager(_config(), tmp_path, DIMS)
    warm.start()
    try:
        assert (warm.version, warm.basis) == (3, b"basis-2")
    finally:
        warm.stop()


def test_replace_all_that_fails_to_build_switches_nothing(tmp_path: Path) -> None:
    m = IndexManager(_config(), tmp_path, DIMS, build_in_process=True)
    m.upsert("a", _vec(1, 0, 0, 0))
    m.rebuild_now()

    def full(directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IndexStore, "write", _failing_write(full))
        with pytest.raises(IndexError_, match="No space left"):
            m.replace_all({"a": _vec(0, 1, 0, 0)}, basis=b"new")
    assert (m.version, m.basis, m.build_errors) == (1, None, 1)
    a = m.vector("a")
    assert a is not None and a.tolist() == [1, 0, 0, 0]


def test_search_among_many_changed_items_equals_an_exact_search_of_the_current_vectors(
    tmp_path: Path,
) -> None:
    # Items a user has just moved sit nearest that user's query: the live index must skip
    # them (stale) and the delta answer them, in one pass, with nothing missing.
    m = IndexManager(_config(backend="exact"), tmp_path, DIMS)
    items = _items(200, seed=5)
    for item_id, vector in items.items():
        m.upsert(item_id, vector)
    m.rebuild_now()
    query = _vec(1, 1, 0, 0)
    rng = np.random.default_rng(9)
    for n in range(60):  # 60 items moved next to the query after the build
        moved = (query + rng.normal(0, 0.05, DIMS)).astype(np.float32)
        items[f"i{n}"] = moved
        m.upsert(f"i{n}", moved)
    found = m.search(query, 10, exclude={"i0", "i150"})
    ids = [i for i in items if i not in {"i0", "i150"}]
    distances = np.linalg.norm(np.stack([items[i] for i in ids]) - query, axis=1)
    expected = [ids[p] for p in np.argsort(distances, kind="stable")[:10]]
    assert [i for i, _ in found] == expected


# -- builds in the build process ------------------------------------------------------------


def _refuse_to_build(config: object, dims: int) -> Index:
    raise AssertionError("the index was built in the worker's process")


def test_a_build_in_the_child_process_serves_what_an_in_process_build_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _items(300, seed=11)
    local = IndexManager(_config(backend="exact"), tmp_path / "local", DIMS, build_in_process=True)
    for item_id, vector in items.items():
        local.upsert(item_id, vector)
    local.rebuild_now()
    # Building in this process now fails: the child, a fresh interpreter, does not.
    monkeypatch.setattr(builder_module, "make_index", _refuse_to_build)
    child = IndexManager(_config(backend="exact"), tmp_path / "child", DIMS)
    try:
        for item_id, vector in items.items():
            child.upsert(item_id, vector)
        info = child.rebuild_now()
        assert info is not None
        assert (child.version, info.item_count, child.pending_items, child.build_errors) == (
            1,
            300,
            0,
            0,
        )
        assert child.store.verify(1).files == info.files
        for query in list(items.values())[:20]:
            assert child.search(query, 10) == local.search(query, 10)
        assert child.similar("i7", 5) == local.similar("i7", 5)
    finally:
        child.stop()


def test_an_annoy_version_built_in_the_child_process_is_memory_mapped_and_searched(
    tmp_path: Path,
) -> None:
    m = IndexManager(_config(), tmp_path, DIMS)
    m.start()
    try:
        items = _items(200, seed=2)
        for item_id, vector in items.items():
            m.upsert(item_id, vector)
        info = m.rebuild_now()
        assert info is not None and info.backend == "annoy"
        assert (m.version, m.pending_items) == (1, 0)
        for item_id, vector in items.items():
            assert m.search(vector, 1)[0] == (item_id, pytest.approx(0.0, abs=1e-5))
        # The builder thread builds through the child too.
        m.upsert("fresh", _vec(9, 9, 9, 9))
        m.rebuild_now(wait=False)
        _wait_for(lambda: m.version == 2, "the background build")
        assert m.search(_vec(9, 9, 9, 9), 1)[0][0] == "fresh"
    finally:
        m.stop()
    # A build after stop() starts a new child process.
    m.upsert("later", _vec(-9, -9, -9, -9))
    assert m.rebuild_now() is not None and m.version == 3
    m.stop()


def test_a_failed_child_build_counts_an_error_and_keeps_the_old_version(tmp_path: Path) -> None:
    m = IndexManager(_config(), tmp_path, DIMS)
    try:
        items = _items(20)
        for item_id, vector in items.items():
            m.upsert(item_id, vector)
        m.rebuild_now()
        m.upsert("fresh", _vec(7, 7, 7, 7))
        # A file where the next version's directory goes: the child cannot write it.
        (tmp_path / "v000002").write_bytes(b"in the way")
        with pytest.raises(IndexError_, match="could not write index version 2"):
            m.rebuild_now()
        assert (m.build_errors, m.version, m.pending_items) == (1, 1, 1)
        assert m.store.write_errors == 1
        assert [v.version for v in m.store.versions()] == [1]
        assert m.search(_vec(7, 7, 7, 7), 1)[0][0] == "fresh"
        assert m.search(items["i2"], 1)[0][0] == "i2"
        # Nothing of the failed build is left behind, and the next build succeeds.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v000001", "v000002"]
        (tmp_path / "v000002").unlink()
        info = m.rebuild_now()
        assert info is not None and (info.version, m.version, m.pending_items) == (2, 2, 0)
    finally:
        m.stop()


# -- many vectors at once -------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "angular"])
def test_upsert_many_equals_upserting_each_row_in_order(tmp_path: Path, metric: str) -> None:
    items = _items(40, seed=4)
    one, many = (
        IndexManager(
            _config(backend="exact", metric=metric), tmp_path / name, DIMS, build_in_process=True
        )
        for name in ("one", "many")
    )
    for m in (one, many):
        m.upsert_many(list(items), np.stack(list(items.values())))
        m.rebuild_now()
        m.delete("i5")
    rng = np.random.default_rng(8)
    # New items, moved items, items set back to their built vector (no change then), a
    # deleted item brought back, and ids repeated within the batch (the last row wins).
    ids = ["new0", "i1", "i2", "i3", "i5", "i2", "new0", "i9", "i3"]
    rows = rng.normal(size=(len(ids), DIMS)).astype(np.float32)
    rows[3] = items["i3"] * (3.0 if metric == "angular" else 1.0)
    rows[4] = items["i5"]
    rows[7] = items["i9"]
    rows[8] = items["i3"]
    for item_id, row in zip(ids, rows, strict=True):
        one.upsert(item_id, row)
    many.upsert_many(ids, rows)
    assert many.change_seq == one.change_seq
    assert many.pending_items == one.pending_items == 3  # new0, i1, i2
    assert many.item_count == one.item_count == 41
    for item_id in [*items, "new0"]:
        a, b = one.vector(item_id), many.vector(item_id)
        assert a is not None and b is not None
        assert b.tolist() == a.tolist()
        assert not b.flags.writeable
    assert many.vector("new0").tolist() == rows[6].tolist()  # type: ignore[union-attr]
    for query in rows:
        assert many.search(query, 8) == one.search(query, 8)


def test_upsert_many_rejects_a_bad_batch_whole(manager: IndexManager) -> None:
    with pytest.raises(DimensionError, match="2 ids for 1 vectors"):
        manager.upsert_many(["a", "b"], np.ones((1, DIMS), dtype=np.float32))
    with pytest.raises(DimensionError):
        manager.upsert_many(["a", "b"], np.ones((2, DIMS - 1), dtype=np.float32))
    bad = np.ones((2, DIMS), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(DimensionError, match="row 1"):
        manager.upsert_many(["a", "b"], bad)
    assert (manager.item_count, manager.change_seq) == (0, 0)
    manager.upsert_many([], np.empty((0, DIMS), dtype=np.float32))
    assert manager.change_seq == 0


def test_the_rows_hidden_from_the_live_index_follow_every_change(tmp_path: Path) -> None:
    # A batch search skips the live rows of changed and deleted items through a mask kept
    # up to date by each change; it must always equal what the changed and deleted ids say.
    m = IndexManager(_config(backend="exact"), tmp_path, DIMS, build_in_process=True)
    try:
        items = _items(40)
        m.upsert_many(list(items), np.stack(list(items.values())))
        m.rebuild_now()
        rng = np.random.default_rng(3)

        def expected() -> set[int]:
            live = m._live
            assert live is not None
            gone = set(m._changed) | m._tombstones
            return {pos for item, pos in live.positions.items() if item in gone}

        for step in range(60):
            pick = [f"i{j}" for j in rng.choice(40, size=3, replace=False)]
            if step % 7 == 3:
                m.delete(pick[0])
            elif step % 5 == 0:
                # Back to the vectors the live version was built from: no longer hidden.
                m.upsert_many(pick, np.stack([items[i] for i in pick]))
            else:
                m.upsert_many(pick, rng.normal(size=(3, DIMS)).astype(np.float32))
            if step == 30:
                m.rebuild_now()
            live = m._live
            assert live is not None
            assert set(np.flatnonzero(live.hidden).tolist()) == expected()
            query = rng.normal(size=(2, DIMS)).astype(np.float32)
            batch, single = m.search_many(query, 5, [(), ()]), [m.search(q, 5) for q in query]
            assert [[i for i, _ in row] for row in batch] == [[i for i, _ in r] for r in single]
    finally:
        m.stop()


@pytest.mark.parametrize("metric", ["euclidean", "angular"])
def test_every_build_indexes_exactly_the_current_vectors(tmp_path: Path, metric: str) -> None:
    # A build starts from the live version's matrix and changes only the rows changed since
    # (new items appended); deletes and re-added items fall back to stacking every vector.
    # Either way the version must hold each current item once, with its current vector.
    m = IndexManager(_config(backend="exact", metric=metric), tmp_path, DIMS, build_in_process=True)
    try:
        current = _items(50)
        m.upsert_many(list(current), np.stack(list(current.values())))
        rng = np.random.default_rng(11)
        for step in range(12):
            changed = [f"i{j}" for j in rng.choice(50 + 5 * step, size=8, replace=False)]
            changed += [f"i{50 + 5 * step + j}" for j in range(5)]  # new items
            vectors = rng.normal(size=(len(changed), DIMS)).astype(np.float32)
            m.upsert_many(changed, vectors)
            current.update(zip(changed, vectors, strict=True))
            if step % 4 == 2:
                gone = next(iter(current))
                m.delete(gone)
                del current[gone]
            if step % 4 == 3:  # deleted earlier, now back
                m.upsert(gone, vectors[0])
                current[gone] = vectors[0]
            m.rebuild_now()
            live = m._live
            assert live is not None
            assert sorted(live.index.ids) == sorted(current)
            assert dict(live.positions) == {i: p for p, i in enumerate(live.index.ids)}
            for item_id, vector in current.items():
                row = live.matrix[live.positions[item_id]]
                np.testing.assert_array_equal(row, vector)
                indexed = live.index.vector(item_id)
                assert indexed is not None
                if metric == "euclidean":
                    np.testing.assert_allclose(indexed, vector, rtol=1e-6)
            assert not live.hidden.any()
    finally:
        m.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_build_process_runs_at_the_configured_priority(tmp_path: Path) -> None:
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    expected = {
        "idle": (os.SCHED_IDLE, None),
        "low": (os.SCHED_OTHER, min(19, own_nice + 5)),
        "normal": (os.SCHED_OTHER, own_nice),
    }
    for priority, (policy, nice) in expected.items():
        m = IndexManager(_config(build_priority=priority), tmp_path / priority, DIMS)
        try:
            m.upsert("a", _vec(1, 0, 0, 0))
            m.rebuild_now()
            assert m.version == 1
            executor = m._builder._executor  # type: ignore[union-attr]
            assert executor is not None
            for pid in executor._processes:  # type: ignore[attr-defined]
                assert os.sched_getscheduler(pid) == policy, priority
                if nice is not None:
                    assert os.getpriority(os.PRIO_PROCESS, pid) == nice, priority
                # Idle and low builds leave the worker's session (and autogroup), so
                # their CPU is not charged to the worker's share.
                assert (os.getsid(pid) == pid) == (priority != "normal"), priority
                autogroup = Path(f"/proc/{pid}/autogroup")
                if priority != "normal" and autogroup.exists():
                    want = {"idle": 19, "low": 5}[priority]
                    assert autogroup.read_text().split()[-1] == str(want), priority
        finally:
            m.stop()


def test_vectors_reach_the_build_process_through_shared_memory_or_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_knn.index import builder

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(builder, "_SHM", shm)
    root = tmp_path / "versions"
    made = builder._handover_dir(root, 1000)
    assert made.parent == shm and made.name.startswith(f"stream-knn-build-{os.getpid()}-")
    # No room (or no /dev/shm at all): next to the versions, as before.
    monkeypatch.setattr(builder, "_SHM", tmp_path / "missing")
    fallback = builder._handover_dir(root, 1000)
    assert fallback.parent == root and fallback.name.startswith(".build-")

    # A hand-over left by a worker that no longer runs is removed; a live one stays.
    monkeypatch.setattr(builder, "_SHM", shm)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = shm / f"stream-knn-build-{dead.pid}-x1"
    stale.mkdir()
    (stale / "vectors.npy").write_bytes(b"0" * 100)
    alive = shm / f"stream-knn-build-{os.getppid()}-x2"
    alive.mkdir()
    builder._remove_stale_handovers()
    assert not stale.exists() and alive.exists() and made.exists()

    # A build through the process leaves no hand-over behind.
    m = IndexManager(_config(), tmp_path / "built", DIMS)
    try:
        m.upsert("a", _vec(1, 0, 0, 0))
        m.rebuild_now()
        assert m.version == 1
    finally:
        m.stop()
    assert sorted(p.name for p in shm.iterdir()) == sorted([alive.name, made.name])


def test_a_paced_build_is_stopped_part_of_the_time_and_always_resumed(tmp_path: Path) -> None:
    """index.build_cpu_share < 1: the build process is seen stopped while it builds, the
    version equals an unpaced one, and the process runs again afterwards."""
    from stream_knn.index.builder import BuildJob, BuildProcess

    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(30_000, 32)).astype(np.float32)
    ids = [f"i{j}" for j in range(len(matrix))]
    config = _config(n_trees=10, build_cpu_share=0.25)
    process = BuildProcess("normal", cpu_share=0.25)
    states: set[str] = set()
    done = threading.Event()
    built: list[object] = []

    def build() -> None:
        try:
            built.append(process.build(BuildJob(tmp_path / "v", 5, config, 32, ids, matrix)))
        finally:
            done.set()

    try:
        thread = threading.Thread(target=build)
        thread.start()
        while not done.is_set():
            pid = process._pid
            if pid:
                stat = Path(f"/proc/{pid}/stat").read_text()
                states.add(stat.rsplit(")", 1)[1].split()[0])
        thread.join()
        assert built, "the paced build failed"
        assert "T" in states, f"never seen stopped: {states}"
        pid = process._pid
        assert pid is not None
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert stat.rsplit(")", 1)[1].split()[0] != "T"
        store = IndexStore(tmp_path / "v")
        index = store.load(store.versions()[-1].version)
        assert sorted(index.ids) == sorted(ids)
    finally:
        process.shutdown()


_PACED_PARENT = """
import sys, threading, time
from pathlib import Path
import numpy as np
from stream_knn.config import IndexConfig
from stream_knn.index.builder import BuildJob, BuildProcess
matrix = np.random.default_rng(1).normal(size=(60_000, 32)).astype(np.float32)
ids = [f"i{j}" for j in range(len(matrix))]
process = BuildProcess("idle", cpu_share=0.05)
job = BuildJob(Path(sys.argv[1]), 5, IndexConfig(backend="annoy", n_trees=20), 32, ids, matrix)
threading.Thread(target=process.build, args=(job,), daemon=True).start()
while not process._pid:
    time.sleep(0.01)
print(process._pid, flush=True)
time.sleep(600)
"""


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_a_build_process_left_stopped_by_a_killed_worker_dies_with_it(tmp_path: Path) -> None:
    """kill -9 of the worker while its paced build process is stopped: the build process
    must not stay behind, stopped for good."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PACED_PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while _state(child) != "T":  # caught while stopped by the pacing
            assert time.monotonic() < deadline, "the paced build process was never stopped"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while _state(child) not in (None, "Z"):
            assert time.monotonic() < deadline, f"build process left in state {_state(child)}"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
