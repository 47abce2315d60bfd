"""The Kafka scenarios of the harness: warm-up, HTTP query latency, fixed-rate and
open-throttle phases, ingest, rebuild impact and the worker's own index measured alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from benchmarks.e2e import (
    Deployment,
    EventSource,
    RecordTap,
    make_producer,
    produce_catalog,
    produce_for,
    raw_consume_rate,
    time_gets,
    wait_for,
)
from benchmarks.indexes import query_rate
from stream_knn.index.store import IndexStore

__all__ = ["Scale", "Session"]

Say = Callable[[str], None]


class Scale:
    """Sizes and durations of one mode."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.n_items = 50_000 if full else 5_000
        self.n_users = 50_000 if full else 5_000
        #: Few users in the ingest run, so a user has several events per emit interval.
        self.ingest_users = 500
        self.warmup_events = 5_000 if full else 2_000
        self.rate_seconds = 20.0 if full else 4.0
        self.skip_seconds = 3.0 if full else 1.0
        #: Open-throttle bursts are larger than the worker drains in ``window_seconds``.
        self.open_events = 150_000 if full else 40_000
        self.window_seconds = 20.0 if full else 8.0
        #: Sequential GETs per endpoint and cache mode in the HTTP phase.
        self.http_requests = 2_000 if full else 600
        #: Distinct users (and items) asked over and over in the cached HTTP mode.
        self.http_hot = 20


def _percentiles(values: np.ndarray[Any, Any], digits: int = 1) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), digits),
        "p95_ms": round(float(p95), digits),
        "p99_ms": round(float(p99), digits),
        "max_ms": round(float(values.max()), digits),
    }


