"""What pseudonymous user ids cost the worker's batch path, in process, no Kafka.

The worker's own ``_user_batch`` (parse, learn, state writes, item updates, lists) on the
same events with ``privacy.pseudonymise_user_ids`` off and on, its Kafka output and table
store replaced by in-memory ones; runs alternate so machine noise hits both alike.

Run: ``.venv/bin/python -m benchmarks.privacy_cost [--events 20000] [--users 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from stream_knn.config import Config
from stream_knn.worker import app as worker_app
from stream_knn.worker.tables import MemoryTable

__all__ = ["bench_privacy"]

_BATCH = 500


class _Output:
    def __init__(self, *_: Any) -> None:
        self.sent = 0

    def send(self, *_: Any, **__: Any) -> None:
        self.sent += 1

    def send_many(self, _topic: str, records: list[Any]) -> None:
        self.sent += len(records)

    async def flush(self) -> None:
        return None


def _batches(n_events: int, n_users: int, topic: str) -> list[list[Any]]:
    now = int(time.time() * 1000)
    records = [
        SimpleNamespace(
            topic=topic,
            partition=i % 4,
            offset=i,
            key=f"user-{(i * 7919) % n_users}".encode(),
            value=orjson.dumps(
                {
                    "user_id": f"user-{(i * 7919) % n_users}",
                    "item_id": f"item-{(i * 31) % 1000}",
                    "event_type": "view",
                    "ts": now + i,
                }
            ),
            timestamp=now + i,
        )
        for i in range(n_events)
    ]
    return [
        [SimpleNamespace(topic=topic, partition=0, records=records[s : s + _BATCH])]
        for s in range(0, n_events, _BATCH)
    ]


def _worker(root: Path, pseudonyms: bool) -> Any:
    config = Config().replace(
        worker__data_dir=root,
        privacy__pseudonymise_user_ids=pseudonyms,
        privacy__pseudonym_key="a benchmark key of some length" if pseudonyms else "",
        serving__self_tuning=False,
    )
    worker = worker_app.WorkerApp(config)
    worker.profile_store = MemoryTable()
    return worker


def bench_privacy(n_events: int, n_users: int, rounds: int) -> dict[str, float]:
    """Microseconds per event of the batch path without and with pseudonyms (medians)."""
    worker_app.OutputProducer = _Output  # type: ignore[misc,assignment]
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {flag: _worker(Path(tmp) / str(flag), flag) for flag in (False, True)}
        batches = _batches(n_events, n_users, workers[False].user_events.get_topic_name())

        async def run(worker: Any) -> None:
            for batch in batches:
                await worker._user_batch(batch)

        for flag in (False, True):  # warm up: caches, first profiles
            asyncio.run(run(workers[flag]))
        for _ in range(rounds):
            for flag in (False, True):
                started = time.perf_counter()
                asyncio.run(run(workers[flag]))
                times[flag].append((time.perf_counter() - started) / n_events * 1e6)
    plain, hidden = statistics.median(times[False]), statistics.median(times[True])
    return {"plain_us": plain, "pseudonyms_us": hidden, "ratio": hidden / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = bench_privacy(args.events, args.users, args.rounds)
    print(
        f"batch path, {args.events} events of {args.users} users: "
        f"{result['plain_us']:.1f} us/event plain, {result['pseudonyms_us']:.1f} us/event "
        f"with pseudonyms ({result['ratio']:.3f}x)"
    )


if __name__ == "__main__":
    main()
