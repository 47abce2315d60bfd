"""``python -m benchmarks.profile_worker``: the worker under cProfile for a fixed event count.

Starts ``python -m cProfile -o OUT -m stream_knn.cli worker`` on its own topics, loads a
catalog, produces ``--events`` events at open throttle, waits until they are processed (or
``--timeout``), stops the worker with SIGINT so the profile is written, and prints the top
functions by cumulative and by own time. cProfile sees the main thread only (the event
loop); the index builder thread is not in it.
"""

from __future__ import annotations

import argparse
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.e2e import Deployment, produce_backlog, wait_for
from benchmarks.run import _catalog, say
from benchmarks.scenarios import Scale, Session

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_worker")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "worker.prof")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    scale = Scale(full=False)
    root = Path(tempfile.mkdtemp(prefix="sknn-profile-"))
    dep = Deployment(args.bootstrap, root, "profile")
    dep.profile_path = args.out.resolve()
    session = Session(dep, scale, say)
    try:
        session.start(_catalog(scale.n_items))
        base = dep.events_total()
        started = time.monotonic()
        backlog = session.source.backlog(args.events)
        produce_backlog(session.producer, dep.topics["user_events"], backlog)
        sent = len(backlog)
        done = wait_for(lambda: dep.events_total() - base >= sent, args.timeout, 0.5)
        seconds = time.monotonic() - started
        say(f"{sent:,} events {'processed' if done else 'NOT all processed'} in {seconds:.1f} s")
    finally:
        session.stop()
    stats = pstats.Stats(str(dep.profile_path))
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(str(dep.profile_path), stream=text).sort_stats(order).print_stats(args.top)
        print(f"---- top {args.top} by {order} ----")
        print("\n".join(text.getvalue().splitlines()[6:]))
    say(f"profile in {dep.profile_path} ({stats.total_tt:.1f} s profiled)")  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
