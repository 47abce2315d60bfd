"""`stream-knn tune` writes a configuration that a worker starts with and serves by."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

pytestmark = pytest.mark.integration


def _ratings(path: Path) -> None:
    """MovieLens-style ``user item rating timestamp`` lines: 4 taste groups of 12 items."""
    rng = np.random.default_rng(4)
    lines = []
    ts = 880_000_000
    for user in range(1, 81):
        group = user % 4
        for item in rng.choice(12, size=8, replace=False):
            ts += int(rng.integers(1, 600))
            lines.append(f"{user}\t{group * 12 + item + 1}\t{rng.integers(3, 6)}\t{ts}")
    path.write_text("\n".join(lines) + "\n")


def test_a_tuned_config_starts_a_worker_that_serves_with_it(
    worker_env: Any, run_worker: Any, tmp_path: Path
) -> None:
    data, tuned = tmp_path / "u.data", tmp_path / "tuned.toml"
    _ratings(data)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_knn.cli",
            "tune",
            "--data",
            str(data),
            "--trials",
            "2",
            "--windows",
            "2",
            "--no-progress",
            "--output-config",
            str(tuned),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=worker_env.env(),
    )
    assert done.returncode == 0, done.stderr
    chosen = tomllib.loads(tuned.read_text())
    index = chosen["index"]

    # The deployment's own settings (broker, topics, app id, port) come from the
    # environment, which overrides the file; the model and index settings from the file.
    run_worker(config_file=tuned)
    status, body = worker_env.get("/index")
    assert status == 200
    served = body["indexes"][0]
    assert (served["backend"], served["metric"], served["n_trees"], served["search_k"]) == (
        index["backend"],
        index["metric"],
        index["n_trees"],
        index["search_k"],
    )
    events = [
        {"user_id": f"u{n % 5}", "item_id": f"i{n % 7}", "event_type": "view"} for n in range(20)
    ]
    worker_env.produce("user_events", [(e["user_id"].encode(), orjson.dumps(e)) for e in events])
    out = worker_env.consume("recommendations", expected=len(events))
    assert len(out) == len(events)
    assert {value["k"] for _key, value in out} == {chosen["serving"]["k"]}
