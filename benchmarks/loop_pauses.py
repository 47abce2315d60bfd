"""Event-loop pauses while an index rebuild runs: built in a thread vs in the build process.

A task sleeps 1 ms in a loop on the asyncio main loop and records how late it wakes up,
while ``IndexManager.rebuild_now`` runs from a thread (as the worker's builder thread
does), once building in that thread (``build_in_process=True``) and once in the child
process (the worker's default). The whole rebuild is measured: snapshot, build, write,
memory-mapping the version and the swap.

Run: ``.venv/bin/python -m benchmarks.loop_pauses [--items 50000 100000] [--dims 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from stream_knn.config import IndexConfig
from stream_knn.index.manager import IndexManager

__all__ = ["main", "measure"]

#: The probe's sleep, seconds; a pause is how much later than this it woke up.
_TICK = 0.001
#: Items of the build that starts the child process before the measured one.
_WARM_ITEMS = 1000


async def _probe(stop: asyncio.Event, pauses: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(_TICK)
        pauses.append(time.perf_counter() - started - _TICK)


async def _pauses_during(manager: IndexManager) -> tuple[list[float], float]:
    """Loop pauses (seconds) while ``manager`` rebuilds from a thread, and the rebuild time."""
    stop = asyncio.Event()
    pauses: list[float] = []
    probe = asyncio.create_task(_probe(stop, pauses))
    await asyncio.sleep(0.2)  # the probe runs before the build starts
    pauses.clear()
    started = time.perf_counter()
    await asyncio.to_thread(manager.rebuild_now)
    seconds = time.perf_counter() - started
    stop.set()
    await probe
    return pauses, seconds


async def _idle_pauses(seconds: float) -> list[float]:
    stop = asyncio.Event()
    pauses: list[float] = []
    probe = asyncio.create_task(_probe(stop, pauses))
    await asyncio.sleep(seconds)
    stop.set()
    await probe
    return pauses


def measure(items: int, dims: int, *, in_process: bool, seed: int = 0) -> dict[str, float]:
    """p99 and max loop pause (ms) during one rebuild of ``items`` random vectors."""
    rng = np.random.default_rng(seed)
    ids = [f"item-{n}" for n in range(items)]
    matrix = rng.standard_normal((items, dims)).astype(np.float32)
    config = IndexConfig(backend="annoy", recall_sample_rate=0.0)
    with tempfile.TemporaryDirectory(prefix="loop-pauses-") as tmp:
        manager = IndexManager(config, Path(tmp), dims, build_in_process=in_process)
        try:
            # A first, small build starts the child process (a worker does it once).
            manager.upsert_many(ids[:_WARM_ITEMS], matrix[:_WARM_ITEMS])
            manager.rebuild_now()
            manager.upsert_many(ids, matrix)
            pauses, seconds = asyncio.run(_pauses_during(manager))
        finally:
            manager.stop()
    ms = np.asarray(pauses) * 1000.0
    return {
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "ticks": float(len(ms)),
        "rebuild_s": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--dims", type=int, default=64)
    args = parser.parse_args(argv)
    idle = np.asarray(asyncio.run(_idle_pauses(2.0))) * 1000.0
    print(
        f"idle loop (2 s): p99 {np.percentile(idle, 99):.2f} ms, max {idle.max():.2f} ms, "
        f"{len(idle)} ticks"
    )
    print(f"{'items':>8} {'build in':<14} {'p99 pause':>10} {'max pause':>10} {'rebuild':>9}")
    for items in args.items:
        for in_process, label in ((True, "thread"), (False, "child process")):
            r = measure(items, args.dims, in_process=in_process)
            print(
                f"{items:>8} {label:<14} {r['p99_ms']:>7.2f} ms {r['max_ms']:>7.2f} ms "
                f"{r['rebuild_s']:>7.2f} s"
            )


if __name__ == "__main__":
    main()