class Session:
    """One deployment under load: its worker, a producer, and a tap on its output."""

    def __init__(
        self, dep: Deployment, scale: Scale, say: Say, seed: int = 0, n_users: int | None = None
    ) -> None:
        self.dep = dep
        self.scale = scale
        self.say = say
        self.producer: Producer = make_producer(dep.bootstrap)
        self.source = EventSource(n_users or scale.n_users, scale.n_items, seed)
        self.tap: RecordTap | None = None
        self.produced = 0

    def start(self, catalog: np.ndarray[Any, Any]) -> dict[str, Any]:
        """Start the worker, load the catalog, wait for an index, then a first event batch."""
        dep, say = self.dep, self.say
        started = time.monotonic()
        say(f"[{dep.name}] starting worker (app id {dep.app_id}, log {dep.log_path})")
        dep.start()
        ready_s = time.monotonic() - started
        self.tap = RecordTap(dep.bootstrap, dep.topics["recommendations"])
        say(f"[{dep.name}] ready in {ready_s:.1f} s; producing {len(catalog):,} catalog vectors")
        produce_catalog(dep.bootstrap, dep.topics["item_catalog"], catalog)
        n = len(catalog)

        def indexed() -> bool:
            state = dep.index_state()
            return state.get("version") is not None and (state.get("items") or 0) >= 0.9 * n

        if not wait_for(indexed, 600, step=1.0):
            raise RuntimeError(f"[{dep.name}] no index of the catalog after 600 s: {dep.log_path}")
        say(f"[{dep.name}] index built: {dep.index_state()}; warm-up events")
        base = self._events_total()
        sent, _, _ = produce_for(
            self.producer,
            dep.topics["user_events"],
            self.source,
            rate=None,
            count=self.scale.warmup_events,
        )
        self.produced += sent
        wait_for(lambda: self._events_total() - base >= sent, 180, step=0.5)
        time.sleep(1.0)
        return {
            "ready_seconds": round(ready_s, 1),
            "warmup_seconds": round(time.monotonic() - started, 1),
        }

    def _events_total(self) -> float:
        try:
            return self.dep.events_total()
        except OSError:
            return 0.0

    def http_phase(self) -> dict[str, Any]:
        """Sequential GETs while no events flow: the same few keys, then a distinct key each.

        ``/recommendations/{user}?k=10`` asks users that had warm-up events (so they have a
        profile); ``/similar/{item}?k=10`` asks catalog items. The worker's query cache is
        keyed by the index's change counter, so it can only hit while no events flow.
        """
        dep, scale = self.dep, self.scale
        n, hot = scale.http_requests, scale.http_hot
        # Every catalog vector that reaches the replica bumps the change counter (and so
        # invalidates the cache): wait for the whole catalog, then for the item-vector
        # updates of the last warm-up events, which trail their recommendations a little.
        wait_for(lambda: self._replicated() >= scale.n_items, 120, step=1.0)
        time.sleep(2.0)
        users = list(self.source.seen_users)
        if len(users) < hot:
            return {"error": f"only {len(users)} users had events; need at least {hot}"}
        rng = np.random.default_rng(5)
        keys = {
            "recommendations": [f"/recommendations/{u}?k=10" for u in rng.permutation(users)],
            "similar": [f"/similar/i{i}?k=10" for i in rng.permutation(scale.n_items)],
        }
        result: dict[str, Any] = {
            "requests_per_phase": n,
            "hot_keys": hot,
            "client": "http.client, one keep-alive connection, sequential, body read",
        }
        for mode in ("cached", "uncached"):
            hits0, misses0 = self._cache_counts()
            for endpoint, paths in keys.items():
                if mode == "cached":
                    # Each hot key is asked n / hot times; only its first ask can miss.
                    chosen = [paths[j % hot] for j in range(n)]
                else:
                    # Skip the hot keys (cached above) and stop at the distinct keys there are.
                    chosen = paths[hot : hot + n]
                times, seconds, errors = time_gets(dep.web_port, chosen)
                row: dict[str, Any] = {
                    "requests": len(chosen),
                    "distinct_keys": len(set(chosen)),
                    "requests_per_second": round(len(chosen) / seconds) if seconds > 0 else None,
                    "non_200": errors,
                    **_percentiles(times, digits=2),
                }
                result[f"{endpoint}_{mode}"] = row
                self.say(
                    f"[{dep.name}] HTTP {endpoint} {mode}: {row['requests_per_second']} req/s, "
                    f"p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms"
                    + (f", {errors} non-200" if errors else "")
                )
            hits1, misses1 = self._cache_counts()
            asked = (hits1 - hits0) + (misses1 - misses0)
            result[f"{mode}_phase_hit_ratio"] = (
                round((hits1 - hits0) / asked, 3) if asked > 0 else None
            )
            if mode == "cached":
                ratio = dep.metric("stream_knn_cache_hit_ratio")
                result["cache_hit_ratio_after_cached"] = None if ratio is None else round(ratio, 3)
        self.say(
            f"[{dep.name}] cache hit ratio: {result.get('cache_hit_ratio_after_cached')} "
            f"(worker lifetime gauge), {result.get('cached_phase_hit_ratio')} in the cached "
            f"phase, {result.get('uncached_phase_hit_ratio')} in the uncached phase"
        )
        return result

    def _replicated(self) -> int:
        try:
            return int(self.dep.get_json("/index").get("replicated_items") or 0)
        except OSError:
            return 0

    def _cache_counts(self) -> tuple[float, float]:
        hits = self.dep.metric("stream_knn_cache_hits_total")
        misses = self.dep.metric("stream_knn_cache_misses_total")
        return hits or 0.0, misses or 0.0

    def rate_phase(self, rate: float) -> dict[str, Any]:
        """Produce at ``rate`` events/s; latency and throughput over the steady part."""
        assert self.tap is not None
        dep, tap, scale = self.dep, self.tap, self.scale
        stats = dep.stats()
        cpu0, idx0, n0 = stats.cpu_seconds(), dep.index_state(), tap.count()
        sent, t0, t1 = produce_for(
            self.producer,
            dep.topics["user_events"],
            self.source,
            rate=rate,
            seconds=scale.rate_seconds,
        )
        self.produced += sent
        wait_for(lambda: tap.count() - n0 >= sent, min(15.0, scale.rate_seconds))
        t_end = time.time()
        cpu1, idx1 = stats.cpu_seconds(), dep.index_state()
        times = np.asarray(tap.times[n0:])
        ets = np.asarray(tap.event_ts[n0:], dtype=np.float64) / 1000.0
        steady = (ets >= t0 + scale.skip_seconds) & (ets <= t1)
        latency = (times[steady] - ets[steady]) * 1000.0
        window = t1 - t0 - scale.skip_seconds
        in_window = int(((times >= t0 + scale.skip_seconds) & (times <= t1)).sum())
        result = {
            "target_rate": rate,
            "sent": sent,
            "produced_rate": round(sent / (t1 - t0)),
            "recommendations": int(times.size),
            "throughput_per_second": round(in_window / window),
            **_percentiles(latency),
            "latency_samples": int(latency.size),
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t_end - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "index_builds": _builds(idx0, idx1),
            "last_build_seconds": idx1.get("last_build_seconds"),
        }
        self.say(
            f"[{dep.name}] {rate:,.0f} ev/s: {result['throughput_per_second']:,} recs/s, "
            f"p50 {result['p50_ms']} p95 {result['p95_ms']} p99 {result['p99_ms']} ms, "
            f"cpu {result['worker_cpu_percent']}%, builds {result['index_builds']}"
        )
        return result

    def open_phase(self) -> dict[str, Any]:
        """A burst produced as fast as possible; the worker's drain rate of recommendations."""
        assert self.tap is not None
        dep, tap, n_events = self.dep, self.tap, self.scale.open_events
        stats = dep.stats()
        cpu0, idx0, n0 = stats.cpu_seconds(), dep.index_state(), tap.count()
        sent, t0, t1 = produce_for(
            self.producer, dep.topics["user_events"], self.source, rate=None, count=n_events
        )
        self.produced += sent
        window = self.scale.window_seconds
        wait_for(lambda: tap.count() - n0 >= sent, max(0.0, t0 + window - time.time()), 0.5)
        t_end = time.time()
        cpu1, idx1 = stats.cpu_seconds(), dep.index_state()
        times = np.asarray(tap.times[n0:])
        rate = _middle_rate(times[times <= t0 + window])
        result = {
            "sent": sent,
            "produced_rate": round(sent / max(1e-9, t1 - t0)),
            "recommendations": int(times.size),
            "throughput_per_second": round(rate) if rate else None,
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t_end - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "index_builds": _builds(idx0, idx1),
        }
        self.say(
            f"[{dep.name}] open throttle: {sent:,} events produced at "
            f"{result['produced_rate']:,}/s, worker {result['throughput_per_second']} recs/s"
        )
        return result

    def ingest_phase(self) -> dict[str, Any]:
        """Open throttle, rate from the worker's ``stream_knn_events_total`` counter."""
        assert self.tap is not None
        dep, tap, n_events = self.dep, self.tap, self.scale.open_events
        stats = dep.stats()
        base = self._events_total()
        n0 = tap.count()
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), self._events_total() - base))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        cpu0 = stats.cpu_seconds()
        t0 = time.time()
        sampler.start()
        sent, _, _ = produce_for(
            self.producer, dep.topics["user_events"], self.source, rate=None, count=n_events
        )
        self.produced += sent
        wait_for(
            lambda: bool(samples) and samples[-1][1] >= sent,
            max(0.0, t0 + self.scale.window_seconds - time.time()),
            0.5,
        )
        done.set()
        sampler.join(5)
        t_end = time.time()
        cpu1 = stats.cpu_seconds()
        time.sleep(2.0)  # let the last coalesced emissions arrive
        counter_rate = _counter_rate(samples)
        recs = tap.count() - n0
        processed = int(samples[-1][1]) if samples else 0
        result = {
            "sent": sent,
            "events_per_second": round(counter_rate) if counter_rate else None,
            "processed": processed,
            "recommendations": recs,
            "recommendations_per_event": round(recs / processed, 3) if processed else None,
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t_end - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "source": "slope of stream_knn_events_total on /metrics after its first second",
        }
        self.say(
            f"[{dep.name}] ingest: {result['events_per_second']} events/s, "
            f"{recs:,} recommendations for {processed:,} events processed"
        )
        return result

    def raw_consume(self) -> dict[str, Any]:
        result = raw_consume_rate(self.dep.bootstrap, self.dep.topics["user_events"], self.produced)
        self.say(f"[{self.dep.name}] raw consume: {result['records_per_second']} records/s")
        return result

    def index_bound(self, seconds: float) -> dict[str, Any]:
        """The worker's latest saved index, loaded here: single-thread queries/s (k=10)."""
        root = Path(self.dep.env()["STREAM_KNN_DATA_DIR"]) / "index"
        found = IndexStore(root).latest_valid()
        if found is None:
            return {"error": f"no saved index under {root}"}
        info, index = found
        rng = np.random.default_rng(1)
        picks = rng.choice(len(index), size=min(2000, len(index)), replace=False)
        ids = [index.ids[int(p)] for p in picks]
        queries = np.stack([index.vector(i) for i in ids])  # type: ignore[misc]
        excluded = iter(ids * 1000)
        qps, _ = query_rate(
            lambda q: index.search(q, 10, exclude=(next(excluded),)), queries, seconds
        )
        self.say(
            f"[{self.dep.name}] index alone ({info.backend}, {len(index):,} items): "
            f"{qps:,.0f} queries/s single thread"
        )
        return {
            "backend": info.backend,
            "items": len(index),
            "version": info.version,
            "queries_per_second": round(qps),
            "params": dict(info.params),
        }

    def stop(self) -> None:
        """Stop the tap and the worker, then delete the topics and the worker's state."""
        if self.tap is not None:
            self.tap.stop()
        self.dep.stop()
        self.dep.cleanup()


def _builds(before: dict[str, Any], after: dict[str, Any]) -> int | None:
    v0, v1 = before.get("version"), after.get("version")
    if v0 is None or v1 is None:
        return None
    return int(v1) - int(v0)


def _middle_rate(times: np.ndarray[Any, Any]) -> float | None:
    """Records/s between the 10th and the 90th percentile record of a drain."""
    if times.size < 20:
        return None
    ordered = np.sort(times)
    lo, hi = int(0.1 * ordered.size), int(0.9 * ordered.size)
    span = ordered[hi] - ordered[lo]
    return (hi - lo) / span if span > 0 else None


def _counter_rate(samples: list[tuple[float, float]]) -> float | None:
    """Counter slope from one second after it first moved to its last change."""
    moving = [s for s in samples if s[1] > 0]
    if len(moving) < 3:
        return None
    start = next((s for s in moving if s[0] >= moving[0][0] + 1.0), moving[0])
    last = max(moving, key=lambda s: s[1])
    end = next(s for s in moving if s[1] >= last[1])
    return (end[1] - start[1]) / (end[0] - start[0]) if end[0] > start[0] else None
