"""The index lifecycle of a real ``stream-knn worker`` on a real broker.

A fresh item is served (exact delta search) before the next build; builds happen while
events keep flowing; a corrupt newest version is skipped on restart.

Builds are steered with two settings: ``index.rebuild_min_changes`` (a build as soon as this
many items changed) and ``index.rebuild_interval_seconds`` (3600: no build by the clock).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_knn.events.synthetic import SyntheticStream

pytestmark = pytest.mark.integration

#: Items per batch; also ``index.rebuild_min_changes`` in the tests that count builds.
BATCH = 40
NO_CLOCK = "3600"


def _event(user: str, item: str, n: int, event_type: str = "view") -> tuple[bytes, bytes]:
    body = {
        "user_id": user,
        "item_id": item,
        "event_type": event_type,
        "ts": 1_700_000_000_000 + n * 10,
        "event_id": f"ev-{user}-{item}-{n}",
    }
    return user.encode(), orjson.dumps(body)


def _batch(prefix: str, start: int = 0, users: str = "p") -> list[tuple[bytes, bytes]]:
    """``BATCH`` events, one per new item ``<prefix><j>``, by users ``<users>0..19``: items
    ``<prefix>j`` and ``<prefix>(j+20)`` share their only user, so they are twins."""
    return [_event(f"{users}{j % 20}", f"{prefix}{j}", start + j) for j in range(BATCH)]


def _index(env: Any) -> dict[str, Any]:
    status, body = env.get("/index")
    assert status == 200, body
    out: dict[str, Any] = body["indexes"][0]
    out["replicated_items"] = body["replicated_items"]
    return out


def _wait_index(env: Any, timeout_s: float = 30.0, **expected: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    idx: dict[str, Any] = {}
    while time.monotonic() < deadline:
        idx = _index(env)
        if all(idx[k] == v for k, v in expected.items()):
            return idx
        time.sleep(0.2)
    raise AssertionError(f"/index never showed {expected}; last: {idx}")


def _ids(body: dict[str, Any]) -> list[str]:
    return [entry["item_id"] for entry in body["items"]]


def _cli(env: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_knn.cli", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_item_first_seen_after_the_last_build_is_served_before_the_next(
    worker_env: Any, run_worker: Any
) -> None:
    worker_env.extra.update(
        {
            "STREAM_KNN_REBUILD_INTERVAL": NO_CLOCK,
            "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": str(BATCH),
        }
    )
    run_worker()
    worker_env.produce("user_events", _batch("a"))
    _wait_index(worker_env, version=1, items=BATCH, pending_items=0)

    # "fresh" is touched by p0 only, like a0 and a20: its vector is theirs.
    worker_env.produce("user_events", [_event("p0", "fresh", 100)])
    _wait_index(worker_env, items=BATCH + 1)
    status, body = worker_env.get("/similar/fresh?k=2")
    assert status == 200, body
    assert sorted(_ids(body)) == ["a0", "a20"]
    assert body["index_version"] == 1
    assert [e["score"] for e in body["items"]] == pytest.approx([1.0, 1.0], abs=1e-5)
    status, body = worker_env.get("/similar/a0?k=2")
    assert status == 200, body
    assert sorted(_ids(body)) == ["a20", "fresh"]

    # A new user's event on a20: the list it triggers comes from version 1 and holds the
    # item first seen after that build.
    worker_env.produce("user_events", [_event("q", "a20", 101)])
    recs = worker_env.consume("recommendations", expected=BATCH + 2)
    by_event = {body["event_id"]: body for _, body in recs}
    assert len(by_event) == len(recs) == BATCH + 2
    rec = by_event["ev-q-a20-101"]
    assert rec["index_version"] == 1 and "fallback" not in rec
    assert sorted(_ids(rec)[:2]) == ["a0", "fresh"]
    idx = _index(worker_env)
    assert (idx["version"], idx["items"], idx["pending_items"]) == (1, BATCH + 1, 2)
    assert idx["build_errors"] == 0


def test_similar_answers_see_a_fresh_item_after_being_asked_before_it(
    worker_env: Any, run_worker: Any
) -> None:
    worker_env.extra.update(
        {
            "STREAM_KNN_REBUILD_INTERVAL": NO_CLOCK,
            "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": str(BATCH),
        }
    )
    run_worker()
    worker_env.produce("user_events", _batch("a"))
    _wait_index(worker_env, version=1, items=BATCH, pending_items=0)
    status, body = worker_env.get("/similar/a0?k=2")
    assert status == 200 and _ids(body)[0] == "a20", body

    worker_env.produce("user_events", [_event("p0", "fresh", 100)])
    _wait_index(worker_env, items=BATCH + 1, pending_items=1, version=1)
    status, body = worker_env.get("/similar/a0?k=2")
    assert status == 200, body
    assert sorted(_ids(body)) == ["a20", "fresh"]


def test_rebuilds_happen_while_events_keep_flowing(worker_env: Any, run_worker: Any) -> None:
    # The fixture's defaults: a build every second while something changed, none by count.
    stream = SyntheticStream(n_users=50, n_items=120, n_clusters=6, seed=5)
    events = list(stream.events(1500))
    records = [(e["user_id"].encode(), orjson.dumps(e)) for e in events]
    run_worker()
    feeder = worker_env.feed("user_events", records, rate=300)
    versions_while_feeding: set[int] = set()
    while feeder.is_alive():
        version = _index(worker_env)["version"]
        if version is not None:
            versions_while_feeding.add(version)
        time.sleep(0.3)
    assert not feeder.errors, feeder.errors
    assert len(versions_while_feeding) >= 3, versions_while_feeding

    recs = worker_env.consume("recommendations", expected=len(events), timeout_s=60)
    event_ids = [body["event_id"] for _, body in recs]
    assert sorted(event_ids) == sorted(e["event_id"] for e in events)  # exactly one each
    versions = {body["index_version"] for _, body in recs} - {None}
    assert len(versions) >= 3, versions
    # Versions only move forward: each user's lists (one partition, in order) never go back.
    position = {e["event_id"]: i for i, e in enumerate(events)}
    per_user: dict[str, list[tuple[int, int]]] = {}
    for _, body in recs:
        v = -1 if body["index_version"] is None else body["index_version"]
        per_user.setdefault(body["user_id"], []).append((position[body["event_id"]], v))
    for user, seq in per_user.items():
        in_order = [v for _, v in sorted(seq)]
        assert in_order == sorted(in_order), user
    for _, body in recs:
        if body["index_version"] is not None:
            assert "fallback" not in body and len(body["items"]) == 10, body
    idx = _wait_index(worker_env, pending_items=0, items=len({e["item_id"] for e in events}))
    assert idx["build_errors"] == 0
    assert idx["version"] >= max(versions)


def _corrupt_index_file(version_dir: Path) -> str:
    meta = orjson.loads((version_dir / "meta.json").read_bytes())
    name: str = max(meta["files"], key=lambda n: (version_dir / n).stat().st_size)
    path = version_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return name


def test_corrupt_newest_version_is_skipped_on_restart(worker_env: Any, run_worker: Any) -> None:
    worker_env.extra.update(
        {
            "STREAM_KNN_REBUILD_INTERVAL": NO_CLOCK,
            "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": str(BATCH),
        }
    )
    worker = run_worker()
    worker_env.produce("user_events", _batch("a"))
    _wait_index(worker_env, version=1, items=BATCH, pending_items=0)
    worker_env.produce("user_events", _batch("b", start=BATCH, users="s"))
    _wait_index(worker_env, version=2, items=2 * BATCH, pending_items=0)
    worker.stop()

    root = Path(worker_env.data_dir) / "index"
    corrupted = _corrupt_index_file(root / "v000002")
    inspect = _cli(worker_env, "index", "inspect", "2", "--dir", str(root))
    assert inspect.returncode == 1, inspect.stdout + inspect.stderr
    assert orjson.loads(inspect.stdout)["checksums"].startswith("FAILED")
    listing = _cli(worker_env, "index", "list", "--json", "--dir", str(root))
    assert listing.returncode == 0, listing.stderr
    rows = orjson.loads(listing.stdout)
    assert [(r["version"], r["item_count"], r["pinned"]) for r in rows] == [
        (1, BATCH, False),
        (2, 2 * BATCH, False),
    ]

    # No build after the restart, so what is served is what was loaded.
    worker_env.extra["STREAM_KNN_INDEX__REBUILD_MIN_CHANGES"] = "100000"
    restarted = run_worker()
    idx = _wait_index(worker_env, replicated_items=2 * BATCH, items=2 * BATCH)
    # Version 1 serves; the batch-b items it lacks are searched exactly until a build.
    assert (idx["version"], idx["pending_items"], idx["build_errors"]) == (1, BATCH, 0)
    log = restarted.log_path.read_text(errors="replace")
    assert "skipping index version 2" in log and corrupted in log, restarted.log_tail()
    assert "warm start from index version 1" in log
    status, body = worker_env.get("/similar/b0?k=1")
    assert status == 200 and _ids(body) == ["b20"], body
    status, body = worker_env.get("/similar/a0?k=1")
    assert status == 200 and _ids(body) == ["a20"], body


def test_restart_with_unchanged_vectors_needs_no_rebuild(worker_env: Any, run_worker: Any) -> None:
    worker_env.extra.update(
        {
            "STREAM_KNN_REBUILD_INTERVAL": NO_CLOCK,
            "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": str(BATCH),
        }
    )
    worker = run_worker()
    # Every item gets two updates, the second one before the first build.
    first = _batch("a")
    again = [_event(f"r{j % 20}", f"a{j}", BATCH + j) for j in range(BATCH)]
    worker_env.produce("user_events", first)
    _wait_index(worker_env, version=1, items=BATCH, pending_items=0)
    worker_env.produce("user_events", again)
    _wait_index(worker_env, version=2, items=BATCH, pending_items=0)
    worker.stop()

    worker_env.extra["STREAM_KNN_INDEX__REBUILD_MIN_CHANGES"] = "100000"
    run_worker()
    idx = _wait_index(worker_env, replicated_items=BATCH, items=BATCH)
    # Version 2 holds every item's current vector: nothing is pending after the restart.
    assert (idx["version"], idx["pending_items"]) == (2, 0), idx
