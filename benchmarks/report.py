"""``docs/benchmarks.md`` from the latest result files; the hand-written part is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

__all__ = ["MARKER", "write_markdown"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
#: The layout of the result files this module reads (``format`` in them).
FORMAT = 2
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
    lines += _targets(r)
    e2e = r.get("end_to_end")
    if e2e:
        lines += [
            "### One list per event (emit_interval_seconds=0), 5k-item catalog",
            "",
            f"Worker config: {e2e['config']}. Start: {_start(e2e['warmup'])}.",
            "",
            *_rates_table(e2e["rates"], e2e["lists"]),
            *_lists_text(e2e),
        ]
    lines += _http(r.get("http"))
    ing = r.get("ingest")
    if ing:
        lines += [
            "### Ingest (state updates, lists coalesced with emit_interval_seconds=1)",
            "",
            f"Start: {_start(ing['warmup'])}.",
            "",
            *_ingest_table([("5k-item catalog", ing)]),
            *_ingest_text(ing),
        ]
    reb = r.get("rebuild")
    if reb and "skipped" not in reb:
        w, d = reb["without"], reb["during"]
        lines += [
            f"### The same on a {_v(reb['warmup']['catalog_items'])}-item index, without and "
            "during non-stop rebuilds",
            "",
            f"Worker config: {reb['config']}. Start: {_start(reb['warmup'])}. One worker, "
            "restarted between the settings (state and index restored from disk). *Without*: "
            "no rebuild trigger can fire; *during*: a rebuild whenever a second has passed and "
            "an item changed, so a build runs through most of each phase (builds per phase in "
            "the last column).",
            "",
            "Without rebuilds:",
            "",
            *_rates_table(w["rates"], w["lists"], notes=False),
            "During rebuilds:",
            "",
            *_rates_table(d["rates"], d["lists"], notes=False),
            *_no_build_warning(d),
            f"The worker's own index alone ({reb['index_alone'].get('backend')}, "
            f"{_v(reb['index_alone'].get('items'))} items): "
            f"{_v(reb['index_alone'].get('queries_per_second'))} queries/s single thread.",
            "",
            *_ingest_table([("without rebuilds", w["ingest"]), ("during rebuilds", d["ingest"])]),
            "During / without: "
            + ", ".join(f"{k.replace('_', ' ')} **{_v(v)}**" for k, v in reb["compared"].items())
            + " (target: p99 ratios <= 2).",
            "",
        ]
    lines += [f"Guarded ratios: `{r['ratios']}`", ""]
    return lines


def _no_build_warning(reb: dict[str, Any]) -> list[str]:
    idle = [f"{_v(p['target_rate'])} ev/s" for p in reb["rates"] if not p.get("index_builds")] + (
        ["the backlog"] if not reb["lists"].get("index_builds") else []
    )
    if not idle:
        return []
    return [
        f"**No index build finished during {', '.join(idle)}**: there the comparison does "
        "not measure a rebuild's cost.",
        "",
    ]


def _start(w: dict[str, Any]) -> str:
    return (
        f"ready in {w['ready_seconds']} s, {_v(w['catalog_items'])} catalog vectors produced in "
        f"{w['catalog_produced_seconds']} s and indexed {w['catalog_indexed_seconds']} s later, "
        f"{_v(w['warmup_events'])} warm-up events"
    )


def _rates_table(
    rates: list[dict[str, Any]], lists: dict[str, Any], notes: bool = True
) -> list[str]:
    lines = [
        "| load ev/s | lists/s | keeps up | delivered / sent | duplicates | p50 ms | p95 ms "
        "| p99 ms | max ms | p99 to emitted / to output record ms | worker CPU % | peak RSS MiB "
        "| index builds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rates:
        lines.append(
            f"| {_v(p['target_rate'])} | {_v(p['lists_per_second'])} | "
            f"{'yes' if p['keeps_up'] else 'no'} | {_delivered(p)} | "
            f"{_v(p['duplicates'])} | {_v(p['p50_ms'])} | {_v(p['p95_ms'])} | "
            f"{_v(p['p99_ms'])} | {_v(p['max_ms'])} | {_v(p['to_emitted']['p99_ms'])} / "
            f"{_v((p.get('to_output_record') or {}).get('p99_ms'))} | "
            f"{p['worker_cpu_percent']} | "
            f"{p['worker_peak_rss_mib']} | {_v(p['index_builds'])} |"
        )
    lines.append(
        f"| backlog of {_v(lists['sent'])} | {_v(lists['lists_per_second'])} | | "
        f"{_delivered(lists)} | {_v(lists['duplicates'])} | | | | | | "
        f"{lists['worker_cpu_percent']} | {lists['worker_peak_rss_mib']} | "
        f"{_v(lists['index_builds'])} |"
    )
    lines.append("")
    if not notes:
        return lines
    lines += [
        "Paced rows: a plain confluent-kafka producer at the rate (10k users, Zipf(1) "
        "popularity over 5k items), a plain confluent-kafka consumer on the lists; latency is"
        " event produced -> its list consumed, matched by event id, over the events sent "
        "after the phase's first seconds (*to emitted*: to the worker's own `emitted_ts` "
        "stamp on the list; *to output record*: to the Kafka CreateTime of the list, the "
        "worker's produce call; the rest is the output's delivery); *late*: lists that came"
        " after the phase's own wait, before the end of the session. *Keeps up*: lists/s >= "
        "95% of the rate and the phase's last list consumed within 1 s of its last event. "
        "Where it does not keep up, the percentiles measure the growing queue. *Backlog*: the"
        " events serialised first and produced in one burst; lists/s = the backlog's lists "
        "over the time from its first event produced to its last list consumed (the best of "
        "the runs, all in the JSON).",
        "",
    ]
    return lines


def _delivered(p: dict[str, Any]) -> str:
    late = p.get("delivered_late")
    text = f"{_v(p['delivered'])} / {_v(p['sent'])}"
    return text + (f" ({_v(late)} late)" if late else "")


def _lists_text(e2e: dict[str, Any]) -> list[str]:
    b = e2e["index_alone"]
    return [
        f"The worker's own latest index loaded alone ({b.get('backend')}, "
        f"{_v(b.get('items'))} items, params {b.get('params')}): "
        f"{_v(b.get('queries_per_second'))} queries/s from one thread (k=10, each item's own "
        f"vector as the query); backlog lists/s over that: **{_v(e2e['lists_over_index'])}** "
        "(target >= 0.6).",
        "",
    ]


def _ingest_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| worker | backlog | events/s | lists per event | worker CPU % | index builds "
        "| bare Faust rec/s | raw consumer rec/s | worker / bare Faust | worker / raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ing in rows:
        p, bare, raw = ing["phase"], ing.get("bare_faust") or {}, ing.get("raw_consume") or {}
        lines.append(
            f"| {name} | {_v(p['events'])} | {_v(p['events_per_second'])} | "
            f"{p['lists_per_event']} | {p['worker_cpu_percent']} | {_v(p.get('index_builds'))} "
            f"| {_v(bare.get('records_per_second'))} | {_v(raw.get('records_per_second'))} | "
            f"{_v(ing.get('over_bare_faust'))} | {_v(ing.get('over_raw_consume'))} |"
        )
    lines.append("")
    return lines


def _ingest_text(ing: dict[str, Any]) -> list[str]:
    bare, raw = ing["bare_faust"], ing["raw_consume"]
    return [
        f"Worker rate: the backlog (serialised first, produced in one burst) over the time from "
        f"its first event produced to the moment {ing['phase']['source']} passed its size. "
        "The references read the same topic after the worker finished, each with a fresh "
        f"group: {bare.get('client')}; {raw.get('client')}; both from their first record to "
        "their last (their group join left out).",
        "",
    ]


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**NOT met**")


def _targets(r: dict[str, Any]) -> list[str]:
    """The issue 13 item 6 figures, each beside its reference from the same run."""
    e2e, ing, reb = r.get("end_to_end"), r.get("ingest"), r.get("rebuild") or {}
    if not e2e or not ing:
        return []
    rows = []
    eps, ratio = ing["phase"].get("events_per_second"), ing.get("over_bare_faust")
    rows.append(
        (
            "ingest, lists coalesced (1 s)",
            f"{_v(eps)} events/s",
            f"bare Faust {_v(ing['bare_faust'].get('records_per_second'))} rec/s",
            _v(ratio),
            ">= 10,000/s and >= 0.55",
            _mark(None if not eps or ratio is None else eps >= 10_000 and ratio >= 0.55),
        )
    )
    lo = e2e.get("lists_over_index")
    rows.append(
        (
            "one list per event, backlog",
            f"{_v(e2e['lists'].get('lists_per_second'))} lists/s",
            f"index alone {_v(e2e['index_alone'].get('queries_per_second'))} q/s",
            _v(lo),
            ">= 0.6",
            _mark(None if lo is None else lo >= 0.6),
        )
    )
    limits = {500.0: 30.0, 1000.0: 50.0}
    for p in e2e["rates"]:
        rate = p["target_rate"]
        delivered = "all delivered" if p["every_list_delivered"] else f"{p['missing']} missing"
        keeps = "keeps up" if p["keeps_up"] else "does not keep up"
        if rate in limits:
            target = f"p99 <= {limits[rate]:.0f} ms, all delivered"
            ok = p["p99_ms"] is not None and p["p99_ms"] <= limits[rate]
        else:
            target, ok = "keeps up, all delivered", p["keeps_up"]
        rows.append(
            (
                f"end to end at {_v(rate)} ev/s",
                f"p99 {_v(p['p99_ms'])} ms ({keeps}, {delivered})",
                "",
                "",
                target,
                _mark(ok and p["every_list_delivered"]),
            )
        )
    kept_up = {p["target_rate"]: p["keeps_up"] for p in (reb.get("without") or {}).get("rates", [])}
    for key, value in (reb.get("compared") or {}).items():
        is_p99 = key.startswith("p99")
        measured = ""
        ok = None if value is None or not is_p99 else value <= 2.0
        if is_p99 and not kept_up.get(float(key.rsplit("_", 1)[1]), True):
            # Without rebuilds the worker fell behind: that p99 is a queue, not a latency.
            measured, ok = "not comparable: without rebuilds it does not keep up", None
        rows.append(
            (
                f"100k items, during / without rebuilds: {key.replace('_', ' ')}",
                measured,
                "same figure, same worker, no rebuild",
                _v(value),
                "<= 2" if is_p99 else "",
                _mark(ok),
            )
        )
    lines = [
        "### Targets (issue 13, item 6), each beside its reference from this run",
        "",
        "| figure | measured | reference | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines.append("")
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
            result = orjson.loads(path.read_bytes())
            if result.get("format") == FORMAT:
                lines += _section(result)
            else:
                lines += [f"## `{mode}` run", "", f"`{path.name}` is from an older harness.", ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines) + "\n" + MARKER + (kept or "\n"))
    return docs
