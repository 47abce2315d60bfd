"""The Kafka scenarios of the harness: warm-up, HTTP query latency, paced end-to-end phases,
one list per event over a backlog, ingest over a backlog, and the references each is put
beside (the worker's own index queried alone, a bare Faust agent, a raw consumer)."""

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
    RecordTap,
    bare_faust_rate,
    make_producer,
    produce_backlog,
    produce_catalog,
    produce_paced,
    raw_consume_rate,
    time_gets,
    wait_for,
)
from benchmarks.indexes import query_rate
from benchmarks.workload import ZipfEvents
from stream_knn.index.store import IndexStore

__all__ = ["Scale", "Session"]

Say = Callable[[str], None]


class Scale:
    """Sizes and durations of one mode (the event load is the same in both)."""

    def __init__(self, full: bool) -> None:
        self.full = full
        #: Catalog items (with vectors) and the Zipf-popular items events are drawn over.
        self.n_items = 5_000
        self.n_users = 10_000
        #: Catalog of the rebuild scenario (full only), and its backend: Annoy, because
        #: ``auto`` searches 100k items exactly, whose rebuild costs next to nothing.
        self.rebuild_items = 100_000
        self.rebuild_backend = "annoy"
        self.zipf_s = 1.0
        self.warmup_events = 5_000 if full else 2_000
        #: Paced end-to-end phases, events/s; each runs ``rate_seconds``.
        self.rates: tuple[float, ...] = (500.0, 1000.0, 2000.0) if full else (1000.0,)
        self.rate_seconds = 12.0 if full else 5.0
        #: Lists of events produced in a phase's first seconds are left out of its latency.
        self.skip_seconds = 2.0 if full else 1.0
        #: Paced events before the first measured phase. A broker started for the run has
        #: a cold JVM (its JIT compiles the produce and fetch paths in the first minute):
        #: without this, the first phase's p99 was 100-700 ms against 20-50 ms warm.
        self.warm_seconds = 20.0 if full else 10.0
        #: After a phase, wait at most this long for its last lists (a worker that keeps
        #: up needs well under a second).
        self.drain_seconds = 30.0 if full else 20.0
        #: Runs of the backlog and ingest phases and of their references; the best counts
        #: (a shared 2-core machine slows single runs at random).
        self.repeats = 2
        #: Backlog of the one-list-per-event phase and of the ingest phase.
        self.list_events = 30_000 if full else 15_000
        self.ingest_events = 60_000
        #: Sequential GETs per endpoint and cache mode in the HTTP phase (full only).
        self.http_requests = 2_000
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
    """One worker under load: its deployment, a producer, an event source, a tap on its lists."""

    def __init__(self, dep: Deployment, scale: Scale, say: Say, seed: int = 0) -> None:
        self.dep = dep
        self.scale = scale
        self.say = say
        self.producer: Producer = make_producer(dep.bootstrap)
        self.source = ZipfEvents(
            scale.n_users, scale.n_items, s=scale.zipf_s, seed=seed, tag=f"{dep.name}{seed}"
        )
        self.tap: RecordTap | None = None
        #: Results of the phases that expect one list per event, with their event ids.
        self._checked: list[tuple[dict[str, Any], list[str]]] = []
        #: Events produced to the deployment's events topic so far.
        self.produced = 0
        self.n_catalog = 0

    def start(
        self, catalog: np.ndarray[Any, Any], warmup: bool = True, indexed_share: float = 0.9
    ) -> dict[str, Any]:
        """Start the worker, load the catalog, wait for an index of ``indexed_share`` of it,
        then a warm-up batch."""
        dep, say = self.dep, self.say
        started = time.monotonic()
        say(f"[{dep.name}] starting worker (app id {dep.app_id}, log {dep.log_path})")
        dep.start()
        ready_s = time.monotonic() - started
        self.tap = RecordTap(dep.bootstrap, dep.topics["recommendations"])
        say(f"[{dep.name}] ready in {ready_s:.1f} s; producing {len(catalog):,} catalog vectors")
        produce_catalog(dep.bootstrap, dep.topics["item_catalog"], catalog)
        self.n_catalog = n = len(catalog)
        produced_s = time.monotonic() - started

        def indexed() -> bool:
            state = dep.index_state()
            items = state.get("items") or 0
            return state.get("version") is not None and items >= indexed_share * n

        if not wait_for(indexed, 900, step=1.0):
            raise RuntimeError(f"[{dep.name}] no index of the catalog after 900 s: {dep.log_path}")
        indexed_s = time.monotonic() - started
        say(f"[{dep.name}] index built: {dep.index_state()}")
        if warmup:
            base = self._events_total()
            backlog = self.source.backlog(self.scale.warmup_events)
            produce_backlog(self.producer, dep.topics["user_events"], backlog)
            self.produced += len(backlog)
            wait_for(lambda: self._events_total() - base >= len(backlog), 180, step=0.5)
            time.sleep(1.0)
        return {
            "ready_seconds": round(ready_s, 1),
            "catalog_items": n,
            "catalog_produced_seconds": round(produced_s - ready_s, 1),
            "catalog_indexed_seconds": round(indexed_s - produced_s, 1),
            "warmup_events": self.scale.warmup_events if warmup else 0,
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
        wait_for(lambda: self._replicated() >= self.n_catalog, 120, step=1.0)
        time.sleep(2.0)
        users = list(self.source.seen_users)
        if len(users) < hot:
            return {"error": f"only {len(users)} users had events; need at least {hot}"}
        rng = np.random.default_rng(5)
        keys = {
            "recommendations": [f"/recommendations/{u}?k=10" for u in rng.permutation(users)],
            "similar": [f"/similar/i{i}?k=10" for i in rng.permutation(self.n_catalog)],
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

    def _drain(self, ids: list[str], cap: float) -> float:
        """Wait until every id of ``ids`` has a list, ``cap`` s pass, or 10 s bring none."""
        assert self.tap is not None
        tap = self.tap
        deadline = time.monotonic() + cap
        last, last_change = -1, time.monotonic()
        started = time.monotonic()
        while time.monotonic() < deadline:
            done = tap.delivered(ids)
            if done >= len(ids):
                break
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 10.0:
                break
            time.sleep(0.2)
        return time.monotonic() - started

    def _delivery(self, ids: list[str]) -> dict[str, Any]:
        assert self.tap is not None
        copies = self.tap.copies
        delivered = sum(1 for i in ids if i in copies)
        return {
            "sent": len(ids),
            "delivered": delivered,
            "missing": len(ids) - delivered,
            "duplicates": sum(copies[i] - 1 for i in ids if i in copies),
            "every_list_delivered": delivered == len(ids),
        }

    def final_delivery_check(self, cap: float) -> None:
        """Wait (up to ``cap`` s) for lists still missing, then recount every phase.

        A phase's own wait is bounded, so a worker that falls behind leaves lists for
        later; they count as delivered (late) if they arrive before this check ends.
        """
        outstanding = [i for _, ids in self._checked for i in ids]
        if outstanding:
            self._drain(outstanding, cap)
        for result, ids in self._checked:
            in_phase = result["delivered"]
            result.update(self._delivery(ids))
            result["delivered_late"] = result["delivered"] - in_phase

    def halt(self) -> None:
        """Stop the tap and the worker; its state stays on disk until :meth:`stop`."""
        if self.tap is not None:
            self.tap.stop()
            self.tap = None
        self.dep.stop()

    def warm_up(self, rate: float) -> None:
        """Paced events for ``scale.warm_seconds``, not measured (broker and worker warm)."""
        topic = self.dep.topics["user_events"]
        sent = produce_paced(self.producer, topic, self.source, rate, self.scale.warm_seconds)
        self.produced += len(sent)
        self._drain(list(sent), self.scale.drain_seconds)
        self.say(f"[{self.dep.name}] warmed up: {len(sent):,} paced events at {rate:,.0f}/s")

    def rate_phase(self, rate: float) -> dict[str, Any]:
        """Events paced at ``rate``/s; event produced -> list consumed, matched by event id.

        Latency percentiles cover the events sent after the phase's first ``skip_seconds``;
        lists/s counts this phase's lists consumed in that same window. The phase keeps up
        when those lists come at least at 95% of the rate and the last list of the phase
        is consumed within 1 s of the last event sent.
        """
        assert self.tap is not None
        dep, tap, scale = self.dep, self.tap, self.scale
        stats = dep.stats()
        cpu0, idx0 = stats.cpu_seconds(), dep.index_state()
        t0 = time.time()
        sent = produce_paced(
            self.producer, dep.topics["user_events"], self.source, rate, scale.rate_seconds
        )
        t1 = time.time()
        self.produced += len(sent)
        cpu1, idx1 = stats.cpu_seconds(), dep.index_state()
        ids = list(sent)
        waited = self._drain(ids, scale.drain_seconds)
        seen = tap.first_seen
        steady = [i for i in ids if sent[i] >= t0 + scale.skip_seconds]
        latency = np.array([seen[i] - sent[i] for i in steady if i in seen]) * 1000.0
        # The worker's own stamp: how much of the latency is before the list was sent.
        emitted = np.array([tap.emitted[i] - sent[i] for i in steady if i in seen]) * 1000.0
        created = np.array([tap.created[i] - sent[i] for i in steady if i in seen]) * 1000.0
        window = t1 - (t0 + scale.skip_seconds)
        in_window = sum(1 for i in ids if i in seen and t0 + scale.skip_seconds <= seen[i] <= t1)
        last_list = max((seen[i] for i in ids if i in seen), default=None)
        drain = None if last_list is None else max(0.0, last_list - max(sent.values()))
        throughput = in_window / window if window > 0 else 0.0
        result: dict[str, Any] = {
            "target_rate": rate,
            "produced_rate": round(len(sent) / (t1 - t0)),
            **self._delivery(ids),
            "lists_per_second": round(throughput),
            "last_list_after_last_event_seconds": None if drain is None else round(drain, 2),
            "keeps_up": throughput >= 0.95 * rate and drain is not None and drain <= 1.0,
            **_percentiles(latency),
            "latency_samples": int(latency.size),
            "to_emitted": _percentiles(emitted),
            "to_output_record": _percentiles(created),
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "index_builds": _builds(idx0, idx1),
            "last_build_seconds": _round(idx1.get("last_build_seconds")),
            "drain_wait_seconds": round(waited, 1),
        }
        self._checked.append((result, ids))
        self.say(
            f"[{dep.name}] {rate:,.0f} ev/s: {result['lists_per_second']:,} lists/s, "
            f"p50 {result['p50_ms']} p95 {result['p95_ms']} p99 {result['p99_ms']} ms, "
            f"{result['delivered']:,}/{result['sent']:,} delivered"
            f"{'' if result['keeps_up'] else ', does NOT keep up'}, "
            f"cpu {result['worker_cpu_percent']}%, builds {result['index_builds']}"
        )
        return result

    def lists_phase(self) -> dict[str, Any]:
        """A backlog of events at emit_interval 0: lists consumed/s while the worker drains it.

        The backlog is serialised first and produced in one burst (far faster than any
        worker drains it); the rate is the backlog's size over the time from its first event
        produced to its last list consumed, counting only this backlog's lists (by event id).
        """
        assert self.tap is not None
        dep, tap, n = self.dep, self.tap, self.scale.list_events
        backlog = self.source.backlog(n)
        ids = [event_id for _, _, event_id in backlog]
        stats = dep.stats()
        cpu0, idx0 = stats.cpu_seconds(), dep.index_state()
        t0, t1 = produce_backlog(self.producer, dep.topics["user_events"], backlog)
        self.produced += n
        self._drain(ids, max(60.0, n / 500.0))
        t_end = time.time()
        cpu1, idx1 = stats.cpu_seconds(), dep.index_state()
        times = sorted(tap.first_seen[i] for i in ids if i in tap.first_seen)
        drain = times[-1] - t0 if times else None
        result = {
            **self._delivery(ids),
            "produce_seconds": round(t1 - t0, 2),
            "lists_per_second": round(len(times) / drain) if drain else None,
            "drain_seconds": None if drain is None else round(drain, 2),
            "first_list_seconds": round(times[0] - t0, 2) if times else None,
            "lists_per_half_second": _timeline(times, t0),
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t_end - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "index_builds": _builds(idx0, idx1),
        }
        self._checked.append((result, ids))
        self.say(
            f"[{dep.name}] one list per event: backlog of {n:,} produced in "
            f"{result['produce_seconds']} s, {result['lists_per_second']} lists/s, "
            f"{result['delivered']:,}/{n:,} delivered; per 0.5 s: "
            f"{result['lists_per_half_second']}"
        )
        return result

    def ingest_phase(self) -> dict[str, Any]:
        """A backlog of events at emit_interval 1: events/s from ``stream_knn_events_total``.

        The counter is sampled every 0.1 s; the rate is the backlog's size over the time
        from its first event produced to the moment the counter passed it (interpolated).
        """
        assert self.tap is not None
        dep, tap, n = self.dep, self.tap, self.scale.ingest_events
        backlog = self.source.backlog(n)
        stats = dep.stats()
        base = self._events_total()
        n0 = tap.count()
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.time(), self._events_total() - base))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        cpu0, idx0 = stats.cpu_seconds(), dep.index_state()
        sampler.start()
        t0, t1 = produce_backlog(self.producer, dep.topics["user_events"], backlog)
        self.produced += n
        wait_for(lambda: bool(samples) and samples[-1][1] >= n, max(60.0, n / 300.0), 0.5)
        done.set()
        sampler.join(5)
        t_end = time.time()
        cpu1, idx1 = stats.cpu_seconds(), dep.index_state()
        time.sleep(2.0)  # the last coalesced lists are due a second after their event
        done_at = _crossing(samples, n)
        rate = n / (done_at - t0) if done_at else None
        processed = int(samples[-1][1]) if samples else 0
        lists = tap.count() - n0
        result = {
            "events": n,
            "processed": processed,
            "produce_seconds": round(t1 - t0, 2),
            "events_per_second": round(rate) if rate else None,
            "drain_seconds": round(done_at - t0, 2) if done_at else None,
            "events_per_half_second": _timeline_counts(samples, t0),
            "lists": lists,
            "lists_per_event": round(lists / processed, 3) if processed else None,
            "worker_cpu_percent": round(100 * (cpu1 - cpu0) / (t_end - t0), 1),
            "worker_peak_rss_mib": round(stats.peak_rss_mib(), 1),
            "index_builds": _builds(idx0, idx1),
            "source": "stream_knn_events_total on /metrics, sampled every 0.1 s",
        }
        self.say(
            f"[{dep.name}] ingest: backlog of {n:,} produced in {result['produce_seconds']} s, "
            f"{result['events_per_second']} events/s, {lists:,} lists for {processed:,} events; "
            f"per 0.5 s: {result['events_per_half_second']}"
        )
        return result

    def bare_faust(self) -> dict[str, Any]:
        """A bare Faust agent reading every event of this deployment's events topic."""
        topic = self.dep.topics["user_events"]
        result = bare_faust_rate(self.dep.bootstrap, topic, self.produced, self.dep.root)
        self.say(f"[{self.dep.name}] bare Faust agent: {result.get('records_per_second')} rec/s")
        return result

    def raw_consume(self) -> dict[str, Any]:
        topic = self.dep.topics["user_events"]
        result = raw_consume_rate(self.dep.bootstrap, topic, self.produced)
        self.say(f"[{self.dep.name}] raw consume: {result['records_per_second']} records/s")
        return result

    def index_bound(self, seconds: float) -> dict[str, Any]:
        """The worker's latest saved index, loaded here: single-thread queries/s (k=10).

        Run after :meth:`halt`, so that nothing else competes for the cores.
        """
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
        self.halt()
        self.dep.cleanup()


