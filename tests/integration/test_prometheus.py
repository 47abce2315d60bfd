"""A real Prometheus server scrapes a running worker; the exposition passes promtool; every
query of the Grafana dashboard returns data from a worker under load."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from stream_knn.events.synthetic import SyntheticStream
from tests.integration.conftest import Feeder, WorkerEnv

pytestmark = [pytest.mark.integration, pytest.mark.prometheus]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/stream-knn.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(exposition: str, name: str) -> dict[str, float]:
    out = {}
    for line in exposition.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = orjson.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _events(stream: SyntheticStream, n: int, skip: int = 0) -> list[tuple[bytes, bytes]]:
    events = list(stream.events(skip + n))[skip:]
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


@contextlib.contextmanager
def _prometheus(binary: str, web_port: int, tmp_path: Path) -> Iterator[int]:
    """A Prometheus scraping the worker every second; yields its port once it answers."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: stream-knn\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{web_port}']\n"
    )
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        up: list[dict] = []
        while time.monotonic() < deadline and not up:
            with contextlib.suppress(OSError):
                up = _query(port, 'up{job="stream-knn"} == 1')
            if not up:
                time.sleep(0.5)
        assert up, (tmp_path / "prometheus.log").read_text()[-2000:]
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def _panel_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the Grafana dashboard."""
    out = []
    for top in json.loads(DASHBOARD.read_text())["panels"]:
        for panel in (top, *top.get("panels", [])):  # collapsed rows nest their panels
            out.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))
    return out


def test_every_grafana_panel_returns_data(
    worker_env: WorkerEnv, run_worker, require_tool, tmp_path: Path
):
    prometheus = require_tool("prometheus")
    queries = _panel_queries()
    assert len(queries) >= 38
    # Input drift compares closed windows: small ones, so the load closes several.
    worker_env.extra["STREAM_KNN_DRIFT__WINDOW_EVENTS"] = "1000"
    run_worker()
    stream = SyntheticStream(n_users=300, n_items=400, n_clusters=6, seed=7)
    # A dead letter, then two minutes of load at 150 events/s while the panels are queried.
    records = [(b"u-bad", b"{not json"), *_events(stream, 18_000)]
    feeder = Feeder(worker_env.bootstrap, worker_env.topics["user_events"], records, 150)
    feeder.start()
    try:
        with _prometheus(prometheus, worker_env.web_port, tmp_path) as port:
            empty = queries
            deadline = time.monotonic() + 240
            while empty and time.monotonic() < deadline:
                empty = [(title, expr) for title, expr in empty if not _query(port, expr)]
                if empty:
                    time.sleep(1.0)
            assert not empty, "panels without data:\n" + "\n".join(
                f"  {title}: {expr}" for title, expr in empty
            )
    finally:
        feeder.stop()
        feeder.join(timeout=60)
    assert not feeder.errors, feeder.errors


def test_prometheus_scrapes_series_that_move(worker_env, run_worker, require_tool, tmp_path: Path):
    prometheus = require_tool("prometheus")
    promtool = require_tool("promtool")
    stream = SyntheticStream(n_users=40, n_items=80, n_clusters=4, seed=11)
    run_worker()
    worker_env.produce("user_events", _events(stream, 200))
    worker_env.produce("user_events", [(b"u1", b"{broken")])
    assert len(worker_env.consume("recommendations", expected=200)) == 200

    with _prometheus(prometheus, worker_env.web_port, tmp_path) as port:
        deadline = time.monotonic() + 60
        first: list[dict] = []
        while time.monotonic() < deadline and not first:
            with contextlib.suppress(OSError):
                first = _query(port, 'sum(stream_knn_events_total{outcome="ok"})')
            time.sleep(0.5)
        assert first, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(first[0]["value"][1]) == 200.0
        for name in (
            "stream_knn_dlq_total",
            "stream_knn_recommendations_total",
            "stream_knn_end_to_end_latency_seconds_bucket",
            "stream_knn_processing_latency_seconds_count",
            "stream_knn_index_items",
            "stream_knn_cache_hit_ratio",
            "stream_knn_consumer_lag",
            "stream_knn_tuning_served",
        ):
            assert _query(port, name), f"{name} not scraped"
        assert _query(port, 'stream_knn_dlq_total{reason="not_json"}')[0]["value"][1] == "1"

        # More events: the scraped counters move.
        worker_env.produce("user_events", _events(stream, 100, skip=200))
        deadline = time.monotonic() + 60
        moved = 0.0
        while time.monotonic() < deadline and moved != 300.0:
            result = _query(port, 'sum(stream_knn_events_total{outcome="ok"})')
            moved = float(result[0]["value"][1]) if result else 0.0
            time.sleep(0.5)
        assert moved == 300.0

    status, exposition = worker_env.get("/metrics")
    assert status == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=exposition.encode(), capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    # Every emitted recommendation observed its end-to-end latency exactly once.
    count = _samples(exposition, "stream_knn_end_to_end_latency_seconds_count")
    emitted = _samples(exposition, "stream_knn_recommendations_total")
    event_emissions = sum(v for k, v in emitted.items() if 'trigger="event"' in k)
    assert sum(count.values()) == event_emissions == 300.0
    # Self-tuning is on by default and serves the configured query setting first.
    served = _samples(exposition, "stream_knn_tuning_served")
    assert served['stream_knn_tuning_served{setting="rank5"}'] == 1.0
    assert sum(served.values()) == 1.0
