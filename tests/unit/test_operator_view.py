"""The operator's view without a broker: the ring of samples, disk sizes, recent problems,
the status text, the dashboard's HTML and finding a group's members over HTTP."""

from __future__ import annotations

import http.server
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stream_knn.logs import RecentProblems
from stream_knn.metrics.history import (
    MetricHistory,
    histogram_quantile,
    read_registry,
    series_key,
)
from stream_knn.metrics.registry import Metrics
from stream_knn.metrics.resources import dir_bytes, index_version_sizes, table_sizes
from stream_knn.worker.app import history_sample
from stream_knn.worker.dashboard import line_chart, render_page, render_panels
from stream_knn.worker.status import fetch_statuses, format_status, human_bytes, human_seconds

INF = math.inf


def test_histogram_quantile_interpolates_like_promql() -> None:
    bounds = [0.01, 0.02, 0.05, INF]
    assert histogram_quantile(0.5, bounds, [0, 10, 10, 10]) == pytest.approx(0.015)
    assert histogram_quantile(1.0, bounds, [0, 10, 10, 10]) == pytest.approx(0.02)
    # Ranks in the +Inf bucket give the highest finite bound.
    assert histogram_quantile(0.99, bounds, [5, 5, 5, 10]) == 0.05
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert histogram_quantile(0.5, bounds, []) is None


def test_history_rates_and_quantiles_from_differences() -> None:
    history = MetricHistory([0.01, 0.1, INF], max_samples=100)
    for second in range(0, 21, 2):
        # 50 events/s; every observation in the first bucket until t=10, then the second.
        early = min(second, 10) * 5.0
        late = max(0, second - 10) * 5.0
        history.record(
            1000.0 + second, {"events": 50.0 * second}, [early, early + late, early + late]
        )
    assert history.rate("events", 10) == pytest.approx(50.0)
    series = history.rate_series("events", 10)
    assert [v for _, v in series] == pytest.approx([50.0] * len(series))
    assert series[-1][0] == 1020.0
    # The last 10 s only saw the second bucket; the whole 20 s half and half.
    assert history.quantile(0.5, 10) == pytest.approx(0.01 + 0.09 * 0.5)
    assert history.quantile(0.5, 20) == pytest.approx(0.01)
    assert history.quantile_series(0.99, 4)[-1][1] == pytest.approx(0.01 + 0.09 * 0.99)


def test_history_counts_a_reset_counter_from_zero_and_keeps_its_bound() -> None:
    history = MetricHistory([INF], max_samples=3)
    history.record(0.0, {"events": 100.0}, [0.0])
    history.record(10.0, {"events": 20.0}, [0.0])  # the process restarted
    assert history.rate("events", 10) == pytest.approx(2.0)
    for t in (20.0, 30.0, 40.0):
        history.record(t, {"events": 20.0 + t}, [0.0])
    assert len(history.samples) == 3
    assert history.value_series("events") == [(20.0, 40.0), (30.0, 50.0), (40.0, 60.0)]
    with pytest.raises(ValueError, match="2 bucket counts for 1 bounds"):
        history.record(50.0, {}, [0.0, 1.0])


def test_read_registry_names_series_as_the_exposition_does() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("stream_knn_consumer_lag", "lag", ["topic", "partition"], registry=registry)
    gauge.labels("user-events", "3").set(7)
    snapshot = read_registry(registry)
    key = series_key("stream_knn_consumer_lag", {"topic": "user-events", "partition": "3"})
    assert snapshot[key] == 7.0
    assert f"{key} 7.0" in generate_latest(registry).decode().splitlines()


def test_the_worker_registry_carries_the_resource_series() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = set(read_registry(registry))
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        'python_gc_collections_total{generation="0"}',
        "stream_knn_replica_lag",
        "python_info",
    ):
        assert any(n == name or n.startswith(name + "{") for n in names), name


def test_history_sample_sums_the_dashboard_totals() -> None:
    registry = CollectorRegistry()
    events = Counter("stream_knn_events", "e", ["event_type", "outcome"], registry=registry)
    events.labels("view", "ok").inc(3)
    events.labels("invalid", "dlq").inc(1)
    latency = Histogram(
        "stream_knn_end_to_end_latency_seconds", "l", buckets=(0.01, 0.1), registry=registry
    )
    latency.observe(0.005)
    latency.observe(0.05)
    totals, buckets = history_sample(read_registry(registry))
    assert totals["events"] == 4.0 and totals["lists"] == 0.0
    assert buckets == [1.0, 2.0, 2.0]


