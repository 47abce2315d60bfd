"""Versioned index directories: atomic writes, checksums, pruning, pinning, disk full."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_knn.errors import CorruptIndexError, IndexError_
from stream_knn.index import AnnoyIndex, ExactIndex, Index, IndexStore

IDS = ["a", "b", "c"]
VECTORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
QUERY = np.array([0.9, 0.1, 0], dtype=np.float32)


def _index(n_items: int = 3) -> Index:
    index = AnnoyIndex(3, "euclidean", n_trees=2)
    index.build(IDS[:n_items], VECTORS[:n_items])
    return index


def test_write_creates_a_complete_version_directory(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index", keep_versions=3)
    info = store.write(_index(), build_seconds=0.25)
    assert info.version == 1
    assert info.path == tmp_path / "index" / "v000001"
    assert sorted(os.listdir(info.path)) == ["ids.json", "index.ann", "meta.json"]
    assert sorted(info.files) == ["ids.json", "index.ann"]
    assert (info.backend, info.metric, info.dims, info.item_count) == ("annoy", "euclidean", 3, 3)
    assert info.build_seconds == 0.25
    assert info.params == {"n_trees": 2, "search_k": -1, "build_threads": -1}
    meta = orjson.loads((info.path / "meta.json").read_bytes())
    assert meta["version"] == 1
    assert len(meta["files"]["index.ann"]) == 64
    assert orjson.loads((info.path / "ids.json").read_bytes()) == IDS
    # Nothing but the version directory remains: the temp dir was renamed, not copied.
    assert os.listdir(tmp_path / "index") == ["v000001"]
    loaded = store.load(1)
    assert loaded.search(QUERY, 2) == _index().search(QUERY, 2)
    assert [v.version for v in store.versions()] == [1]
    assert store.write(_index(), 0.1).version == 2


def test_write_goes_through_a_temp_dir_and_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IndexStore(tmp_path, keep_versions=3)
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def spy(src: str | Path, dst: str | Path) -> None:
        # At rename time the temp dir is complete (meta.json written last).
        assert sorted(os.listdir(src)) == ["ids.json", "index.ann", "meta.json"]
        assert not Path(dst).exists()
        renames.append((Path(src).name, Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    store.write(_index(), 0.1)
    assert len(renames) == 1
    assert renames[0][0].startswith(".tmp-v000001-")
    assert renames[0][1] == "v000001"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_versions_are_detected_and_skipped(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = IndexStore(tmp_path, keep_versions=5)
    store.write(_index(2), 0.1)
    second = store.write(_index(3), 0.1)
    path = second.path / "index.ann"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:10] + bytes([data[10] ^ 0x01]) + data[11:])
    else:
        path.unlink()
    with pytest.raises(CorruptIndexError, match="version 2"):
        store.load(2)
    with caplog.at_level(logging.WARNING, logger="stream_knn.index.store"):
        found = store.latest_valid()
    assert found is not None
    info, index = found
    assert info.version == 1
    assert len(index) == 2
    assert any("skipping index version 2" in r.getMessage() for r in caplog.records)


def test_unreadable_meta_is_corrupt(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    info = store.write(_index(), 0.1)
    (info.path / "meta.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match=r"meta\.json"):
        store.load(1)
    assert store.versions() == []
    assert store.latest_valid() is None


def test_latest_valid_skips_other_dims_and_metrics(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    store.write(_index(), 0.1)
    exact = ExactIndex(3, "dot")
    exact.build(IDS, VECTORS)
    store.write(exact, 0.1)
    found = store.latest_valid(metric="euclidean")
    assert found is not None
    assert found[0].version == 1
    assert store.latest_valid(dims=4) is None
    newest = store.latest_valid()
    assert newest is not None
    assert (newest[0].version, newest[0].backend) == (2, "exact")


def test_prune_keeps_the_newest_and_the_pinned_and_protected(tmp_path: Path) -> None:
    store = IndexStore(tmp_path, keep_versions=2)
    for _ in range(6):
        store.write(_index(), 0.1)
    store.pin(2)
    (tmp_path / ".tmp-v000099-deadbeef").mkdir()
    assert store.prune(protect={4}) == [1, 3]
    assert [v.version for v in store.versions()] == [2, 4, 5, 6]
    assert not (tmp_path / ".tmp-v000099-deadbeef").exists()
    store.unpin()
    assert store.prune() == [2, 4]
    # Numbers keep growing after pruning: a version number is never reused.
    assert store.write(_index(), 0.1).version == 7


def test_pin_and_unpin(tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    assert store.pinned() is None
    store.write(_index(), 0.1)
    store.write(_index(), 0.1)
    assert store.pin(1).version == 1
    assert store.pinned() == 1
    assert (tmp_path / "PINNED").read_text().strip() == "1"
    with pytest.raises(CorruptIndexError, match="does not exist"):
        store.pin(9)
    assert store.pinned() == 1
    store.unpin()
    assert store.pinned() is None
    store.unpin()  # unpinning twice is fine


def test_disk_full_cleans_up_and_keeps_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IndexStore(tmp_path)
    store.write(_index(2), 0.1)
    index = _index(3)

    def full(directory: Path) -> None:
        (directory / "index.ann").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index, "save", full)
    with pytest.raises(IndexError_, match="No space left"):
        store.write(index, 0.1)
    assert store.write_errors == 1
    assert os.listdir(tmp_path) == ["v000001"]
    found = store.latest_valid()
    assert found is not None
    assert (found[0].version, len(found[1])) == (1, 2)
