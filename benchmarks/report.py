"""``docs/benchmarks.md`` from the latest result files; the hand-written part is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

__all__ = ["MARKER", "write_markdown"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
#: Everything below this line in docs/benchmarks.md is written by hand and kept as is.
MARKER = "<!-- hand-written below: kept when the harness regenerates this file -->"


def _v(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value >= 100:
        value = round(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _coalescing(per_event: float | None) -> str:
    if per_event is None:
        return "No recommendations were counted."
    if per_event < 0.95:
        return (
            f"Coalescing cut the output to {per_event} recommendations per event "
            "(1.0 = one per event)."
        )
    return f"Coalescing did NOT reduce the output ({per_event} recommendations per event)."


def _keeps_up(phase: dict[str, Any]) -> str:
    rate, done = phase.get("target_rate"), phase.get("throughput_per_second")
    if not rate or done is None:
        return "-"
    return "yes" if done >= 0.9 * rate else "no"


def _machine(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    pk = m["packages"]
    return [
        f"- Command: `{r['command']}` (started {r['started']}, {r['seconds']:.0f} s), "
        f"broker {r.get('bootstrap', '-')}",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}; "
        f"load average at start {m['load_average_start']}, at end "
        f"{m.get('load_average_end')} (shared machine: other work runs beside the benchmark)",
        f"- Python {m['python']}, Kafka {m['kafka']}, faust-streaming {pk['faust-streaming']}, "
        f"aiokafka {pk['aiokafka']}, confluent-kafka {pk['confluent-kafka']}, annoy "
        f"{pk['annoy']}, hnswlib {pk['hnswlib']}, numpy {pk['numpy']}, rocksdict "
        f"{pk['rocksdict']}",
    ]


def _http(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    if "error" in h:
        return ["### HTTP query latency", "", f"Not measured: {h['error']}", ""]
    lines = [
        "### HTTP query latency (k=10, no events flowing)",
        "",
        f"{h['client']}; {_v(h['requests_per_phase'])} requests per row. *cached*: the same "
        f"{h['hot_keys']} users (items) asked in turn, so all but the first ask of each can hit "
        "the worker's query cache; *uncached*: a distinct user (item) per request.",
        "",
        "| endpoint | mode | requests/s | p50 ms | p95 ms | p99 ms | max ms | non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for endpoint in ("recommendations", "similar"):
        for mode in ("cached", "uncached"):
            row = h.get(f"{endpoint}_{mode}")
            if not row:
                continue
            lines.append(
                f"| `/{endpoint}/{{id}}` | {mode} | {_v(row['requests_per_second'])} | "
                f"{_v(row['p50_ms'])} | {_v(row['p95_ms'])} | {_v(row['p99_ms'])} | "
                f"{_v(row['max_ms'])} | {row['non_200']} |"
            )
    lines += [
        "",
        f"Query cache hits / queries in the cached phase: {_v(h.get('cached_phase_hit_ratio'))}, "
        f"in the uncached phase: {_v(h.get('uncached_phase_hit_ratio'))} (from "
        "`stream_knn_cache_hits_total` and `_misses_total`); `stream_knn_cache_hit_ratio` "
        f"after the cached phase (over the worker's life, warm-up included): "
        f"{_v(h.get('cache_hit_ratio_after_cached'))}.",
        "",
    ]
    return lines


def _section(r: dict[str, Any]) -> list[str]:
    lines = [f"## `{r['mode']}` run", "", *_machine(r), ""]
    c = r["core"]
    lines += [
        "### Core (no Kafka)",
        "",
        "| events/s | µs/event | bytes/item | bytes/user (mean) | bytes/user (full profile) "
        "| MiB per 1M items | MiB per 1M users (full) | index vectors MiB per 1M items |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_v(c['events_per_second'])} | {c['us_per_event']} | {c['bytes_per_item']} | "
        f"{c['bytes_per_user_mean']} | {c['bytes_per_user_full_profile']} | "
        f"{c['mib_per_million_items']} | {c['mib_per_million_users_full_profile']} | "
        f"{c['index_vector_mib_per_million_items']} |",
        "",
        f"({c['note']}; sketch update + profile add + bytes encode/decode per event.)",
        "",
    ]
    for block in r["index"]:
        lines += [
            f"### Index: {block['n_items']:,} x {block['dims']} clustered, angular, k=10",
            "",
            "Data: 1,000 cluster centres ~ N(0, 1) in 64-d, each item a centre plus N(0, 1) "
            "noise (clusters overlap: a hard set for trees); queries drawn the same way; "
            "recall@10 against exact angular search; `search_k=default` is the backend's "
            "setting (`n_trees * k * 10`); build with all cores; queries one thread, through "
            "the project's index classes (id mapping and exclusion included).",
            "",
            "| backend | params | build s | recall@10 | queries/s (1 thread) |",
            "|---|---|---|---|---|",
        ]
        for row in block["rows"]:
            if "skipped" in row:
                lines.append(
                    f"| {row['backend']} | {row['params']} | skipped: {row['skipped']} | | |"
                )
                continue
            lines.append(
                f"| {row['backend']} | {row['params']} | {row['build_seconds']} | "
                f"{row['recall_at_10']} | {_v(row['queries_per_second'])} |"
            )
        lines.append("")
    e2e = r.get("end_to_end")
    if e2e:
        lines += [
            "### End to end (event produced -> recommendation consumed)",
            "",
            f"Worker config: {e2e['config']}. Warm-up: {e2e['warmup']}.",
            "",
            "| rate ev/s | recs/s | keeps up | p50 ms | p95 ms | p99 ms | worker CPU % "
            "| peak RSS MiB | index builds in phase |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in e2e["rates"]:
            lines.append(
                f"| {_v(p['target_rate'])} | {_v(p['throughput_per_second'])} | "
                f"{_keeps_up(p)} | {_v(p['p50_ms'])} | {_v(p['p95_ms'])} | {_v(p['p99_ms'])} | "
                f"{p['worker_cpu_percent']} | {p['worker_peak_rss_mib']} | "
                f"{_v(p['index_builds'])} |"
            )
        o = e2e["open_throttle"]
        lines.append(
            f"| open ({_v(o['produced_rate'])} produced) | {_v(o['throughput_per_second'])} | "
            f"| | | | {o['worker_cpu_percent']} | {o['worker_peak_rss_mib']} | "
            f"{_v(o['index_builds'])} |"
        )
        b = e2e["index_alone"]
        lines += [
            "",
            "Latency is only a processing latency where the worker keeps up (recs/s >= 90% of "
            "the rate); where it does not, the percentiles measure the growing queue.",
            "",
            f"The worker's own latest index loaded alone ({b.get('backend')}, "
            f"{_v(b.get('items'))} items): {_v(b.get('queries_per_second'))} queries/s single "
            f"thread; worker recommendations/s over that: "
            f"**{_v(r['ratios'].get('worker_over_index'))}** (target >= 0.7).",
            "",
        ]
    lines += _http(r.get("http"))
    ing = r.get("ingest")
    if ing:
        p, raw = ing["phase"], ing["raw_consume"]
        lines += [
            "### Ingest (state updates, output coalesced with emit_interval_seconds=1)",
            "",
            "| events/s | recs per event | worker CPU % | raw consume records/s | ingest / raw |",
            "|---|---|---|---|---|",
            f"| {_v(p['events_per_second'])} | {p['recommendations_per_event']} | "
            f"{p['worker_cpu_percent']} | {_v(raw['records_per_second'])} | "
            f"{_v(r['ratios'].get('ingest_over_raw_consume'))} |",
            "",
            f"Rate source: {p['source']}. Raw consumer: {raw['client']}. "
            + _coalescing(p.get("recommendations_per_event")),
            "",
        ]
    imp = r.get("rebuild_impact")
    if imp and "skipped" not in imp:
        lines += [
            "### Rebuild impact at 1,000 events/s",
            "",
            "| worker | recs/s | keeps up | p50 ms | p99 ms | builds in phase | last build s |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in ("no_rebuild", "rebuilding"):
            q = imp[key]
            build = q["last_build_seconds"]
            lines.append(
                f"| {key} | {_v(q['throughput_per_second'])} | {_keeps_up(q)} | "
                f"{_v(q['p50_ms'])} | {_v(q['p99_ms'])} | {_v(q['index_builds'])} | "
                f"{_v(None if build is None else round(build, 2))} |"
            )
        valid = all(_keeps_up(imp[key]) == "yes" for key in ("no_rebuild", "rebuilding"))
        verdict = (
            "."
            if valid
            else "; NOT meaningful in this run: a worker did not keep up with 1,000 events/s, "
            "so both p99s are queueing delays (compare the recs/s instead)."
        )
        lines += [
            "",
            f"p99 with rebuilds / without: **{_v(imp.get('p99_ratio'))}** (target <= 2)" + verdict,
            "",
        ]
    lines += [f"Guarded ratios: `{r['ratios']}`", ""]
    return lines


def write_markdown(results_dir: Path, docs: Path = DOCS) -> Path:
    """Rewrite the generated part of ``docs`` from ``results_dir/{full,quick}-latest.json``."""
    kept = ""
    if docs.exists():
        text = docs.read_text()
        if MARKER in text:
            kept = text.split(MARKER, 1)[1]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.run --full` (`make bench`) and `--quick` "
        "(`make bench-quick`, the regression guard); raw numbers in "
        "`benchmarks/results/*-latest.json`. Numbers from a shared 2-core machine are noisy: "
        "read them with the load average beside them.",
        "",
    ]
    for mode in ("full", "quick"):
        path = results_dir / f"{mode}-latest.json"
        if path.exists():
            lines += _section(orjson.loads(path.read_bytes()))
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines) + "\n" + MARKER + (kept or "\n"))
    return docs