def test_disk_sizes_per_table_and_index_version(tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    for name, size in (("user-profiles-0.db", 100), ("user-profiles-3.db", 50), ("items-1.db", 7)):
        (tables / name).mkdir(parents=True)
        (tables / name / "000001.sst").write_bytes(b"x" * size)
    (tables / "user-profiles-extra").mkdir()  # not a partition database
    (tables / "user-profiles-extra" / "f").write_bytes(b"x" * 1000)
    assert table_sizes(tables, ["user-profiles", "items", "absent"]) == {
        "user-profiles": 150,
        "items": 7,
        "absent": 0,
    }
    index = tmp_path / "index"
    for version, size in ((1, 10), (2, 20)):
        (index / f"v{version:06d}").mkdir(parents=True)
        (index / f"v{version:06d}" / "index.ann").write_bytes(b"x" * size)
    (index / ".v000003.tmp").mkdir()  # a build being written
    sizes = index_version_sizes([index, tmp_path / "missing"])
    assert [(s.index, s.version, s.bytes) for s in sizes] == [("index", 1, 10), ("index", 2, 20)]
    assert dir_bytes(tmp_path / "missing") == 0


def test_recent_problems_keep_the_last_warnings_of_our_loggers() -> None:
    problems = RecentProblems(size=2).attach()
    try:
        log = logging.getLogger("stream_knn.test")
        log.info("not kept")
        for n in range(3):
            log.warning("drift %d above threshold", n)
        logging.getLogger("elsewhere").error("not ours")
    finally:
        problems.detach()
    assert [r["message"] for r in problems.records] == [
        "drift 1 above threshold",
        "drift 2 above threshold",
    ]
    assert problems.records[0]["level"] == "WARNING"


def _status(url: str, members: list[str], app_id: str = "stream-knn") -> dict[str, Any]:
    return {
        "worker": {
            "app_id": app_id,
            "url": url,
            "pid": 42,
            "version": "0.1.0",
            "uptime_seconds": 75.0,
            "time": 1_800_000_000.0,
        },
        "health": {
            "ok": True,
            "status": "ok",
            "broker_unreachable_seconds": 0.5,
            "broker_timeout_seconds": 30.0,
        },
        "ready": {"ready": True, "reason": "serving"},
        "members": members,
        "partitions": [
            {"topic": "user-events", "partition": 0, "lag": 12.0, "lag_seconds": 0.4},
            {"topic": "user-events", "partition": 2, "lag": 0.0, "lag_seconds": 0.0},
        ],
        "rates": {
            "window_seconds": 10.0,
            "events_per_second": 500.0,
            "lists_per_second": 499.5,
            "dlq_per_second": 0.0,
        },
        "totals": {"events": 123456.0, "lists": 123400.0, "dlq": 3.0},
        "latency": {
            "window_seconds": 60.0,
            "target_p99_seconds": 0.05,
            "p50": 0.004,
            "p95": 0.011,
            "p99": 0.019,
        },
        "indexes": [
            {
                "backend": "auto",
                "metric": "angular",
                "n_trees": 10,
                "search_k": -1,
                "directory": "index",
                "version": 7,
                "age_seconds": 12.0,
                "items": 5000,
                "pending_items": 31,
                "last_build_seconds": 0.12,
                "sampled_recall": 0.99,
                "build_errors": 0,
                "pinned": None,
            }
        ],
        "drift": [
            {
                "name": "item_cosine_shift",
                "series": 'stream_knn_embedding_drift{kind="item_cosine_shift"}',
                "value": 0.35,
                "threshold": 0.2,
                "above": True,
            },
            {
                "name": "event_type",
                "series": 'stream_knn_input_drift{distribution="event_type"}',
                "value": None,
                "threshold": 0.02,
                "above": False,
            },
        ],
        "variants": [
            {
                "name": "control",
                "share": 1.0,
                "k": 10,
                "index": "auto-angular-10--1",
                "online_hit_rate": 0.12,
                "lists": 123400.0,
            }
        ],
        "tuning": {"served": "rank5", "hit_rates": {"rank5": 0.1, "rank2": 0.09}},
        "resources": {
            "cpu_cores": 0.8,
            "cpu_seconds": 100.0,
            "resident_memory_bytes": 300 * 2**20,
            "open_fds": 120.0,
            "max_fds": 1024.0,
            "gc_collections": 50.0,
            "tables": {"user-profiles": 2.5 * 2**20},
            "index_versions": [{"index": "index", "version": 7, "bytes": 2**20}],
            "index_memory": {"mapped": 2**20, "vectors": 2**19},
            "replica_items": 5000.0,
            "replica_lag": 0.0,
        },
        "problems": [
            {
                "ts": 1_800_000_000.0,
                "level": "WARNING",
                "logger": "stream_knn.serving.service",
                "message": "drift above threshold <script>alert(1)</script>",
            }
        ],
    }


def test_status_text_fits_one_screen_and_says_what_matters() -> None:
    text = format_status(
        [_status("http://a:6066", ["http://a:6066", "http://b:6066"])],
        [("http://b:6066", "connection refused")],
    )
    lines = text.splitlines()
    assert len(lines) <= 25 and max(len(line) for line in lines) <= 130, text
    assert lines[0].startswith("GROUP stream-knn: 1 of 2 members answered")
    assert "total lag 12" in lines[0]
    assert any(line.split()[:3] == ["user-events", "0,2", "12"] for line in lines), text
    assert "p99 19.0 ms" in text
    assert "WARNING item_cosine_shift 0.350 > 0.2" in text
    assert "index auto/angular v7" in text and "pending 31" in text
    assert "WORKER http://b:6066  UNREACHABLE: connection refused" in text
    assert human_bytes(1536) == "1.5 KiB" and human_seconds(75) == "1m15s"


def test_dashboard_html_shows_figures_with_their_series_and_escapes_text() -> None:
    history = MetricHistory([0.01, INF], max_samples=10)
    for n in range(6):
        history.record(1_800_000_000.0 - 10 + 2 * n, {"events": 100.0 * n}, [5.0 * n, 5.0 * n])
    status = _status("http://a:6066", ["http://a:6066"])
    panels = render_panels(status, history)
    assert "<script>alert(1)</script>" not in panels
    assert "&lt;script&gt;" in panels
    assert 'data-series="stream_knn_events_total" data-value="123456.0">123,456<' in panels
    lag = series_key("stream_knn_consumer_lag", {"topic": "user-events", "partition": "0"})
    assert f'data-series="{lag.replace(chr(34), "&quot;")}" data-value="12.0"' in panels
    assert 'data-chart="throughput" data-points="10"' in panels
    page = render_page(status, history, max_k=100)
    assert page.startswith("<!doctype html>")
    assert (
        'id="try-user"' in page
        and "/dashboard/panels" in page
        and "http" not in page.split("<script>", 1)[1].split("fetch(", 1)[0]
    )


def test_a_chart_draws_its_threshold_and_scales_to_it() -> None:
    svg = line_chart(
        "latency",
        [("p99", [(100.0, 0.01), (102.0, 0.02)])],
        now=102.0,
        unit=lambda v: f"{v * 1000:.0f} ms",
        threshold=("target", 0.05),
        span=60.0,
    )
    assert 'class="threshold"' in svg and ">50 ms<" in svg and "polyline" in svg


@pytest.fixture
def two_workers() -> Iterator[list[str]]:
    """Two HTTP servers answering ``/status`` like workers of one group."""
    servers = []
    urls: list[str] = []

    def handler(own: int) -> type[http.server.BaseHTTPRequestHandler]:
        class Status(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = orjson.dumps(_status(urls[own], list(urls)))
                self.send_response(200 if self.path == "/status" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Status

    for own in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(own))
        servers.append(server)
        urls.append(f"http://127.0.0.1:{server.server_address[1]}")
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield urls
    for server in servers:
        server.shutdown()
        server.server_close()


def test_status_finds_the_other_members_through_one_worker(two_workers: list[str]) -> None:
    answers, failed = fetch_statuses([two_workers[1] + "/"])
    assert [a["worker"]["url"] for a in answers] == sorted(two_workers)
    assert failed == []
    only, _ = fetch_statuses([two_workers[1]], follow_members=False)
    assert [a["worker"]["url"] for a in only] == [two_workers[1]]
    _, refused = fetch_statuses(["http://127.0.0.1:9"], timeout=2.0)
    assert refused and refused[0][0] == "http://127.0.0.1:9"
