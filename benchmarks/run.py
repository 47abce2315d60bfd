"""``python -m benchmarks.run --full|--quick``: measure stream-knn and guard its key ratios.

Each worker figure is put beside a reference measured in the same run on the same broker:
ingest with coalesced lists beside a bare Faust agent (``benchmarks.bare_faust``) and a raw
consumer on the same events; one list per event beside the worker's own index queried
alone; end-to-end latency at paced rates with every list matched to its event; and (full
only) the same on a 100k-item index rebuilt non-stop.

``--quick`` (under 4 minutes) compares ``worker_over_index`` and ``ingest_over_bare_faust``
with ``benchmarks/baseline.json`` and exits 1 on a drop of more than 30%; ``--record``
rewrites the baseline. Results go to ``benchmarks/results/<mode>-latest.json`` and
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
GUARDED = ("worker_over_index", "ingest_over_bare_faust")

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


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the highest ``key``, with every run's ``key`` beside it."""
    top = max(range(len(runs)), key=lambda n: float(runs[n].get(key) or 0))
    best = dict(runs[top])
    best[f"runs_{key}"] = [r.get(key) for r in runs]
    return best


def _ratio(num: Any, den: Any) -> float | None:
    return _sig(num / den) if num and den else None


def _main_session(args: argparse.Namespace, scale: Scale, root: Path) -> dict[str, Any]:
    """Paced end-to-end phases and one list per event, 5k items, default settings."""
    session = Session(Deployment(args.bootstrap, root, "e2e"), scale, say)
    out: dict[str, Any] = {"config": "defaults (emit_interval_seconds=0)"}
    try:
        out["warmup"] = session.start(_catalog(scale.n_items))
        if scale.full:
            # HTTP first: it needs a quiet worker (no events in flight, so the cache can hit).
            out["http"] = session.http_phase()
        session.warm_up(max(scale.rates))
        out["rates"] = [session.rate_phase(rate) for rate in scale.rates]
        out["lists"] = _best(
            [session.lists_phase() for _ in range(scale.repeats)], "lists_per_second"
        )
        session.final_delivery_check(scale.drain_seconds)
        session.halt()
        seconds = 1.5 if scale.full else 1.0
        out["index_alone"] = _best(
            [session.index_bound(seconds) for _ in range(scale.repeats)], "queries_per_second"
        )
    finally:
        session.stop()
    out["lists_over_index"] = _ratio(
        out["lists"].get("lists_per_second"), out["index_alone"].get("queries_per_second")
    )
    return out


def _ingest_session(args: argparse.Namespace, scale: Scale, root: Path) -> dict[str, Any]:
    """A backlog with coalesced lists, then a bare Faust agent and a raw consumer on it."""
    session = Session(
        Deployment(args.bootstrap, root, "ingest", dict(COALESCE_ENV)), scale, say, seed=1
    )
    out: dict[str, Any] = {"config": "serving.emit_interval_seconds=1"}
    try:
        # No warm-up: the events topic holds the backlog and nothing else.
        out["warmup"] = session.start(_catalog(scale.n_items), warmup=False)
        out["phase"] = _best(
            [session.ingest_phase() for _ in range(scale.repeats)], "events_per_second"
        )
        # The worker is idle now; the references read the same topic one after the other.
        out["bare_faust"] = _best(
            [session.bare_faust() for _ in range(scale.repeats)], "records_per_second"
        )
        out["raw_consume"] = session.raw_consume()
    finally:
        session.stop()
    rate = out["phase"].get("events_per_second")
    out["over_bare_faust"] = _ratio(rate, out["bare_faust"].get("records_per_second"))
    out["over_raw_consume"] = _ratio(rate, out["raw_consume"].get("records_per_second"))
    return out


#: Rebuild as often as the worker can: after a second and one changed item.
REBUILD_ENV = {
    "STREAM_KNN_INDEX__REBUILD_INTERVAL_SECONDS": "1",
    "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": "1",
}
#: No rebuild at all: no interval, count or delta-size trigger is reached in a run.
NO_REBUILD_ENV = {
    "STREAM_KNN_INDEX__REBUILD_INTERVAL_SECONDS": "3600",
    "STREAM_KNN_INDEX__REBUILD_MIN_CHANGES": "1000000000",
    "STREAM_KNN_INDEX__MAX_DELTA_ITEMS": "1000000000",
    "STREAM_KNN_INDEX__MAX_DELTA_SHARE": "1.0",
}
COALESCE_ENV = {"STREAM_KNN_SERVING__EMIT_INTERVAL_SECONDS": "1"}


