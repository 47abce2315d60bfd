"""``stream-knn status`` against a group of two real workers: asked one, it finds the other
through the group's members and shows both, with every input partition owned once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.integration.conftest import WorkerEnv, WorkerProcess, free_port

pytestmark = pytest.mark.integration


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_knn.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_of_a_group_found_through_one_worker(
    worker_env: WorkerEnv, run_worker, tmp_path: Path
) -> None:
    first = run_worker()
    second_env = dataclasses.replace(
        worker_env, web_port=free_port(), data_dir=tmp_path / "state-2"
    )
    second = WorkerProcess(second_env, tmp_path / "worker-second.log").start()
    try:
        urls = sorted([worker_env.url(""), second_env.url("")])
        # The group rebalances to two members: each owns some of the 12 input partitions.
        deadline = time.monotonic() + 180
        answers: list[dict] = []
        while time.monotonic() < deadline:
            done = _status("--json", "--url", worker_env.url(""))
            if done.returncode == 0:
                answers = orjson.loads(done.stdout)
                owned = [len(a["partitions"]) for a in answers]
                found = [a["worker"]["url"] for a in answers]
                if found == urls and all(owned) and sum(owned) == 12:
                    break
            time.sleep(1.0)
        assert [a["worker"]["url"] for a in answers] == urls, (first.log_tail(), answers)
        assert sum(len(a["partitions"]) for a in answers) == 12
        pairs = {(p["topic"], p["partition"]) for a in answers for p in a["partitions"]}
        assert len(pairs) == 12  # no partition owned twice

        text = _status("--url", second_env.url(""))
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith(
            f"GROUP {worker_env.app_id}: 2 of 2 members answered, 12 input partitions"
        ), text.stdout
        for url in urls:
            assert f"WORKER {url}  app {worker_env.app_id}" in text.stdout
        alone = _status("--no-members", "--url", second_env.url(""))
        assert "1 of 2 members answered" in alone.stdout

        # A worker that does not answer is named, and the command fails.
        second.stop()
        down = _status("--no-members", "--url", second_env.url(""))
        assert down.returncode == 1
        assert f"WORKER {second_env.url('')}  UNREACHABLE" in down.stdout
    finally:
        second.stop()
