"""The worker's dashboard page at ``/``: HTML with server-side SVG charts, rendered from
the ``/status`` document and the in-process ring of samples.

No CDN and no chart library: the charts are SVG polylines drawn here, the page's CSS and
its small script (refresh the panels every few seconds, the "try it" form) are files
shipped in the package (``stream_knn/worker/static``). Every figure that ``/metrics`` also
exports carries the series it shows in ``data-series`` and its raw value in
``data-value``, so a test (or an operator) can check one against the other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from html import escape
from importlib import resources
from typing import Any

from stream_knn.metrics.history import MetricHistory, series_key
from stream_knn.worker.status import human_bytes, human_seconds

__all__ = ["CHART_SPAN_SECONDS", "REFRESH_SECONDS", "render_page", "render_panels"]

#: The charts show this many seconds up to now; the page refreshes its panels this often.
CHART_SPAN_SECONDS = 300.0
REFRESH_SECONDS = 5
#: What a figure without a value shows (an en dash).
DASH = "\u2013"
_COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")

Points = Sequence[tuple[float, float]]


@lru_cache(maxsize=4)
def _static(name: str) -> str:
    return resources.files("stream_knn.worker").joinpath("static", name).read_text("utf-8")


def _fmt(value: float | None, fmt: str = "{:,.0f}") -> str:
    return DASH if value is None or not math.isfinite(value) else fmt.format(value)


def _fig(
    value: float | None,
    text: str | None = None,
    series: str | None = None,
    cls: str = "",
) -> str:
    """A figure: its text, and where it comes from (``data-series``) with its raw value."""
    shown = escape(text if text is not None else _fmt(value))
    attrs = f' class="{cls}"' if cls else ""
    if series is not None:
        raw = "" if value is None else repr(float(value))
        attrs += f' data-series="{escape(series)}" data-value="{raw}"'
    return f"<span{attrs}>{shown}</span>"


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value``."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)  # pragma: no cover


def line_chart(
    name: str,
    series: Sequence[tuple[str, Points]],
    now: float,
    unit: Callable[[float], str],
    *,
    threshold: tuple[str, float] | None = None,
    span: float = CHART_SPAN_SECONDS,
    width: int = 560,
    height: int = 170,
) -> str:
    """An SVG line chart of ``series`` (label, points of (epoch s, value)) over the last
    ``span`` seconds; ``threshold`` (label, value) is drawn as a dashed line.
    ``data-points`` counts the points drawn, so a reader can wait for a chart to fill."""
    left, right, top, bottom = 58, 8, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    start = now - span
    visible = [
        (label, [(t, v) for t, v in pts if t >= start and math.isfinite(v)])
        for label, pts in series
    ]
    peak = max((v for _, pts in visible for _, v in pts), default=0.0)
    if threshold is not None:
        peak = max(peak, threshold[1])
    top_value = _nice_max(peak * 1.05)

    def x(t: float) -> float:
        return left + (t - start) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - min(v, top_value) / top_value * plot_h

    parts = [
        f'<svg class="chart" data-chart="{escape(name)}" data-points="'
        f'{sum(len(p) for _, p in visible)}" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(name)}">'
    ]
    for i in range(5):
        v = top_value * i / 4
        gy = y(v)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{gy + 4:.1f}" class="axis" text-anchor="end">'
            f"{escape(unit(v))}</text>"
        )
    step = next(s for s in (15, 30, 60, 120) if span / s <= 6)
    for ago in range(0, int(span) + 1, step):
        gx = x(now - ago)
        label = "now" if ago == 0 else f"-{ago // 60}m" if ago % 60 == 0 else f"-{ago}s"
        parts.append(
            f'<text x="{gx:.1f}" y="{height - 6}" class="axis" text-anchor="middle">{label}</text>'
        )
    if threshold is not None:
        ty = y(threshold[1])
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{ty:.1f}" y2="{ty:.1f}" '
            'class="threshold"/>'
            f'<text x="{width - right - 2}" y="{ty - 3:.1f}" class="axis" text-anchor="end">'
            f"{escape(threshold[0])}</text>"
        )
    for (label, pts), colour in zip(visible, _COLOURS, strict=False):
        if len(pts) >= 2:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}">'
                f"<title>{escape(label)}</title></polyline>"
            )
        elif pts:
            t, v = pts[0]
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2" fill="{colour}"/>')
    parts.append("</svg>")
    legend = " ".join(
        f'<span class="key"><i style="background:{colour}"></i>{escape(label)} '
        f"<b>{escape(unit(pts[-1][1])) if pts else DASH}</b></span>"
        for (label, pts), colour in zip(visible, _COLOURS, strict=False)
    )
    return f'<div class="plot">{"".join(parts)}<div class="legend">{legend}</div></div>'


def _tp(partition: dict[str, Any]) -> dict[str, str]:
    return {"topic": partition["topic"], "partition": str(partition["partition"])}


def _per_second(v: float) -> str:
    return f"{v:,.0f}/s" if v >= 10 else f"{v:.1f}/s"


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def _card(title: str, body: str, wide: bool = False) -> str:
    cls = "card wide" if wide else "card"
    return f'<section class="{cls}"><h2>{escape(title)}</h2>{body}</section>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _stat(label: str, figure: str) -> str:
    return (
        f'<div class="stat"><div class="label">{escape(label)}</div>'
        f'<div class="value">{figure}</div></div>'
    )


def chart_span(history: MetricHistory, now: float) -> float:
    """Seconds the charts show: the ring's age, from one minute up to
    :data:`CHART_SPAN_SECONDS` (a young worker's charts are not mostly empty)."""
    oldest = history.samples[0].at if history.samples else now
    return min(CHART_SPAN_SECONDS, max(60.0, now - oldest))


def render_panels(status: dict[str, Any], history: MetricHistory) -> str:
    """The refreshing part of the page: every panel, as an HTML fragment."""
    now = float(status["worker"]["time"])
    span = chart_span(history, now)
    h, r, rates, totals = status["health"], status["ready"], status["rates"], status["totals"]
    lat, res = status["latency"], status["resources"]
    out: list[str] = []
    badge_h = "ok" if h["ok"] else "bad"
    badge_r = "ok" if r["ready"] else "warn"
    out.append(
        '<div class="badges">'
        f'<span class="badge {badge_h}" id="health">health: {escape(h["status"])}</span>'
        f'<span class="muted">broker silent {h["broker_unreachable_seconds"]:.1f} s '
        f"(limit {h['broker_timeout_seconds']:.0f} s)</span>"
        f'<span class="badge {badge_r}" id="ready">ready: {"yes" if r["ready"] else "no"}</span>'
        f'<span class="muted" id="ready-reason">{escape(r["reason"])}</span>'
        f'<span class="muted">up {escape(human_seconds(status["worker"]["uptime_seconds"]))}, '
        f"{len(status['members'])} member(s) in the group: "
        + ", ".join(f'<a href="{escape(m)}/">{escape(m)}</a>' for m in status["members"])
        + "</span></div>"
    )
    badges = out.pop()

    stats = "".join(
        [
            _stat(
                "input",
                _fig(rates["events_per_second"], _per_second(rates["events_per_second"] or 0.0)),
            ),
            _stat(
                "lists",
                _fig(rates["lists_per_second"], _per_second(rates["lists_per_second"] or 0.0)),
            ),
            _stat(
                "dead letters",
                _fig(rates["dlq_per_second"], _per_second(rates["dlq_per_second"] or 0.0)),
            ),
            _stat("events, total", _fig(totals["events"], series="stream_knn_events_total")),
            _stat("lists, total", _fig(totals["lists"], series="stream_knn_recommendations_total")),
            _stat("dead letters, total", _fig(totals["dlq"], series="stream_knn_dlq_total")),
        ]
    )
    throughput = line_chart(
        "throughput",
        [
            ("input events/s", history.rate_series("events")),
            ("lists/s", history.rate_series("lists")),
        ],
        now,
        _per_second,
        span=span,
    )
    out.append(_card("Throughput", f'<div class="stats">{stats}</div>{throughput}'))

    quantile_stats = "".join(
        _stat(f"{q} (last {lat['window_seconds']:.0f} s)", _fig(lat[q], human_seconds(lat[q])))
        for q in ("p50", "p95", "p99")
    )
    latency = line_chart(
        "latency",
        [(f"p{round(q * 100)}", history.quantile_series(q)) for q in (0.5, 0.95, 0.99)],
        now,
        _ms,
        threshold=("p99 target 50 ms", lat["target_p99_seconds"]),
        span=span,
    )
    out.append(
        _card(
            "End-to-end latency (event produced → list sent)",
            f'<div class="stats">{quantile_stats}</div>{latency}',
        )
    )

    lag_rows = [
        [
            escape(p["topic"]),
            str(p["partition"]),
            _fig(
                p["lag"],
                series=series_key("stream_knn_consumer_lag", _tp(p)),
            ),
            _fig(
                p["lag_seconds"],
                human_seconds(p["lag_seconds"]),
                series=series_key("stream_knn_consumer_lag_seconds", _tp(p)),
            ),
        ]
        for p in status["partitions"]
    ]
    out.append(
        _card(
            "Consumer lag per partition",
            _table(
                ["topic", "partition", "messages", "behind"],
                lag_rows,
                "no input partition assigned",
            ),
        )
    )

    index_rows = []
    for i, ix in enumerate(status["indexes"]):
        primary = i == 0
        version = ix["version"]
        index_rows.append(
            [
                escape(
                    f"{ix['backend']}/{ix['metric']}"
                    + (f" trees {ix['n_trees']}" if ix["backend"] != "exact" else "")
                ),
                _fig(
                    version,
                    f"v{version}" if version else "none yet",
                    "stream_knn_index_version" if primary and version else None,
                ),
                escape(human_seconds(ix["age_seconds"])),
                _fig(ix["items"], series="stream_knn_index_items" if primary else None),
                _fig(
                    ix["pending_items"],
                    series="stream_knn_index_pending_items" if primary else None,
                ),
                escape(human_seconds(ix["last_build_seconds"])),
                _fig(ix["sampled_recall"], _fmt(ix["sampled_recall"], "{:.3f}")),
                str(ix["build_errors"])
                + (f" · pinned v{ix['pinned']}" if ix["pinned"] is not None else ""),
            ]
        )
    out.append(
        _card(
            "Index",
            _table(
                [
                    "setting",
                    "version",
                    "age",
                    "items",
                    "pending delta",
                    "build time",
                    "sampled recall",
                    "build errors",
                ],
                index_rows,
                "no index",
            ),
        )
    )

    drift_rows = []
    for d in status["drift"]:
        value, threshold = d["value"], d["threshold"]
        share = 0.0 if value is None else min(1.0, value / threshold / 2) if threshold else 0.0
        bar = (
            f'<div class="bar {"bad" if d["above"] else ""}">'
            f'<i style="width:{share * 100:.0f}%"></i>'
            '<b style="left:50%"></b></div>'
        )
        drift_rows.append(
            [
                escape(d["name"].replace("_", " ")),
                _fig(value, _fmt(value, "{:.4f}"), d["series"] if value is not None else None),
                escape(f"{threshold:g}"),
                bar,
                '<span class="badge bad">above</span>'
                if d["above"]
                else '<span class="badge ok">ok</span>',
            ]
        )
    out.append(
        _card(
            "Drift against thresholds",
            _table(["measure", "value", "threshold", "", ""], drift_rows, "no drift measured yet"),
        )
    )

    variant_rows = [
        [
            escape(v["name"]),
            escape(f"{v['share']:.0%}"),
            str(v["k"]),
            escape(v["index"]),
            _fig(
                v["online_hit_rate"],
                _fmt(v["online_hit_rate"], "{:.3f}"),
                f'stream_knn_online_hit_rate{{variant="{v["name"]}"}}'
                if v["online_hit_rate"] is not None
                else None,
            ),
            _fig(v["lists"]),
        ]
        for v in status["variants"]
    ]
    tuning = status["tuning"]
    tuning_line = ""
    if tuning["hit_rates"]:
        tuning_line = (
            '<p class="muted">self-tuning serves <b>'
            + escape(tuning["served"] or DASH)
            + "</b>; candidate hit rates: "
            + ", ".join(f"{escape(k)} {v:.3f}" for k, v in sorted(tuning["hit_rates"].items()))
            + "</p>"
        )
    out.append(
        _card(
            "A/B variants",
            _table(
                ["variant", "share", "k", "index", "online hit rate", "lists"],
                variant_rows,
                "no variant",
            )
            + tuning_line,
        )
    )

    cpu_chart = line_chart(
        "resources",
        [("CPU cores", history.rate_series("cpu_seconds"))],
        now,
        lambda v: f"{v:.2f}",
        span=span,
    )
    rss_chart = line_chart(
        "memory",
        [("resident memory", history.value_series("rss_bytes"))],
        now,
        human_bytes,
        span=span,
    )
    tables = "".join(
        _stat(f"table {t}", _fig(b, human_bytes(b), f'stream_knn_table_disk_bytes{{table="{t}"}}'))
        for t, b in sorted(res["tables"].items())
    )
    versions = ", ".join(
        f"{escape(v['index'])} v{v['version']}: {escape(human_bytes(v['bytes']))}"
        for v in res["index_versions"]
    )
    memory = res["index_memory"]
    resource_stats = "".join(
        [
            _stat("CPU", _fig(res["cpu_cores"], _fmt(res["cpu_cores"], "{:.2f} cores"))),
            _stat(
                "resident memory",
                _fig(res["resident_memory_bytes"], human_bytes(res["resident_memory_bytes"])),
            ),
            _stat(
                "open files",
                _fig(res["open_fds"], f"{_fmt(res['open_fds'])} of {_fmt(res['max_fds'])}"),
            ),
            _stat("GC collections", _fig(res["gc_collections"])),
            _stat("replica items", _fig(res["replica_items"], series="stream_knn_items")),
            _stat(
                "replica lag",
                _fig(
                    res["replica_lag"],
                    series="stream_knn_replica_lag" if res["replica_lag"] is not None else None,
                ),
            ),
            _stat(
                "index memory, mapped",
                _fig(memory.get("mapped"), human_bytes(memory.get("mapped"))),
            ),
            _stat(
                "index memory, vectors",
                _fig(memory.get("vectors"), human_bytes(memory.get("vectors"))),
            ),
            tables,
        ]
    )
    out.append(
        _card(
            "Resources",
            f'<div class="stats">{resource_stats}</div>'
            f'<p class="muted">index versions on disk: {versions or "none"}</p>'
            f'<div class="pair">{cpu_chart}{rss_chart}</div>',
            wide=True,
        )
    )

    problem_rows = [
        [
            escape(time.strftime("%H:%M:%S", time.localtime(p["ts"]))),
            f'<span class="badge {"bad" if p["level"] in ("ERROR", "CRITICAL") else "warn"}">'
            f"{escape(p['level'])}</span>",
            escape(p["logger"]),
            escape(p["message"][:300]),
        ]
        for p in reversed(status["problems"][-8:])
    ]
    out.append(
        _card(
            "Recent warnings and errors",
            _table(["time", "level", "logger", "message"], problem_rows, "none since start"),
            wide=True,
        )
    )
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return (
        f'{badges}<div class="grid" data-time="{now:.3f}">{"".join(out)}</div>'
        f'<p class="muted">as of {stamp}</p>'
    )


def render_page(status: dict[str, Any], history: MetricHistory, max_k: int) -> str:
    """The whole page: header, the "try it" form, the panels, the shipped CSS and script."""
    w = status["worker"]
    title = f"stream-knn · {w['app_id']}"
    form = (
        '<section class="card try" id="try"><h2>Try it</h2>'
        '<form id="try-user"><label>user id <input name="id" id="user-id" required></label>'
        f'<label>k <input name="k" type="number" min="1" max="{max_k}" value="10"></label>'
        "<button>recommend</button></form>"
        '<form id="try-item"><label>item id <input name="id" id="item-id" required></label>'
        f'<label>k <input name="k" type="number" min="1" max="{max_k}" value="10"></label>'
        "<button>neighbours</button></form>"
        '<div id="try-result" class="muted">the list the worker would send now, with scores '
        "(<code>/recommendations/{user}</code>), or an item's neighbours "
        "(<code>/similar/{item}</code>)</div></section>"
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_static('dashboard.css')}</style>"
        f"<noscript><meta http-equiv=refresh content={REFRESH_SECONDS}></noscript></head>"
        f'<body data-refresh="{REFRESH_SECONDS}"><header><h1>stream-knn</h1>'
        f'<span class="muted">{escape(w["app_id"])} · {escape(w["url"])} · pid {w["pid"]} · '
        f'v{escape(w["version"])} · <a href="/metrics">/metrics</a> · <a href="/status">/status</a>'
        f' · <a href="/index">/index</a></span>'
        '<span id="refreshed" class="muted"></span></header>'
        f'<main>{form}<div id="panels">{render_panels(status, history)}</div></main>'
        f"<script>{_static('dashboard.js')}</script></body></html>"
    )
