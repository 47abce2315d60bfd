"""A running worker's state in one JSON document (``/status``), and its one-screen text
form for ``stream-knn status``.

Every figure that ``/metrics`` exports is read from the same registry snapshot, so the
dashboard page, ``/status`` and a Prometheus scrape agree; rates and latency percentiles
come from the worker's in-process ring of samples (:mod:`stream_knn.metrics.history`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from stream_knn import __version__
from stream_knn.metrics.history import Snapshot, read_registry, series_key

if TYPE_CHECKING:
    from stream_knn.worker.app import WorkerApp

__all__ = [
    "RATE_WINDOW_SECONDS",
    "collect_status",
    "fetch_statuses",
    "format_status",
    "human_bytes",
    "human_seconds",
]

#: Rates are per second over about this many seconds; latency percentiles over a minute.
RATE_WINDOW_SECONDS = 10.0
LATENCY_WINDOW_SECONDS = 60.0
_QUANTILES = (0.5, 0.95, 0.99)


def _value(snapshot: Snapshot, name: str, **labels: str) -> float | None:
    return snapshot.get(series_key(name, labels))


def _sum(snapshot: Snapshot, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for series, value in snapshot.items():
        if (series == name or series.startswith(name + "{")) and all(w in series for w in want):
            total += value
    return total


def _labelled(snapshot: Snapshot, name: str, label: str) -> dict[str, float]:
    """``{label value: value}`` of a metric with one label."""
    prefix = f'{name}{{{label}="'
    return {
        series[len(prefix) : -2]: value
        for series, value in snapshot.items()
        if series.startswith(prefix) and series.endswith('"}') and series.count('="') == 1
    }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def collect_status(worker: WorkerApp) -> dict[str, Any]:
    """The state of ``worker`` now, as plain JSON-able values (see the README's *Operator's
    view* for the fields)."""
    worker.service.refresh_gauges()
    snap = read_registry(worker.registry)
    cfg = worker.config
    now = time.time()
    healthy, health = worker.health()
    ready, reason = worker.is_ready()
    history = worker.history

    inputs = (
        worker.user_events.get_topic_name(),
        worker.catalog.get_topic_name(),
        worker.requests.get_topic_name(),
    )
    partitions = []
    try:
        assignment = sorted(worker.app.consumer.assignment())
    except (AttributeError, RuntimeError):  # consumer not started yet
        assignment = []
    for tp in assignment:
        if tp.topic not in inputs:
            continue
        labels = {"topic": tp.topic, "partition": str(tp.partition)}
        partitions.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "lag": _value(snap, "stream_knn_consumer_lag", **labels),
                "lag_seconds": _value(snap, "stream_knn_consumer_lag_seconds", **labels),
            }
        )

    url = str(worker.app.conf.canonical_url)
    members = {url}
    with contextlib.suppress(AttributeError, KeyError):  # no assignment yet
        members.update(str(u) for u in worker.app.router.tables_metadata())

    indexes = []
    primary = worker.service.primary
    for key, manager in worker.service.managers.items():
        entry: dict[str, Any] = {
            "backend": key[0],
            "metric": key[1],
            "n_trees": key[2],
            "search_k": key[3],
            "directory": manager.store.root.name,
            "version": manager.version,
            "age_seconds": manager.age_seconds,
            "items": manager.item_count,
            "pending_items": manager.pending_items,
            "last_build_seconds": manager.last_build_seconds,
            "sampled_recall": manager.sampled_recall(),
            "build_errors": manager.build_errors,
            "pinned": manager.pinned,
        }
        if manager is primary:
            # The primary's figures are exported: show exactly what /metrics says.
            version = _value(snap, "stream_knn_index_version")
            entry["version"] = int(version) if manager.version is not None and version else None
            entry["items"] = int(_value(snap, "stream_knn_index_items") or 0)
            entry["pending_items"] = int(_value(snap, "stream_knn_index_pending_items") or 0)
            if manager.version is not None:
                entry["age_seconds"] = _value(snap, "stream_knn_index_age_seconds")
        indexes.append(entry)

    t = worker.service.thresholds
    drift = [
        ("item_cosine_shift", "stream_knn_embedding_drift", {"kind": "item_cosine_shift"}),
        ("centroid_shift", "stream_knn_embedding_drift", {"kind": "centroid_shift"}),
        ("neighbour_drift", "stream_knn_neighbour_drift", {}),
        ("item_popularity", "stream_knn_input_drift", {"distribution": "item_popularity"}),
        ("event_type", "stream_knn_input_drift", {"distribution": "event_type"}),
    ]
    drift_rows = []
    for name, metric, labels in drift:
        value = _finite(_value(snap, metric, **labels))
        threshold = float(getattr(t, name))
        drift_rows.append(
            {
                "name": name,
                "series": series_key(metric, labels),
                "value": value,
                "threshold": threshold,
                "above": value is not None and value > threshold,
            }
        )

    hit_rates = _labelled(snap, "stream_knn_online_hit_rate", "variant")
    variants = []
    for variant in worker.service.assigner.variants:
        variants.append(
            {
                "name": variant.name,
                "share": variant.share,
                "k": variant.k,
                "index": "-".join(str(part) for part in variant.index_key),
                "online_hit_rate": hit_rates.get(variant.name),
                "lists": _sum(snap, "stream_knn_recommendations_total", variant=variant.name),
            }
        )
    served = [s for s, v in _labelled(snap, "stream_knn_tuning_served", "setting").items() if v]

    versions = []
    for series, size in snapshot_items(snap, "stream_knn_index_disk_bytes{"):
        index = series.split('index="', 1)[1].split('"', 1)[0]
        number = series.split('version="', 1)[1].split('"', 1)[0]
        versions.append({"index": index, "version": int(number), "bytes": size})
    versions.sort(key=lambda v: (v["index"], v["version"]))

    quantiles = {
        f"p{round(q * 100)}": history.quantile(q, LATENCY_WINDOW_SECONDS) for q in _QUANTILES
    }
    return {
        "worker": {
            "app_id": cfg.worker.app_id,
            "url": url,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_seconds": now - worker.started_at,
            "time": now,
        },
        "health": {"ok": healthy, **health},
        "ready": {"ready": ready, "reason": reason},
        "members": sorted(members),
        "partitions": partitions,
        "rates": {
            "window_seconds": RATE_WINDOW_SECONDS,
            "events_per_second": history.rate("events", RATE_WINDOW_SECONDS),
            "lists_per_second": history.rate("lists", RATE_WINDOW_SECONDS),
            "dlq_per_second": history.rate("dlq", RATE_WINDOW_SECONDS),
        },
        "totals": {
            "events": _sum(snap, "stream_knn_events_total"),
            "lists": _sum(snap, "stream_knn_recommendations_total"),
            "dlq": _sum(snap, "stream_knn_dlq_total"),
        },
        "latency": {
            "window_seconds": LATENCY_WINDOW_SECONDS,
            "target_p99_seconds": 0.05,
            **quantiles,
        },
        "indexes": indexes,
        "drift": drift_rows,
        "variants": variants,
        "tuning": {
            "served": served[0] if served else None,
            "hit_rates": _labelled(snap, "stream_knn_tuning_hit_rate", "setting"),
        },
        "resources": {
            "cpu_cores": history.rate("cpu_seconds", RATE_WINDOW_SECONDS),
            "cpu_seconds": _value(snap, "process_cpu_seconds_total"),
            "resident_memory_bytes": _value(snap, "process_resident_memory_bytes"),
            "open_fds": _value(snap, "process_open_fds"),
            "max_fds": _value(snap, "process_max_fds"),
            "gc_collections": _sum(snap, "python_gc_collections_total"),
            "tables": _labelled(snap, "stream_knn_table_disk_bytes", "table"),
            "index_versions": versions,
            "index_memory": _labelled(snap, "stream_knn_index_memory_bytes", "kind"),
            "replica_items": _value(snap, "stream_knn_items"),
            "replica_lag": _value(snap, "stream_knn_replica_lag"),
        },
        "problems": list(worker.problems.records),
    }


def snapshot_items(snap: Snapshot, prefix: str) -> list[tuple[str, float]]:
    """The series of ``snap`` starting with ``prefix``, in exposition order."""
    return [(s, v) for s, v in snap.items() if s.startswith(prefix)]


# -- text ------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if value is None or not math.isfinite(value) else fmt.format(value)


def human_bytes(value: float | None) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def human_seconds(value: float | None) -> str:
    """``0.0123`` -> ``12.3 ms``, ``75`` -> ``1m15s``."""
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0 s"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _one(status: dict[str, Any]) -> list[str]:
    w, h, r = status["worker"], status["health"], status["ready"]
    rates, totals, lat = status["rates"], status["totals"], status["latency"]
    res = status["resources"]
    lines = [
        f"WORKER {w['url']}  app {w['app_id']}  pid {w['pid']}  "
        f"up {human_seconds(w['uptime_seconds'])}",
        f"  health {h['status']} (broker silent {h['broker_unreachable_seconds']:.1f} s of "
        f"{h['broker_timeout_seconds']:.0f})   "
        f"ready {'yes' if r['ready'] else 'NO'}: {r['reason']}",
        f"  rates  in {_num(rates['events_per_second'], '{:,.1f}')}/s  lists "
        f"{_num(rates['lists_per_second'], '{:,.1f}')}/s  dlq "
        f"{_num(rates['dlq_per_second'], '{:,.1f}')}/s   totals in {_num(totals['events'])}  "
        f"lists {_num(totals['lists'])}  dlq {_num(totals['dlq'])}",
        f"  e2e latency (last {lat['window_seconds']:.0f} s)  p50 {human_seconds(lat['p50'])}  "
        f"p95 {human_seconds(lat['p95'])}  p99 {human_seconds(lat['p99'])}",
    ]
    topics: dict[str, list[dict[str, Any]]] = {}
    for p in status["partitions"]:
        topics.setdefault(p["topic"], []).append(p)
    lines.append(f"  {'TOPIC':<28} {'PARTITIONS':<14} {'LAG':>8} {'BEHIND':>9}  LAG PER PARTITION")
    for topic, parts in topics.items():
        numbers = ",".join(str(p["partition"]) for p in parts)
        lag = sum(p["lag"] or 0 for p in parts)
        behind = max((p["lag_seconds"] or 0.0 for p in parts), default=0.0)
        each = " ".join(f"{p['partition']}:{_num(p['lag'])}" for p in parts)
        lines.append(f"  {topic:<28} {numbers:<14} {lag:>8,.0f} {human_seconds(behind):>9}  {each}")
    if not topics:
        lines.append("  (no input partitions assigned)")
    for ix in status["indexes"]:
        recall = ix["sampled_recall"]
        lines.append(
            f"  index {ix['backend']}/{ix['metric']} v{ix['version'] or '-'}  "
            f"age {human_seconds(ix['age_seconds'])}  items {_num(ix['items'])}  "
            f"pending {_num(ix['pending_items'])}  "
            f"build {human_seconds(ix['last_build_seconds'])}  "
            f"recall {_num(recall, '{:.3f}')}  errors {ix['build_errors']}"
            + (f"  PINNED v{ix['pinned']}" if ix["pinned"] is not None else "")
        )
    for v in status["variants"]:
        lines.append(
            f"  variant {v['name']} share {v['share']:.2f} k {v['k']}  online hit rate "
            f"{_num(v['online_hit_rate'], '{:.3f}')}  lists {_num(v['lists'])}"
        )
    above = [d for d in status["drift"] if d["above"]]
    lines.append(
        "  drift  "
        + (
            "WARNING "
            + ", ".join(f"{d['name']} {d['value']:.3f} > {d['threshold']}" for d in above)
            if above
            else "within thresholds ("
            + ", ".join(f"{d['name']} {_num(d['value'], '{:.3f}')}" for d in status["drift"])
            + ")"
        )
    )
    tables = "  ".join(f"{t} {human_bytes(b)}" for t, b in sorted(res["tables"].items()))
    index_bytes = sum(v["bytes"] for v in res["index_versions"])
    lines.append(
        f"  resources cpu {_num(res['cpu_cores'], '{:.2f}')} cores  rss "
        f"{human_bytes(res['resident_memory_bytes'])}  fds {_num(res['open_fds'])}  "
        f"replica {_num(res['replica_items'])} items, lag {_num(res['replica_lag'])}"
    )
    lines.append(
        f"  disk   {tables}  index {len(res['index_versions'])} versions "
        f"{human_bytes(index_bytes)}  index memory "
        f"{human_bytes(sum(res['index_memory'].values()) if res['index_memory'] else None)}"
    )
    problems = status["problems"][-3:]
    if problems:
        lines.append("  last problems:")
        for p in problems:
            stamp = time.strftime("%H:%M:%S", time.localtime(p["ts"]))
            lines.append(f"    {stamp} {p['level']} {p['logger']}: {p['message'][:100]}")
    else:
        lines.append("  last problems: none")
    return lines


def format_status(
    statuses: Sequence[dict[str, Any]], unreachable: Sequence[tuple[str, str]] = ()
) -> str:
    """The text of ``stream-knn status``: a group line, then a block per worker, then the
    workers that did not answer (url, error)."""
    lines: list[str] = []
    if statuses:
        members = sorted({m for s in statuses for m in s["members"]})
        app_ids = sorted({s["worker"]["app_id"] for s in statuses})
        lag = sum(p["lag"] or 0 for s in statuses for p in s["partitions"])
        rate = sum(s["rates"]["events_per_second"] or 0 for s in statuses)
        owned = sum(len(s["partitions"]) for s in statuses)
        lines.append(
            f"GROUP {', '.join(app_ids)}: {len(statuses)} of {len(members)} members answered, "
            f"{owned} input partitions, total lag {lag:,.0f}, input {rate:,.1f}/s"
        )
    for status in statuses:
        lines.append("")
        lines.extend(_one(status))
    for url, error in unreachable:
        lines.append("")
        lines.append(f"WORKER {url}  UNREACHABLE: {error}")
    return "\n".join(lines) + "\n"


# -- fetching ---------------------------------------------------------------------------


def _get_status(url: str, timeout: float, token: str) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: dict[str, Any] = orjson.loads(response.read())
    return body


def fetch_statuses(
    urls: Iterable[str], follow_members: bool = True, timeout: float = 5.0, token: str = ""
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``/status`` of each worker of ``urls`` and, with ``follow_members``, of every other
    member of their consumer group that they report (Faust shares each member's web URL in
    the group's assignment); returns the answers and the ``(url, error)`` of the others.
    ``token`` is sent as the bearer token (``worker.http_token``) when set."""
    pending = [u.rstrip("/") for u in urls]
    seen: set[str] = set()
    answers: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    while pending:
        url = pending.pop(0)
        if url in seen:
            continue
        seen.add(url)
        try:
            status = _get_status(url, timeout, token)
        except urllib.error.HTTPError as exc:
            hint = " (the worker wants its token: --token or worker.http_token)"
            failed.append((url, f"HTTP {exc.code}{hint if exc.code == 401 else ''}"))
            continue
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            failed.append((url, str(getattr(exc, "reason", exc))))
            continue
        seen.add(str(status["worker"]["url"]).rstrip("/"))
        answers.append(status)
        if follow_members:
            pending.extend(m.rstrip("/") for m in status["members"] if m.rstrip("/") not in seen)
    answers.sort(key=lambda s: str(s["worker"]["url"]))
    return answers, failed