def _round(value: Any, digits: int = 2) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _builds(before: dict[str, Any], after: dict[str, Any]) -> int | None:
    v0, v1 = before.get("version"), after.get("version")
    if v0 is None or v1 is None:
        return None
    return int(v1) - int(v0)


def _crossing(samples: list[tuple[float, float]], target: float) -> float | None:
    """When a sampled cumulative count reached ``target`` (interpolated), or None."""
    before = (samples[0][0], 0.0) if samples else (0.0, 0.0)
    for t, n in samples:
        if n >= target:
            t0, n0 = before
            return t0 + (t - t0) * ((target - n0) / (n - n0)) if n > n0 else t
        before = (t, n)
    return None


def _timeline(times: list[float], t0: float, step: float = 0.5) -> list[int]:
    """How many of ``times`` fall in each ``step`` seconds after ``t0``."""
    if not times:
        return []
    counts = np.bincount(((np.asarray(times) - t0) / step).clip(0).astype(int))
    return [int(c) for c in counts]


def _timeline_counts(samples: list[tuple[float, float]], t0: float, step: float = 0.5) -> list[int]:
    """Increase of a sampled cumulative count in each ``step`` seconds after ``t0``."""
    out: list[int] = []
    edge, last = t0 + step, 0.0
    for t, n in samples:
        while t >= edge:
            out.append(int(last - sum(out)))
            edge += step
        last = n
    out.append(int(last - sum(out)))
    while out and out[-1] == 0:
        out.pop()
    return out
