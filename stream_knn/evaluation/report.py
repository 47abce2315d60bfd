"""Render evaluation and tuning results: terminal tables, JSON, report.md and PNG plots."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

# The object-oriented API renders with Agg and touches no global pyplot state.
from matplotlib.figure import Figure

from stream_knn.config import Config
from stream_knn.evaluation.replay import EvaluationResult
from stream_knn.evaluation.tune import EVAL_CUTOFF, RECALL_TARGET, TuneResult, trial_table

__all__ = [
    "METRIC_NOTES",
    "evaluation_json",
    "evaluation_table",
    "tune_json",
    "write_evaluation_report",
    "write_tune_report",
]

#: How every figure of an evaluation is defined (written into the JSON output).
METRIC_NOTES: dict[str, str] = {
    "protocol": (
        "prequential replay in time order (ties in file order): for each event of a user "
        "with history on an item new to that user, each method serves its top-k list "
        "before the event, the list is scored, then every method learns the event; seen "
        "items are excluded for every method; repeat events are learned, not scored"
    ),
    "hr": "share of scored events whose item is in the top k",
    "ndcg": "mean of 1/log2(1+rank) for a hit at rank <= k, 0 otherwise",
    "mrr": "mean reciprocal rank of the hit within the top k, 0 when not in the top k",
    "coverage": "distinct items ever recommended / distinct items seen in the replay",
    "latency": "wall time of one recommend call, microseconds (p50, p99)",
    "events_per_s": "events learned per second of the method's own learn + recommend time",
    "item_knn": (
        "exact cosine on the full weighted co-occurrence C = W^T W (w_ui = sum of the "
        "user's event weights on the item; binary with default weights and one rating "
        "per pair); score = sum of cosines to the user's last profile_max_items items"
    ),
    "popularity": (
        "decayed weighted counts with half-lives of 1, 7, 30 and 90 days of event time and "
        "none (popularity_all); 'vs pop' is against the strongest of them on the data"
    ),
    "windows": "the replay cut into consecutive windows of equal event counts",
}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def evaluation_table(result: EvaluationResult) -> str:
    """The evaluation as a fixed-width text table, one row per method."""
    k = result.k
    header = (
        f"{'method':<16}{'HR@' + str(k):>9}{'NDCG@' + str(k):>9}{'MRR':>9}{'coverage':>10}"
        f"{'p50 us':>10}{'p99 us':>10}{'events/s':>11}{'vs item-kNN':>13}{'vs pop':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, r in result.results.items():
        lines.append(
            f"{name:<16}{r.hr:>9.4f}{r.ndcg:>9.4f}{r.mrr:>9.4f}{r.coverage:>10.3f}"
            f"{r.p50_us:>10.1f}{r.p99_us:>10.1f}{r.events_per_s:>11,.0f}"
            f"{_ratio(result.ratio(name, 'item_knn')):>13}"
            f"{_ratio(result.ratio(name, 'popularity')):>9}"
        )
    for name, why in result.skipped.items():
        lines.append(f"{name:<16}left out: {why}")
    strongest = result.strongest_popularity
    if strongest is not None:
        lines.append(f"vs pop: against {strongest}, the strongest popularity baseline here.")
    lines.append(
        f"{result.n_events:,} events, {result.n_users:,} users, {result.n_items:,} items; "
        f"scored {next(iter(result.results.values())).n_scored if result.results else 0:,} "
        f"(first events {result.first_events:,}, repeats {result.repeat_events:,} not "
        f"scored; {result.cold_item_events:,} scored events on never-seen items)"
    )
    lines.append("MRR is the reciprocal rank of the hit within the top k (0 otherwise).")
    return "\n".join(lines)


def evaluation_json(
    result: EvaluationResult,
    config: Config,
    *,
    data: str,
    fmt: str | None,
    limit: int | None,
    timing: bool = True,
) -> dict[str, Any]:
    """The evaluation as a JSON-ready dict, with the data file and the config used.

    With ``timing=False`` the latency and throughput figures are left out, so two runs
    with the same seed give byte-identical documents.
    """
    methods: dict[str, Any] = {}
    for name, r in result.results.items():
        entry: dict[str, Any] = {
            "hr": r.hr,
            "ndcg": r.ndcg,
            "mrr": r.mrr,
            "coverage": r.coverage,
            "hits": r.hits,
            "n_scored": r.n_scored,
            "hr_vs_item_knn": result.ratio(name, "item_knn"),
            "hr_vs_popularity": result.ratio(name, "popularity"),
        }
        if timing:
            entry["latency_p50_us"] = r.p50_us
            entry["latency_p99_us"] = r.p99_us
            entry["events_per_s"] = r.events_per_s
        methods[name] = entry
    return {
        "data": data,
        "format": fmt,
        "limit": limit,
        "k": result.k,
        "counts": {
            "events": result.n_events,
            "users": result.n_users,
            "items": result.n_items,
            "first_events": result.first_events,
            "repeat_events": result.repeat_events,
            "cold_item_events": result.cold_item_events,
        },
        "methods": methods,
        "strongest_popularity": result.strongest_popularity,
        "self_tuning": result.tuning,
        "windows": [
            {
                "first_ts_ms": first,
                "last_ts_ms": last,
                **{
                    name: {"hr": rows[w].hr, "ndcg": rows[w].ndcg, "n_scored": rows[w].n_scored}
                    for name, rows in result.by_window.items()
                },
            }
            for w, (first, last) in enumerate(result.windows)
        ],
        "skipped": result.skipped,
        "config": _sections(config, ("events", "model", "index", "serving")),
        "definitions": METRIC_NOTES,
    }


def _sections(config: Config, names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: _plain(v) for k, v in section.items()}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def tune_json(result: TuneResult, *, data: str, timing: bool = True) -> dict[str, Any]:
    """The tuning run as a JSON-ready dict (timings left out with ``timing=False``)."""
    trials = trial_table(result)
    if not timing:
        for row in trials:
            row.pop("seconds", None)
    points = []
    for p in result.index_points:
        row = dataclasses.asdict(p)
        if not timing:
            row.pop("latency_us")
            row.pop("build_seconds")
        points.append(row)
    chosen = dataclasses.asdict(result.chosen_index) if result.chosen_index else None
    if chosen is not None and not timing:
        chosen.pop("latency_us")
        chosen.pop("build_seconds")
    return {
        "data": data,
        "search": result.search,
        "seed": result.seed,
        "events": result.n_events,
        "windows": [list(w) for w in result.windows],
        "window_times_ms": [list(w) for w in result.window_times],
        "cutoff": EVAL_CUTOFF,
        "trials": trials,
        "best": {"trial": result.best.number, "params": result.best.params, "k": result.best_k},
        "index": {"points": points, "chosen": chosen, "recall_target": RECALL_TARGET},
        "config": _sections(result.config, ("events", "model", "index", "serving")),
    }


def write_evaluation_report(
    result: EvaluationResult, directory: Path, *, data: str, command: str
) -> Path:
    """Write ``report.md`` and ``over_time.png`` (HR and NDCG per time window) into
    ``directory``; return the report path."""
    directory.mkdir(parents=True, exist_ok=True)
    _plot_over_time(result, directory / "over_time.png")
    k = result.k
    strongest = result.strongest_popularity
    lines = [
        "# stream-knn evaluation",
        "",
        f"- data: `{data}` ({result.n_events:,} events, {result.n_users:,} users, "
        f"{result.n_items:,} items)",
        f"- command: `{command}`",
        f"- protocol: {METRIC_NOTES['protocol']}",
        "",
        f"| method | HR@{k} | NDCG@{k} | MRR@{k} | coverage | vs item-kNN | vs {strongest} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result.results.items():
        lines.append(
            f"| {name} | {r.hr:.4f} | {r.ndcg:.4f} | {r.mrr:.4f} | {r.coverage:.3f} | "
            f"{_ratio(result.ratio(name, 'item_knn'))} | "
            f"{_ratio(result.ratio(name, 'popularity'))} |"
        )
    tuning = result.tuning
    if tuning is not None:
        rates, switches = tuning["hit_rates"], tuning["switches"]
        lines += [
            "",
            f"Self-tuning of the query step: {tuning['samples']:,} sampled events, decayed hit "
            "rates at the end: "
            + ", ".join(f"{name} {rate:.4f}" for name, rate in rates.items())
            + f"; served {tuning['served_first']} first, {tuning['served_last']} at the end.",
        ]
        for s in switches:
            lines.append(f"- {_when(s['ts_ms'])}: {s['from']} -> {s['to']}")
        if not switches:
            lines.append("- no switch: no candidate beat the served setting by the margin")
    lines += [
        "",
        f"Over time ({len(result.windows)} windows of equal event counts):",
        "",
        "![HR and NDCG per window](over_time.png)",
        "",
    ]
    path = directory / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _when(ts_ms: object) -> str:
    assert isinstance(ts_ms, int)
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")


def _plot_over_time(result: EvaluationResult, path: Path) -> None:
    ends = [dt.datetime.fromtimestamp(last / 1000, tz=dt.UTC) for _, last in result.windows]
    fig = Figure(figsize=(9, 4))
    hr_ax, ndcg_ax = fig.subplots(1, 2, sharex=True)
    for name, rows in result.by_window.items():
        style = "-" if not name.startswith("popularity") else ":"
        hr_ax.plot(ends, [r.hr for r in rows], style, marker="o", markersize=3, label=name)
        ndcg_ax.plot(ends, [r.ndcg for r in rows], style, marker="o", markersize=3, label=name)
    for s in (result.tuning or {}).get("switches", []):
        when = dt.datetime.fromtimestamp(s["ts_ms"] / 1000, tz=dt.UTC)
        for ax in (hr_ax, ndcg_ax):
            ax.axvline(when, color="grey", linestyle="--", linewidth=1)
        hr_ax.annotate(s["to"], (when, hr_ax.get_ylim()[1]), fontsize=7, va="top")
    hr_ax.set_ylabel(f"HR@{result.k}")
    ndcg_ax.set_ylabel(f"NDCG@{result.k}")
    for ax in (hr_ax, ndcg_ax):
        ax.set_xlabel("end of window (event time)")
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30)
    hr_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_tune_report(result: TuneResult, directory: Path, *, data: str, command: str) -> Path:
    """Write ``report.md`` and its PNG plots into ``directory``; return the report path."""
    directory.mkdir(parents=True, exist_ok=True)
    _plot_hr_vs_k(result, directory / "hr_vs_k.png")
    _plot_index(result, directory / "index_sweep.png")
    lines = [
        "# stream-knn tune report",
        "",
        f"- data: `{data}` ({result.n_events:,} events)",
        f"- command: `{command}`",
        f"- search: {result.search}, {len(result.trials)} trials, seed {result.seed}",
        f"- validation: {len(result.windows)} consecutive time windows after a warm-up "
        "(event index ranges " + ", ".join(f"[{a}, {b})" for a, b in result.windows) + "); "
        "each window is scored prequentially after learning everything before it",
        f"- objective: mean over windows of HR@min(k, {EVAL_CUTOFF}) of the served list "
        "(a longer list cannot win by being longer; the smallest best k is kept)",
        "",
        "## Model trials",
        "",
    ]
    rows = trial_table(result)
    names = list(result.trials[0].params) if result.trials else []
    head = ["trial", *names, "k", "HR per window", "objective", "seconds"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in rows:
        mark = " **best**" if row["trial"] == result.best.number else ""
        cells = [
            f"{row['trial']}{mark}",
            *(_fmt(row[n]) for n in names),
            str(row["k"]),
            ", ".join(f"{v:.4f}" for v in row["hr_windows"]),
            f"{row['objective']:.4f}",
            f"{row['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "![HR against k](hr_vs_k.png)",
        "",
        "## Index",
        "",
        f"Annoy recall@{EVAL_CUTOFF} against exact cosine search for users' query vectors on "
        "the best trial's final item vectors. Chosen: the fewest nodes inspected per query "
        f"(search_k) reaching recall >= {RECALL_TARGET} (fewer trees on a tie). "
        f"Exact search took {result.exact_latency_us:.1f} us per query.",
        "",
    ]
    chosen = result.chosen_index
    if chosen is not None:
        lines.append(
            f"**Chosen:** metric {chosen.metric}, n_trees {chosen.n_trees}, search_k "
            f"{chosen.search_k} (inspects {chosen.effective_search_k} nodes): recall "
            f"{chosen.recall:.3f}, {chosen.latency_us:.1f} us per query."
        )
        lines.append("")
    lines.append("| metric | n_trees | search_k | nodes | recall@10 | latency us | build s |")
    lines.append("|---|---|---|---|---|---|---|")
    for p in result.index_points:
        mark = " **chosen**" if p == chosen else ""
        lines.append(
            f"| {p.metric}{mark} | {p.n_trees} | {p.search_k} | {p.effective_search_k} | "
            f"{p.recall:.3f} | {p.latency_us:.1f} | {p.build_seconds:.3f} |"
        )
    lines += ["", "![recall and latency against search_k](index_sweep.png)", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _plot_hr_vs_k(result: TuneResult, path: Path) -> None:
    best = result.best
    ks = sorted(best.hr_at_k)
    at_k = [sum(best.hr_at_k[k]) / len(best.hr_at_k[k]) for k in ks]
    at_cut = [best.objective(k) for k in ks]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(ks, at_k, marker="o", label="HR@k (whole served list)")
    ax.plot(ks, at_cut, marker="s", label=f"HR@min(k, {EVAL_CUTOFF}) (objective)")
    ax.scatter(
        [result.best_k],
        [best.objective(result.best_k)],
        s=160,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        zorder=5,
        label=f"chosen k = {result.best_k}",
    )
    ax.set_xlabel("k (served list length)")
    ax.set_ylabel("hit rate, mean over windows")
    ax.set_title(f"Best trial #{best.number}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_index(result: TuneResult, path: Path) -> None:
    fig = Figure(figsize=(7, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    chosen = result.chosen_index
    metric = chosen.metric if chosen is not None else None
    points = [p for p in result.index_points if p.metric == metric]
    for n_trees in sorted({p.n_trees for p in points}):
        line = sorted(
            (p for p in points if p.n_trees == n_trees), key=lambda p: p.effective_search_k
        )
        xs = [p.effective_search_k for p in line]
        top.plot(xs, [p.recall for p in line], marker="o", label=f"{n_trees} trees")
        bottom.plot(xs, [p.latency_us for p in line], marker="o", label=f"{n_trees} trees")
    if chosen is not None:
        for ax, y in ((top, chosen.recall), (bottom, chosen.latency_us)):
            ax.scatter(
                [chosen.effective_search_k],
                [y],
                s=180,
                facecolors="none",
                edgecolors="red",
                linewidths=2,
                zorder=5,
                label="chosen",
            )
    top.axhline(RECALL_TARGET, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel(f"recall@{EVAL_CUTOFF} vs exact")
    bottom.set_ylabel("query latency, us")
    bottom.set_xlabel("nodes inspected per query (search_k)")
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_title(f"Annoy, metric {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
