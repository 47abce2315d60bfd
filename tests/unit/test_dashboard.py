"""The Grafana dashboard queries only metrics the worker exports, through the provisioned source."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from prometheus_client import CollectorRegistry

from stream_knn.metrics.drift import DriftThresholds
from stream_knn.metrics.registry import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "stream-knn.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Metric families the dashboard may query, with their Prometheus type.
METRICS = {
    "stream_knn_events_total": "counter",
    "stream_knn_dlq_total": "counter",
    "stream_knn_recommendations_total": "counter",
    "stream_knn_end_to_end_latency_seconds": "histogram",
    "stream_knn_processing_latency_seconds": "histogram",
    "stream_knn_index_build_seconds": "histogram",
    "stream_knn_index_version": "gauge",
    "stream_knn_index_items": "gauge",
    "stream_knn_index_age_seconds": "gauge",
    "stream_knn_index_pending_items": "gauge",
    "stream_knn_ann_recall": "gauge",
    "stream_knn_cache_hit_ratio": "gauge",
    "stream_knn_consumer_lag": "gauge",
    "stream_knn_online_hit_rate": "gauge",
    "stream_knn_embedding_drift": "gauge",
    "stream_knn_neighbour_drift": "gauge",
    "stream_knn_input_drift": "gauge",
    "stream_knn_tuning_hit_rate": "gauge",
    "stream_knn_tuning_served": "gauge",
    "stream_knn_tuning_switches_total": "counter",
    "stream_knn_consumer_lag_seconds": "gauge",
    "stream_knn_items": "gauge",
    "stream_knn_replica_lag": "gauge",
    "stream_knn_table_disk_bytes": "gauge",
    "stream_knn_index_disk_bytes": "gauge",
    "stream_knn_index_memory_bytes": "gauge",
    # prometheus-client's process and GC collectors, on the worker's registry.
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "python_gc_collections_total": "counter",
}
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
ALLOWED = {
    name + suffix
    for name, kind in METRICS.items()
    for suffix in (_HISTOGRAM_SERIES if kind == "histogram" else ("",))
}


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels() -> list[dict[str, Any]]:
    out = []
    for panel in _dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows nest their panels
    return out


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    # Drop label matchers and strings first: label values such as "centroid_shift" are no names.
    bare = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(?:stream_knn|process|python)_[a-z0-9_]+\b", bare))


def _provisioned_uid() -> str:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert len(prometheus) == 1
    uid: str = prometheus[0]["uid"]
    return uid


def test_dashboard_is_valid_json_with_a_recent_schema() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "stream-knn"
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"


def test_every_query_uses_only_known_metrics() -> None:
    exprs = _exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"query {expr!r} reads no metric of the worker"
        unknown = names - ALLOWED
        assert not unknown, f"query {expr!r} reads unknown metrics {sorted(unknown)}"
        # A histogram is only ever read through its series, never by its bare family name.
        assert not names & {n for n, k in METRICS.items() if k == "histogram"}, expr


def test_every_listed_metric_has_a_panel() -> None:
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in _exprs() for n in _metric_names(e)}
    assert used == set(METRICS)


def test_the_known_metrics_are_the_ones_the_worker_registers() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported[name] = family.type
    missing = {n: k for n, k in METRICS.items() if exported.get(n) != k}
    assert not missing, f"the dashboard expects {missing}; the worker exports {exported}"


def test_panels_and_queries_use_the_provisioned_datasource() -> None:
    uid = _provisioned_uid()
    for panel in _panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]


def _threshold_lines() -> dict[str, list[float]]:
    """Threshold values drawn as lines, by the metric (and label value) of the panel."""
    out: dict[str, list[float]] = {}
    for panel in _panels():
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") != "line":
            continue
        for target in panel["targets"]:
            label = re.search(r'(?:kind|distribution)="([a-z_]+)"', target["expr"])
            metric = re.sub(r"_(bucket|sum|count)$", "", sorted(_metric_names(target["expr"]))[0])
            key = label.group(1) if label else metric
            values = [s["value"] for s in defaults["thresholds"]["steps"] if s["value"] is not None]
            out[key] = values
    return out


def test_drift_panels_draw_the_default_thresholds() -> None:
    lines = _threshold_lines()
    defaults = DriftThresholds()
    expected = {
        "item_cosine_shift": defaults.item_cosine_shift,
        "centroid_shift": defaults.centroid_shift,
        "stream_knn_neighbour_drift": defaults.neighbour_drift,
        "item_popularity": defaults.item_popularity,
        "event_type": defaults.event_type,
    }
    for key, value in expected.items():
        assert lines.get(key) == [value], (
            f"{key}: dashboard draws {lines.get(key)}, default {value}"
        )
    assert lines["stream_knn_end_to_end_latency_seconds"] == [0.05]


def test_drift_alerts_use_the_default_thresholds() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    text = " ".join(" ".join(r["expr"].split()) for r in rules)
    defaults = dataclasses.asdict(DriftThresholds())
    patterns = {
        "item_cosine_shift": r'kind="item_cosine_shift"\} > ([0-9.]+)',
        "centroid_shift": r'kind="centroid_shift"\} > ([0-9.]+)',
        "neighbour_drift": r"stream_knn_neighbour_drift > ([0-9.]+)",
        "item_popularity": r'distribution="item_popularity"\}\[\w+\]\) > ([0-9.]+)',
        "event_type": r'distribution="event_type"\}\[\w+\]\) > ([0-9.]+)',
    }
    for name, pattern in patterns.items():
        match = re.search(pattern, text)
        assert match, f"no alert on {name}"
        assert float(match.group(1)) == defaults[name], name
