"""The worker's dashboard page, as a person sees it: headless Chromium opens ``/`` of a worker
that is fed events, waits for the charts to fill, tries the "try it" form, saves a
screenshot, and checks that every figure the page shows beside a metric equals ``/metrics``.

The screenshot is saved under the test's output directory; with
``STREAM_KNN_DASHBOARD_SCREENSHOT=docs/dashboard.png`` it is copied there too (that is how
the README's picture is made).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import orjson
import pytest

from stream_knn.events.synthetic import SyntheticStream
from tests.integration.conftest import Feeder, WorkerEnv
from tests.integration.headless import Chromium

pytestmark = [pytest.mark.integration, pytest.mark.browser]

_EVENTS = 9_000
_RATE = 150  # events/s: a minute of input
#: Chart points to wait for: a sample every 2 s, so about 30 s of history in each chart.
_POINTS = 15


def _exposition(env: WorkerEnv) -> dict[str, float]:
    status, text = env.get("/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def _expected(exposition: dict[str, float], series: str) -> float | None:
    """The value of a series; for a bare family name, the sum of its series (totals)."""
    if "{" in series:
        return exposition.get(series)
    found = [v for s, v in exposition.items() if s == series or s.startswith(series + "{")]
    return sum(found) if found else None


_FIGURES_JS = """
Array.from(document.querySelectorAll('#panels [data-series]')).map(e => ({
  series: e.dataset.series, value: e.dataset.value, text: e.textContent.trim()
}))
"""


def _mismatches(figures: list[dict[str, str]], exposition: dict[str, float]) -> list[str]:
    bad = []
    for figure in figures:
        expected = _expected(exposition, figure["series"])
        shown = float(figure["value"]) if figure["value"] else None
        if expected != shown:
            bad.append(f"{figure['series']}: page {shown} ({figure['text']}), /metrics {expected}")
    return bad


def test_dashboard_page_in_a_browser(
    worker_env: WorkerEnv, run_worker, require_tool, tmp_path: Path
) -> None:
    chromium = require_tool("chromium")
    # Input drift needs closed windows: small ones, so a minute of input closes several.
    worker_env.extra["STREAM_KNN_DRIFT__WINDOW_EVENTS"] = "1000"
    run_worker()
    stream = SyntheticStream(n_users=300, n_items=400, n_clusters=6, seed=5)
    events = list(stream.events(_EVENTS))
    records = [(e["user_id"].encode(), orjson.dumps(e)) for e in events]
    records.append((b"u-bad", b"{not json"))  # one dead letter, shown on the page
    feeder = Feeder(worker_env.bootstrap, worker_env.topics["user_events"], records, _RATE)
    feeder.start()

    browser = Chromium(chromium, tmp_path / "chromium")
    try:
        browser.open(worker_env.url("/"))
        assert "stream-knn" in browser.evaluate("document.title")
        # The page refreshes itself; the charts fill as the ring of samples grows.
        browser.wait_for("Number(document.body.dataset.refreshes || 0) >= 1", timeout=60)
        for chart in ("throughput", "latency", "resources", "memory"):
            browser.wait_for(
                f"Number(document.querySelector('svg[data-chart=\"{chart}\"]')"
                f"?.dataset.points || 0) >= {_POINTS}",
                timeout=180,
            )
        assert browser.evaluate("document.getElementById('health').textContent") == "health: ok"
        assert browser.evaluate("document.getElementById('ready').textContent") == "ready: yes"
        # Some latency was drawn (three percentile lines) and input was counted.
        assert (
            browser.evaluate("document.querySelectorAll('svg[data-chart=latency] polyline').length")
            == 3
        )

        # "Try it": a user with history gets a full list with scores, as the worker would send.
        user = events[0]["user_id"]
        browser.evaluate(
            f"document.getElementById('user-id').value = {orjson.dumps(user).decode()};"
            "document.querySelector('#try-user button').click(); true"
        )
        rows = browser.wait_for(
            "Array.from(document.querySelectorAll('#try-list .try-item'))"
            ".map(r => Array.from(r.cells).map(c => c.textContent))",
            timeout=30,
        )
        assert len(rows) == 10, rows
        scores = [float(score) for _, _, score in rows]
        assert scores == sorted(scores, reverse=True)
        assert len({item for _, item, _ in rows}) == 10
        assert browser.evaluate("document.querySelector('#try-result p').textContent").startswith(
            f"list for user {user}"
        )
        # ... and an item gets its neighbours.
        item = events[0]["item_id"]
        browser.evaluate(
            f"document.getElementById('item-id').value = {orjson.dumps(item).decode()};"
            "document.querySelector('#try-item button').click(); true"
        )
        browser.wait_for(
            "document.querySelector('#try-result p')?.textContent.startsWith("
            f"{orjson.dumps('neighbours of item ' + item).decode()})",
            timeout=30,
        )
        neighbours = browser.evaluate(
            "Array.from(document.querySelectorAll('#try-list .try-item')).map(r => r.cells[1].textContent)"
        )
        assert len(neighbours) == 10 and item not in neighbours
        # The try-it answer outlives the panels' refresh (it sits outside them).
        refreshes = browser.evaluate("Number(document.body.dataset.refreshes)")
        browser.wait_for(f"Number(document.body.dataset.refreshes) > {refreshes}", timeout=30)
        assert browser.evaluate("document.querySelectorAll('#try-list .try-item').length") == 10

        shot = browser.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 20_000
        target = os.environ.get("STREAM_KNN_DASHBOARD_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)

        # Once the input is consumed, the figures on the page are those of /metrics.
        feeder.join(timeout=300)
        assert not feeder.is_alive() and not feeder.errors, feeder.errors
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            totals = _exposition(worker_env)
            done = _expected(totals, "stream_knn_events_total") == len(records)
            if done and _expected(totals, "stream_knn_replica_lag") == 0.0:
                break
            time.sleep(0.5)
        assert _expected(_exposition(worker_env), "stream_knn_events_total") == len(records)

        mismatches: list[str] = ["not compared yet"]
        figures: list[dict[str, str]] = []
        deadline = time.monotonic() + 120
        while mismatches and time.monotonic() < deadline:
            # A gauge may move between the page and the scrape (a build, a disk walk):
            # look again until one page and the scrape after it agree.
            browser.open(worker_env.url("/"))
            figures = browser.evaluate(_FIGURES_JS)
            mismatches = _mismatches(figures, _exposition(worker_env))
        assert not mismatches, mismatches
        shown = {f["series"] for f in figures}
        for series in (
            "stream_knn_events_total",
            "stream_knn_recommendations_total",
            "stream_knn_dlq_total",
            "stream_knn_index_version",
            "stream_knn_index_items",
            "stream_knn_index_pending_items",
            "stream_knn_items",
            "stream_knn_replica_lag",
            'stream_knn_online_hit_rate{variant="control"}',
            'stream_knn_table_disk_bytes{table="user-profiles"}',
            "stream_knn_neighbour_drift",
            'stream_knn_input_drift{distribution="event_type"}',
        ):
            assert series in shown, f"{series} not on the page; shown: {sorted(shown)}"
        lag_rows = [s for s in shown if s.startswith("stream_knn_consumer_lag{")]
        assert len(lag_rows) == 12  # 3 input topics x 4 partitions, one worker
        figure = {f["series"]: f for f in figures}
        assert figure["stream_knn_events_total"]["text"] == f"{len(records):,}"
    finally:
        browser.close()