def _rebuild_session(args: argparse.Namespace, scale: Scale, root: Path) -> dict[str, Any]:
    """The paced, backlog and ingest phases on a 100k-item catalog, without then with
    non-stop rebuilds: one worker, restarted between the settings (restoring its state and
    index from disk is far cheaper than loading 100k vectors again)."""
    base = {"STREAM_KNN_INDEX__BACKEND": scale.rebuild_backend}
    dep = Deployment(args.bootstrap, root, "rebuild", dict(base))
    session = Session(dep, scale, say, seed=2)
    out: dict[str, Any] = {
        "backend": scale.rebuild_backend,
        "config": f"index.backend={scale.rebuild_backend}, {scale.rebuild_items:,}-item catalog",
    }
    try:
        # All of it indexed: once rebuilds stop, items left out would stay in the delta.
        out["warmup"] = session.start(_catalog(scale.rebuild_items), indexed_share=1.0)
        for name, env in (("without", NO_REBUILD_ENV), ("during", REBUILD_ENV)):
            stage: dict[str, Any] = {"env": env}
            stage["restart_seconds"] = round(dep.restart({**base, **env}), 1)
            say(f"[{dep.name}] restarted {name} rebuilds in {stage['restart_seconds']} s")
            stage["rates"] = [session.rate_phase(rate) for rate in scale.rates]
            stage["lists"] = session.lists_phase()
            session.final_delivery_check(scale.drain_seconds)
            restart_s = dep.restart({**base, **env, **COALESCE_ENV})
            say(f"[{dep.name}] restarted {name} rebuilds, lists coalesced, in {restart_s:.1f} s")
            time.sleep(2.0)
            stage["ingest"] = {
                "restart_seconds": round(restart_s, 1),
                "phase": session.ingest_phase(),
            }
            out[name] = stage
        session.halt()
        out["index_alone"] = session.index_bound(3.0)
    finally:
        session.stop()
    without, during = out["without"], out["during"]
    compare: dict[str, Any] = {}
    for p0, p1 in zip(without["rates"], during["rates"], strict=True):
        compare[f"p99_ratio_at_{p0['target_rate']:.0f}"] = _ratio(
            p1.get("p99_ms"), p0.get("p99_ms")
        )
    compare["lists_per_second_ratio"] = _ratio(
        during["lists"].get("lists_per_second"), without["lists"].get("lists_per_second")
    )
    compare["ingest_ratio"] = _ratio(
        during["ingest"]["phase"].get("events_per_second"),
        without["ingest"]["phase"].get("events_per_second"),
    )
    out["compared"] = compare
    return out


def _kafka(args: argparse.Namespace, scale: Scale, out: dict[str, Any]) -> None:
    root = Path(tempfile.mkdtemp(prefix="sknn-bench-"))
    say(f"worker state and logs in {root}")
    ratios = out["ratios"]

    # 1. One list per event: paced phases (end to end), then a backlog; the index alone.
    main = _main_session(args, scale, root)
    out["http"] = main.pop("http", None)
    out["end_to_end"] = main
    ratios["worker_over_index"] = main["lists_over_index"]

    # 2. Ingest with coalesced lists, beside a bare Faust agent and a raw consumer.
    ingest = _ingest_session(args, scale, root)
    out["ingest"] = ingest
    ratios["ingest_over_bare_faust"] = ingest["over_bare_faust"]
    ratios["ingest_over_raw_consume"] = ingest["over_raw_consume"]

    if not scale.full:
        out["rebuild"] = {"skipped": "full mode only"}
        return
    # 3. The same during non-stop rebuilds of a 100k-item index.
    out["rebuild"] = _rebuild_session(args, scale, root)


def _guard(ratios: dict[str, float], record: bool) -> int:
    if record:
        guarded = {name: ratios[name] for name in GUARDED if ratios.get(name) is not None}
        BASELINE.write_bytes(orjson.dumps(guarded, option=orjson.OPT_INDENT_2) + b"\n")
        say(f"baseline recorded in {BASELINE}: {guarded}")
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
    mode.add_argument("--full", action="store_true", help="every scenario, under 15 minutes")
    mode.add_argument("--quick", action="store_true", help="regression guard, under 4 minutes")
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
    parser.add_argument(
        "--large-index",
        action="store_true",
        help="also the index backends on 1M items (several minutes more)",
    )
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick"
    scale = Scale(args.full)
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out: dict[str, Any] = {
        "mode": name,
        "format": 2,
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
    if args.large_index:
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
