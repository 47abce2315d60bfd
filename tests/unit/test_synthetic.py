"""The synthetic stream: deterministic, planted clusters, disjoint shifted tastes."""

from __future__ import annotations

from collections import Counter

import pytest

from stream_knn.errors import ConfigError
from stream_knn.events.synthetic import EVENT_TYPE_MIX, SyntheticStream


def test_same_seed_same_events_and_prefix_stable() -> None:
    a = list(SyntheticStream(seed=7).events(1000))
    b = list(SyntheticStream(seed=7).events(1000))
    assert a == b
    assert list(SyntheticStream(seed=7).events(10)) == a[:10]
    assert list(SyntheticStream(seed=8).events(1000)) != a


def test_event_shape_and_time_order() -> None:
    s = SyntheticStream(n_users=5, n_items=30, n_clusters=3, start_ms=1000, step_ms=7)
    events = list(s.events(100))
    assert len(events) == 100
    assert [e["ts"] for e in events] == [1000 + 7 * j for j in range(100)]
    assert len({e["event_id"] for e in events}) == 100
    for e in events:
        assert set(e) == {"user_id", "item_id", "event_type", "ts", "event_id"}
        assert e["user_id"] in {f"u{u}" for u in range(5)}
        assert e["item_id"] in {f"i{k}" for k in range(30)}
        assert e["event_type"] in {"view", "click", "add_to_cart", "purchase"}


def test_cluster_of_is_k_mod_clusters() -> None:
    s = SyntheticStream(n_items=100, n_clusters=10)
    assert s.cluster_of("i0") == 0
    assert s.cluster_of("i37") == 7
    assert s.cluster_of("i99") == 9
    with pytest.raises(ConfigError, match="not a synthetic id"):
        s.cluster_of("i100")
    with pytest.raises(ConfigError, match="not a synthetic id"):
        s.cluster_of("x3")


def test_without_noise_every_event_is_in_the_users_tastes() -> None:
    s = SyntheticStream(n_users=50, n_items=200, n_clusters=8, clusters_per_user=2, noise=0.0)
    for e in s.events(5000):
        assert s.cluster_of(e["item_id"]) in s.tastes(e["user_id"])


def test_noise_events_are_outside_tastes_at_the_configured_share() -> None:
    s = SyntheticStream(n_users=100, n_items=500, n_clusters=10, noise=0.2, seed=3)
    outside = sum(
        s.cluster_of(e["item_id"]) not in s.tastes(e["user_id"]) for e in s.events(20_000)
    )
    assert 0.18 < outside / 20_000 < 0.22


def test_shift_moves_every_user_to_disjoint_clusters() -> None:
    s = SyntheticStream(
        n_users=40, n_items=100, n_clusters=10, clusters_per_user=3, shift_at=2000, noise=0.0
    )
    for u in range(40):
        before, after = s.tastes(f"u{u}"), s.tastes(f"u{u}", shifted=True)
        assert len(before) == len(after) == 3
        assert not set(before) & set(after)
    events = list(s.events(4000))
    for e in events[:2000]:
        assert s.cluster_of(e["item_id"]) in s.tastes(e["user_id"])
    for e in events[2000:]:
        assert s.cluster_of(e["item_id"]) in s.tastes(e["user_id"], shifted=True)


def test_noise_after_shift_avoids_shifted_tastes() -> None:
    s = SyntheticStream(
        n_users=20, n_items=100, n_clusters=6, clusters_per_user=2, shift_at=0, noise=1.0
    )
    for e in s.events(2000):
        assert s.cluster_of(e["item_id"]) not in s.tastes(e["user_id"], shifted=True)


def test_every_item_of_a_cluster_is_reachable() -> None:
    s = SyntheticStream(n_users=1, n_items=13, n_clusters=4, clusters_per_user=4, noise=0.0)
    assert {e["item_id"] for e in s.events(3000)} == {f"i{k}" for k in range(13)}


def test_event_type_mix() -> None:
    counts = Counter(e["event_type"] for e in SyntheticStream(seed=1).events(50_000))
    for name, share in EVENT_TYPE_MIX:
        assert abs(counts[name] / 50_000 - share) < 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_users": 0},
        {"n_items": 5, "n_clusters": 10},
        {"clusters_per_user": 0},
        {"n_clusters": 4, "clusters_per_user": 3, "shift_at": 10},
        {"noise": 1.5},
        {"n_clusters": 2, "clusters_per_user": 2, "noise": 0.1},
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, int | float]) -> None:
    with pytest.raises(ConfigError):
        SyntheticStream(**kwargs)  # type: ignore[arg-type]
