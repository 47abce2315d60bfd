"""``python -m benchmarks.run --full|--quick``: measure stream-knn and guard its key ratios.

``--quick`` (under 3 minutes) compares the worker/index and ingest/raw-consume ratios with
``benchmarks/baseline.json`` and exits 1 on a drop of more than 30%; ``--record`` rewrites
the baseline. Results go to ``benchmarks/results/<mode>-latest.json`` and
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.core import bench_core
from benchmarks.e2e import Deployment
from benchmarks.indexes import bench_indexes
from benchmarks.machine import describe, load_average
from benchmarks.report import write_markdown
from benchmarks.scenarios import Scale, Session

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline.json"
#: A guarded ratio may fall this much below its baseline before the run fails.
TOLERANCE = 0.30
GUARDED = ("worker_over_index", "ingest_over_raw_consume")

_T0 = time.monotonic()


def say(text: str) -> None:
    elapsed = time.monotonic() - _T0
    print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _catalog(n_items: int, dims: int = 64, n_clusters: int = 50) -> np.ndarray[Any, Any]:
    # Item i<k> is in synthetic cluster k % 50, so content and behaviour agree.
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((n_clusters, dims))
    which = np.arange(n_items) % n_clusters
    return centres[which] + 0.7 * rng.standard_normal((n_items, dims))


def _sig(value: float) -> float:
    """``value`` to three significant digits (the ratios span several decades)."""
    return float(f"{value:.3g}")


def _kafka(args: argparse.Namespace, scale: Scale, out: dict[str, Any]) -> None:
    root = Path(tempfile.mkdtemp(prefix="sknn-bench-"))
    say(f"worker state and logs in {root}")
    catalog = _catalog(scale.n_items)
    rates = (500.0, 1000.0, 2000.0)

    # 1. End to end: fixed rates, then open throttle; the worker's index measured alone.
    main = Session(Deployment(args.bootstrap, root, "e2e"), scale, say)
    try:
        warm = main.start(catalog)
        # HTTP first: it needs a quiet worker (no events in flight, so the cache can hit).
        http_phase = main.http_phase()
        phases = [main.rate_phase(rate) for rate in rates]
        open_phase = main.open_phase()
        bound = main.index_bound(3.0 if scale.full else 2.0)
    finally:
        main.stop()
    worker_rate = open_phase.get("throughput_per_second")
    out["end_to_end"] = {
        "n_items": scale.n_items,
        "n_users": scale.n_users,
        "warmup": warm,
        "rates": phases,
        "open_throttle": open_phase,
        "index_alone": bound,
        "config": "defaults (rebuild every 30 s or 5,000 changed items)",
    }
    out["http"] = http_phase
    if worker_rate and bound.get("queries_per_second"):
        out["ratios"]["worker_over_index"] = _sig(worker_rate / bound["queries_per_second"])

    # 2. Ingest with coalesced output, and a raw consumer of the same events topic.
    ingest = Session(
        Deployment(
            args.bootstrap, root, "ingest", {"STREAM_KNN_SERVING__EMIT_INTERVAL_SECONDS": "1"}
        ),
        scale,
        say,
        seed=1,
        n_users=scale.ingest_users,
    )
    try:
        ingest.start(catalog)
        ingest_phase = ingest.ingest_phase()
        raw = ingest.raw_consume()
    finally:
        ingest.stop()
    ingest_phase["coalescing_effective"] = (
        ingest_phase.get("recommendations_per_event") or 1.0
    ) < 0.95
    out["ingest"] = {"phase": ingest_phase, "raw_consume": raw}
    if ingest_phase.get("events_per_second") and raw.get("records_per_second"):
        out["ratios"]["ingest_over_raw_consume"] = _sig(
            ingest_phase["events_per_second"] / raw["records_per_second"]
        )

    # 3. Rebuild impact (full only): p99 at 1,000 events/s, constant rebuilds vs none.
    if not scale.full:
        out["rebuild_impact"] = {"skipped": "full mode only"}
        return
    impact: dict[str, Any] = {}
    for name, env in (
        (
            "no_rebuild",
            {
                "STREAM_KNN_REBUILD_INTERVAL": "3600",
                "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": str(int(0.9 * scale.n_items)),
                "STREAM_KNN_INDEX__MAX_DELTA_ITEMS": "1000000000",
            },
        ),
        (
            "rebuilding",
            {"STREAM_KNN_REBUILD_INTERVAL": "1", "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": "100"},
        ),
    ):
        session = Session(Deployment(args.bootstrap, root, name, env), scale, say, seed=2)
        try:
            session.start(catalog)
            impact[name] = session.rate_phase(1000.0)
        finally:
            session.stop()
    p_no, p_re = impact["no_rebuild"].get("p99_ms"), impact["rebuilding"].get("p99_ms")
    if p_no and p_re:
        impact["p99_ratio"] = round(p_re / p_no, 2)
    out["rebuild_impact"] = impact


def _guard(ratios: dict[str, float], record: bool) -> int:
    if record:
        BASELINE.write_bytes(orjson.dumps(ratios, option=orjson.OPT_INDENT_2) + b"\n")
        say(f"baseline recorded in {BASELINE}: {ratios}")
        return 0
    if not BASELINE.exists():
        say(f"no baseline at {BASELINE}; run with --record to create one")
        return 0
    baseline = orjson.loads(BASELINE.read_bytes())
    status = 0
    for name in GUARDED:
        base, now = baseline.get(name), ratios.get(name)
        if base is None:
            continue
        if now is None:
            say(f"REGRESSION GUARD: {name} was not measured (baseline {base})")
            status = 1
            continue
        verdict = "ok" if now >= (1 - TOLERANCE) * base else "DROP > 30%"
        say(f"guard {name}: measured {now} vs baseline {base}: {verdict}")
        if verdict != "ok":
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true", help="everything (about 15-25 minutes)")
    mode.add_argument("--quick", action="store_true", help="regression guard, under 3 minutes")
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="HOST:PORT of a broker (default: start a local one)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the measured ratios to benchmarks/baseline.json",
    )
    parser.add_argument("--skip-kafka", action="store_true", help="core and index only")
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick"
    scale = Scale(args.full)
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out: dict[str, Any] = {
        "mode": name,
        "command": command,
        "machine": describe(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ratios": {},
    }
    say(f"stream-knn benchmarks, {name} mode; load average {out['machine']['load_average_start']}")

    say("core (no Kafka): sketch update + profile add with the bytes codec")
    out["core"] = bench_core(200_000 if args.full else 30_000, 50_000, 100_000)
    say(
        f"  {out['core']['events_per_second']:,} events/s, "
        f"{out['core']['bytes_per_item']} B/item, {out['core']['bytes_per_user_mean']} B/user"
    )

    search_ks = (-1, 100, 500, 2000)
    small = 100_000 if args.full else 20_000
    out["index"] = [
        bench_indexes(
            small,
            64,
            n_queries=300 if args.full else 150,
            seconds=2.0 if args.full else 0.7,
            search_ks=search_ks,
            say=say,
        )
    ]
    if args.full:
        hnsw_small = next(r for r in out["index"][0]["rows"] if r["backend"] == "hnsw")
        estimate = hnsw_small.get("build_seconds", 0.0) * 10 * 1.3
        out["index"].append(
            bench_indexes(
                1_000_000,
                64,
                n_queries=200,
                seconds=2.0,
                search_ks=search_ks,
                hnsw_build_estimate=estimate,
                say=say,
            )
        )

    broker = None
    if not args.skip_kafka:
        if args.bootstrap is None:
            from stream_knn.broker.local import LocalBroker
            from stream_knn.config import BrokerConfig

            data = Path(tempfile.mkdtemp(prefix="sknn-bench-broker-"))
            broker = LocalBroker(
                BrokerConfig(port=_free_port(), controller_port=_free_port(), data_dir=data),
                progress=say,
                stop_with_parent=True,
            )
            args.bootstrap = broker.start()
        out["bootstrap"] = args.bootstrap
        try:
            _kafka(args, scale, out)
        finally:
            if broker is not None:
                broker.stop()
                shutil.rmtree(data, ignore_errors=True)

    out["machine"]["load_average_end"] = [round(x, 2) for x in load_average()]
    out["seconds"] = round(time.monotonic() - _T0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}-latest.json"
    path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    say(f"results in {path}")
    docs = write_markdown(args.out)
    say(f"table in {docs}")
    say(f"ratios: {out['ratios']}; load average now {out['machine']['load_average_end']}")
    status = _guard(out["ratios"], args.record) if args.quick or args.record else 0
    say(f"done in {out['seconds']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
