"""Lists per second: ``recommend_many`` per batch against ``recommend`` one at a time and
against the index alone (``Index.search`` from one thread), in process, no Kafka.

Run: ``.venv/bin/python -m benchmarks.answers [--items 5000,50000] [--backends auto,annoy]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks.indexes import clustered
from stream_knn.config import Config
from stream_knn.embeddings.profile import UserProfile
from stream_knn.index.base import make_index
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.service import ListRequest, RecommendationService

__all__ = ["bench_answers"]

DIMS = 64
NOW = 1_700_000_000_000


def _rate(run: Callable[[int], int], seconds: float) -> tuple[float, float]:
    """Calls ``run(i)`` (returning lists made) for at least ``seconds``: lists per second of
    wall time, and CPU microseconds (all threads of the process) per list, which a busy
    machine disturbs less."""
    done, i = 0, 0
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        done += run(i)
        i += 1
    wall = time.perf_counter() - started
    return done / wall, (time.process_time() - cpu) / done * 1e6


def bench_answers(
    n_items: int,
    backend: str,
    *,
    n_users: int = 10_000,
    batches: tuple[int, ...] = (100, 1000),
    seconds: float = 3.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Lists/s (and CPU us a list) of the three ways on ``n_items`` clustered items and
    ``n_users`` profiles of 1-20 items each; 2% of the items changed since the build (a
    non-empty delta). The index alone is the served backend built from the same vectors,
    searched from one thread without exclusions."""
    rng = np.random.default_rng(n_items)
    items, _ = clustered(n_items, DIMS, 1, seed=n_items)
    ids = [f"i{n}" for n in range(n_items)]
    # No query cache: each user's list is asked many times here, never on the event path.
    config = Config().replace(index__backend=backend, serving__cache_entries=0)
    with tempfile.TemporaryDirectory(prefix="sknn-answers-") as root:
        service = RecommendationService(config, Path(root) / "index", Metrics(CollectorRegistry()))
        for item_id, vector in zip(ids, items, strict=True):
            service.upsert(item_id, vector)
        for manager in service.managers.values():
            manager.rebuild_now(wait=True)
        moved = rng.choice(n_items, size=n_items // 50, replace=False)
        for n in moved.tolist():
            service.upsert(ids[n], items[n] + 0.5 * rng.standard_normal(DIMS).astype(np.float32))
        for n in rng.zipf(1.3, size=5_000) % n_items:
            service.popularity.observe(ids[int(n)], 1.0, NOW)
        requests = []
        for u in range(n_users):
            profile = UserProfile()
            for _ in range(int(rng.integers(1, 21))):
                item = ids[int(rng.integers(0, n_items))]
                profile = profile.add(item, NOW - int(rng.integers(0, 86_400_000)), 1.0, cap=50)
            requests.append(ListRequest(f"u{u}", profile, (profile.items[-1][0],)))
        variants = [service.assigner.assign(r.user_id) for r in requests]
        k = variants[0].k

        index = make_index(variants[0].index, DIMS)
        index.build(ids, items)
        vectors = service.primary.vector
        queries = [
            q
            for r in requests
            if r.profile is not None
            and (
                q := r.profile.query_vector(
                    vectors,
                    NOW,
                    config.model.profile_half_life_seconds,
                    config.model.profile_half_life_events,
                )
            )
            is not None
        ]
        row: dict[str, Any] = {"items": n_items, "backend": index.backend}
        row["index_alone"] = _rate(
            lambda i: len(index.search(queries[i % len(queries)], k, ()) and [1]), seconds
        )

        def one(i: int) -> int:
            r, v = requests[i % n_users], variants[i % n_users]
            service.recommend(r.user_id, r.profile, v.k, NOW, exclude=r.exclude, variant=v)
            return 1

        row["one_at_a_time"] = _rate(one, seconds)
        for size in batches:

            def many(i: int, size: int = size) -> int:
                start = (i * size) % n_users
                chunk = requests[start : start + size]
                service.recommend_many(chunk, NOW, variants[start : start + size])
                return len(chunk)

            row[f"batch_{size}"] = _rate(many, seconds)
        service.recommend_many(requests[:100], NOW)
        pool = service._search_pool
        if pool is not None:
            pool.shutdown()
        say(
            f"{n_items:>7,} items, {row['backend']:>5}: "
            + ", ".join(
                f"{name} {row[name][0]:,.0f}/s ({row[name][1]:,.0f} cpu us)"
                for name in ("index_alone", "one_at_a_time", *(f"batch_{s}" for s in batches))
            )
        )
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", default="5000,50000")
    parser.add_argument("--backends", default="auto,annoy")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        for n in (int(x) for x in args.items.split(",")):
            bench_answers(n, backend, seconds=args.seconds)


if __name__ == "__main__":
    main()
