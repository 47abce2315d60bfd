"""Drift mathematics: exact values on small inputs and the behaviour of the input monitor."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from stream_knn.errors import ConfigError, DimensionError
from stream_knn.events.synthetic import SyntheticStream
from stream_knn.metrics.drift import (
    OTHER,
    DriftThresholds,
    InputDriftMonitor,
    align_counts,
    embedding_drift,
    js_divergence,
    neighbour_drift,
    psi,
)

# --- embedding_drift --------------------------------------------------------------------------


def test_identical_vectors_have_no_drift() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, 8)).astype(np.float32)
    ids = [f"i{k}" for k in range(20)]
    d = embedding_drift(ids, vectors, ids, vectors)
    assert (d.mean_cosine_shift, d.centroid_shift, d.common_items) == (0.0, 0.0, 20)


def test_drift_ignores_scale_and_row_order() -> None:
    old = np.array([[1.0, 2.0], [3.0, -1.0]])
    d = embedding_drift(["a", "b"], old, ["b", "a"], 5.0 * old[::-1])
    assert (d.mean_cosine_shift, d.centroid_shift) == (0.0, 0.0)


def test_orthogonal_moves_in_opposite_directions_shift_items_not_the_centroid() -> None:
    # Every item turns by 90 degrees, but the two swap places: the catalog as a whole stays.
    d = embedding_drift(["a", "b"], [[1, 0], [0, 1]], ["a", "b"], [[0, 1], [1, 0]])
    assert d.mean_cosine_shift == 1.0
    assert d.centroid_shift == 0.0


def test_a_common_rotation_shifts_the_centroid() -> None:
    d = embedding_drift(["a"], [[1.0, 0.0]], ["a"], [[0.0, 3.0]])
    assert (d.mean_cosine_shift, d.centroid_shift) == (1.0, 1.0)
    d = embedding_drift(["a"], [[1.0, 0.0]], ["a"], [[-2.0, 0.0]])
    assert (d.mean_cosine_shift, d.centroid_shift) == (2.0, 2.0)


def test_hand_computed_mixture() -> None:
    # a unchanged (shift 0), b turned by 60 degrees (shift 0.5): mean 0.25.
    c60 = [math.cos(math.pi / 3), math.sin(math.pi / 3)]
    d = embedding_drift(["a", "b"], [[0, 1], [1, 0]], ["a", "b"], [[0.0, 1.0], c60])
    assert d.mean_cosine_shift == pytest.approx(0.25, abs=1e-12)
    old_c = np.array([0.5, 0.5])
    new_c = (np.array([0.0, 1.0]) + np.array(c60)) / 2
    expected = 1 - old_c @ new_c / (np.linalg.norm(old_c) * np.linalg.norm(new_c))
    assert d.centroid_shift == pytest.approx(expected, abs=1e-12)


def test_only_common_items_with_a_direction_count() -> None:
    old_ids, new_ids = ["a", "b", "z"], ["b", "c", "z"]
    old = [[1, 0], [1, 0], [0, 0]]  # z has no direction yet
    new = [[1, 0], [0, 1], [1, 0]]
    d = embedding_drift(old_ids, old, new_ids, new)
    assert (d.mean_cosine_shift, d.centroid_shift, d.common_items) == (0.0, 0.0, 1)


def test_no_common_item_gives_nan() -> None:
    d = embedding_drift(["a"], [[1, 0]], ["b"], [[1, 0]])
    assert d.common_items == 0
    assert math.isnan(d.mean_cosine_shift) and math.isnan(d.centroid_shift)
    empty = embedding_drift([], np.zeros((0, 4)), ["b"], [[1, 0, 0, 0]])
    assert empty.common_items == 0


def test_values_are_keyed_by_threshold_name() -> None:
    d = embedding_drift(["a"], [[1, 0]], ["a"], [[0, 1]])
    assert d.values() == {"item_cosine_shift": 1.0, "centroid_shift": 1.0}
    assert DriftThresholds().crossed(d.values()) == ["centroid_shift", "item_cosine_shift"]


@pytest.mark.parametrize(
    ("old_ids", "old", "new_ids", "new", "message"),
    [
        (["a", "b"], [[1, 0]], ["a"], [[1, 0]], "shape"),
        (["a"], [[1, 0]], ["a"], [[1, 0, 0]], "dimensions"),
        (["a"], [[math.nan, 0]], ["a"], [[1, 0]], "NaN"),
        (["a", "a"], [[1, 0], [0, 1]], ["a"], [[1, 0]], "repeat"),
    ],
)
def test_bad_snapshots_are_rejected(
    old_ids: list[str],
    old: list[list[float]],
    new_ids: list[str],
    new: list[list[float]],
    message: str,
) -> None:
    with pytest.raises(DimensionError, match=message):
        embedding_drift(old_ids, old, new_ids, new)


# --- neighbour_drift --------------------------------------------------------------------------


def test_identical_neighbours_have_no_drift() -> None:
    lists = {"a": ["x", "y", "z"], "b": ["a", "c"]}
    assert neighbour_drift(lists, {"a": ["z", "y", "x"], "b": ["c", "a"]}) == 0.0


def test_disjoint_neighbours_drift_fully() -> None:
    assert neighbour_drift({"a": ["x", "y"]}, {"a": ["p", "q"]}) == 1.0


def test_neighbour_drift_averages_jaccard_over_common_probes() -> None:
    old = {"a": ["x", "y"], "b": ["x", "y", "z", "w"], "only_old": ["x"]}
    new = {"a": ["y", "z"], "b": ["x", "y", "z", "w"], "only_new": ["q"]}
    # a: |{y}| / |{x, y, z}| = 1/3; b: 1; mean 2/3; drift 1/3.
    assert neighbour_drift(old, new) == pytest.approx(1 / 3, abs=1e-12)


def test_neighbour_drift_edge_cases() -> None:
    assert neighbour_drift({"a": []}, {"a": []}) == 0.0
    assert math.isnan(neighbour_drift({"a": ["x"]}, {"b": ["x"]}))


# --- align_counts, psi, js_divergence -----------------------------------------------------------


def test_align_counts_keeps_both_heads_and_folds_the_tail() -> None:
    aligned = align_counts({"x": 5, "y": 2, "z": 1}, {"x": 1, "w": 4, "y": 1}, top=1)
    assert aligned.labels == ("w", "x", OTHER)
    assert aligned.reference.tolist() == [0.0, 5.0, 3.0]
    assert aligned.current.tolist() == [4.0, 1.0, 1.0]


def test_align_counts_without_top_keeps_everything() -> None:
    aligned = align_counts({"b": 1}, {"a": 2})
    assert aligned.labels == ("a", "b", OTHER)
    assert aligned.reference.tolist() == [0.0, 1.0, 0.0]
    assert aligned.current.tolist() == [2.0, 0.0, 0.0]


def test_align_counts_breaks_ties_by_label() -> None:
    aligned = align_counts({"b": 1, "a": 1, "c": 1}, {}, top=2)
    assert aligned.labels == ("a", "b", OTHER)
    assert aligned.reference.tolist() == [1.0, 1.0, 1.0]


def test_psi_hand_computed() -> None:
    # p = (1/2, 1/2), q = (1/4, 3/4)
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi([1, 1], [1, 3]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.274653, abs=1e-6)
    assert psi([2, 6], [1, 3]) == 0.0


def test_psi_floors_empty_bins_at_eps() -> None:
    # p = (1, 0 -> 0.01), q = (1/2, 1/2)
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 0.01) * math.log(0.5 / 0.01)
    assert psi([1, 0], [1, 1], eps=0.01) == pytest.approx(expected, abs=1e-12)


def test_js_divergence_hand_computed() -> None:
    assert js_divergence([1, 0], [0, 1]) == 1.0
    assert js_divergence([1, 1], [5, 5]) == 0.0
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4)
    kl_pm = math.log2(1 / 0.75)
    kl_qm = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    expected = 0.5 * kl_pm + 0.5 * kl_qm
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(expected, abs=1e-12)
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.311278, abs=1e-6)


@pytest.mark.parametrize(
    ("p", "q"), [([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, -1], [1, 1]), ([1, math.inf], [1, 1])]
)
def test_bad_counts_are_rejected(p: list[float], q: list[float]) -> None:
    with pytest.raises(DimensionError):
        js_divergence(p, q)
    with pytest.raises(DimensionError):
        psi(p, q)


# --- DriftThresholds ----------------------------------------------------------------------------


def test_thresholds_defaults_and_crossing() -> None:
    t = DriftThresholds()
    assert (t.item_cosine_shift, t.centroid_shift, t.neighbour_drift) == (0.2, 0.1, 0.5)
    assert (t.item_popularity, t.event_type) == (0.1, 0.02)
    values = {"neighbour_drift": 0.5, "item_popularity": 0.11, "centroid_shift": math.nan}
    # Strictly above crosses; equal does not; NaN (unknown) never does.
    assert t.crossed(values) == ["item_popularity"]
    assert t.crossed({}) == []


def test_thresholds_reject_unknown_names_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="no drift threshold named 'psi'"):
        DriftThresholds().crossed({"psi": 1.0})
    with pytest.raises(ConfigError, match="neighbour_drift"):
        DriftThresholds(neighbour_drift=-0.1)


# --- InputDriftMonitor --------------------------------------------------------------------------


def _run(monitor: InputDriftMonitor, stream: SyntheticStream, n: int) -> list[dict[str, float]]:
    """Values after each closed window (from the second window on)."""
    out = []
    for event in stream.events(n):
        closed = monitor.windows
        monitor.observe(event["item_id"], event["event_type"])
        if monitor.windows != closed and monitor.current():
            out.append(monitor.current())
    return out


def _stream(shift_at: int | None, seed: int) -> SyntheticStream:
    # Two users: a taste shift moves most of the traffic to other clusters' items. (With many
    # users the marginal popularity hardly moves; that is for embedding drift to see.)
    return SyntheticStream(
        n_users=2, n_items=110, n_clusters=10, clusters_per_user=2, shift_at=shift_at, seed=seed
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_stream_stays_below_the_thresholds(seed: int) -> None:
    monitor = InputDriftMonitor(window_events=5_000, top_items=50)
    values = _run(monitor, _stream(None, seed), 30_000)
    assert monitor.windows == 6 and len(values) == 5
    assert max(v["item_popularity"] for v in values) < 0.1 / 5
    assert max(v["event_type"] for v in values) < 0.02 / 5
    assert monitor.crossed() == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_taste_shift_spikes_above_the_threshold_then_the_reference_catches_up(seed: int) -> None:
    monitor = InputDriftMonitor(window_events=5_000, top_items=50)
    values = _run(monitor, _stream(20_000, seed), 30_000)
    items = [v["item_popularity"] for v in values]
    # Windows 2..6; window 5 holds the first shifted events and is compared with window 4.
    assert items[3] > 0.3
    assert max(items[:3] + items[4:]) < 0.1 / 5
    # Event types are drawn from the same mix before and after: no event-type drift.
    assert max(v["event_type"] for v in values) < 0.02 / 5


def test_current_is_empty_until_two_windows_closed_and_then_held() -> None:
    monitor = InputDriftMonitor(window_events=3, top_items=5)
    for item in "aab":
        monitor.observe(item, "view")
    assert monitor.windows == 1 and monitor.current() == {}
    for item in "aba":
        monitor.observe(item, "view")
    assert monitor.current() == {"item_popularity": 0.0, "event_type": 0.0}
    monitor.observe("c", "purchase")  # a partial window changes nothing yet
    assert monitor.current() == {"item_popularity": 0.0, "event_type": 0.0}


def test_event_type_mix_change_is_measured(caplog: pytest.LogCaptureFixture) -> None:
    monitor = InputDriftMonitor(window_events=4, top_items=5)
    monitor.observe_many([("a", "view")] * 4)
    with caplog.at_level(logging.WARNING, logger="stream_knn.metrics.drift"):
        monitor.observe_many([("a", "view"), ("a", "view"), ("a", "click"), ("a", "click")])
    # p = (1, 0), q = (1/2, 1/2): the hand-computed 0.311278 bits.
    assert monitor.current()["event_type"] == pytest.approx(0.311278, abs=1e-6)
    assert monitor.current()["item_popularity"] == 0.0
    assert monitor.crossed() == ["event_type"]
    assert "event_type=0.3113" in caplog.text


def test_monitor_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError):
        InputDriftMonitor(window_events=0)
    with pytest.raises(ConfigError):
        InputDriftMonitor(top_items=0)
