"""``stream-knn recommend --users`` against a running worker: the same answers as its HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from stream_knn.events.synthetic import SyntheticStream

pytestmark = pytest.mark.integration

DIMS = 64  # model.dims, the default the worker runs with


def _wait_quiescent(env: Any, n_items: int, timeout_s: float = 45.0) -> int:
    """Wait until the index holds ``n_items``, nothing is pending and no new version comes."""
    deadline = time.monotonic() + timeout_s
    previous: Any = None
    body: Any = None
    while time.monotonic() < deadline:
        status, body = env.get("/index")
        if status == 200:
            state = [(ix["version"], ix["items"], ix["pending_items"]) for ix in body["indexes"]]
            settled = all(v is not None and n == n_items and p == 0 for v, n, p in state)
            if settled and state == previous:
                return int(body["indexes"][0]["version"])
            previous = state if settled else None
        time.sleep(1.5)
    raise AssertionError(f"index not settled on {n_items} items after {timeout_s}s: {body}")


def _recommend(env: Any, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "stream_knn.cli", "recommend", *args],
        env=env.env(),
        capture_output=True,
        timeout=60,
        check=False,
    )


def _assert_same_answer(batch: dict[str, Any], http: dict[str, Any]) -> None:
    for name in ("user_id", "variant", "k", "index_version", "cold_start", "fallback"):
        assert batch.get(name) == http.get(name), (name, batch, http)
    batch_scores = [entry["score"] for entry in batch["items"]]
    http_scores = [entry["score"] for entry in http["items"]]
    assert np.allclose(batch_scores, http_scores, atol=1e-5), (batch, http)
    if batch.get("fallback"):
        # Popularity ties may be broken either way; the items above the last score may not.
        last = http_scores[-1]
        assert {e["item_id"] for e in batch["items"] if e["score"] > last + 1e-5} == {
            e["item_id"] for e in http["items"] if e["score"] > last + 1e-5
        }, (batch, http)
    else:
        assert [e["item_id"] for e in batch["items"]] == [e["item_id"] for e in http["items"]]


def test_recommend_users_file_matches_the_workers_http_answers(
    worker_env: Any, run_worker: Any, tmp_path: Path
) -> None:
    start_ms = int(time.time() * 1000) - 60_000
    stream = SyntheticStream(
        n_users=25, n_items=50, n_clusters=5, clusters_per_user=1, seed=21, start_ms=start_ms
    )
    events = list(stream.events(300))
    run_worker()
    worker_env.produce("user_events", [(e["user_id"].encode(), orjson.dumps(e)) for e in events])
    worker_env.consume("recommendations", expected=len(events), timeout_s=45)

    # A content-only item, a deleted item (tombstones on the vector changelogs) and a
    # forgotten user (a tombstone on the profile changelog).
    counts: dict[str, int] = {}
    for e in events:
        counts[e["item_id"]] = counts.get(e["item_id"], 0) + 1
    deleted = max(counts, key=lambda item: counts[item])
    content = np.random.default_rng(0).normal(size=DIMS).round(4).tolist()
    worker_env.produce(
        "item_catalog",
        [
            (b"fresh", orjson.dumps({"item_id": "fresh", "vector": content})),
            (deleted.encode(), orjson.dumps({"item_id": deleted, "deleted": True})),
        ],
    )
    forgotten = events[0]["user_id"]
    worker_env.produce(
        "user_events",
        [(forgotten.encode(), orjson.dumps({"user_id": forgotten, "event_type": "forget"}))],
    )
    n_items = len(counts)  # plus "fresh", minus the deleted one
    version = _wait_quiescent(worker_env, n_items)

    known = sorted({e["user_id"] for e in events} - {forgotten})
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join([*known[:10], "", forgotten, "stranger", known[0], ""]) + "\n")
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    done = _recommend(worker_env, "--users", str(users_file), "--output", str(out), "--k", "5")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""
    summary = done.stderr.decode().strip().splitlines()[-1]
    assert summary == (
        f"stream-knn recommend: 12 users (2 unknown, 2 popularity fallback), {n_items} items, "
        f"index auto-angular-10--1: {version}, written to {out}"
    ), (summary, seconds)

    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [body["user_id"] for body in lines] == [*known[:10], forgotten, "stranger"]
    for body in lines:
        assert body["trigger"] == "batch" and body["k"] == 5
        assert deleted not in {entry["item_id"] for entry in body["items"]}
        status, http = worker_env.get(f"/recommendations/{body['user_id']}?k=5")
        assert status == 200, http
        _assert_same_answer(body, http)
    for body in lines[:10]:
        assert len(body["items"]) == 5 and "fallback" not in body and "cold_start" not in body
        seen = {e["item_id"] for e in events if e["user_id"] == body["user_id"]}
        assert not {entry["item_id"] for entry in body["items"]} & seen
    for body in lines[10:]:
        assert body["cold_start"] is True and body["fallback"] == "popular"
        assert len(body["items"]) == 5

    # The same users as CSV, to stdout, with each variant's k and a progress bar on stderr.
    csv_file = tmp_path / "users.csv"
    csv_file.write_text("user_id,segment\n" + "".join(f"{u},x\n" for u in known[:3]))
    done = _recommend(worker_env, "--users", str(csv_file))
    assert done.returncode == 0, done.stderr.decode()
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [body["user_id"] for body in lines] == known[:3]
    assert all(body["k"] == 10 and len(body["items"]) == 10 for body in lines)
    assert "users: 100%" in done.stderr.decode()
    for body in lines:
        status, http = worker_env.get(f"/recommendations/{body['user_id']}")
        _assert_same_answer(body, http)


def test_recommend_fails_clearly_without_the_workers_topics(
    worker_env: Any, tmp_path: Path
) -> None:
    users_file = tmp_path / "users.txt"
    users_file.write_text("u1\n")
    done = _recommend(worker_env, "--users", str(users_file), "--no-progress")
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines()[-1] == (
        f"stream-knn recommend: error: topic {worker_env.app_id}-item-vectors-changelog does "
        f"not exist; start the worker once with the same worker.app_id so it creates its "
        f"changelog topics"
    )
