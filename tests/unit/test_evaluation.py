"""Offline replay and evaluation: baselines against brute force, formats, bad input, determinism."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stream_knn.cli import main
from stream_knn.config import Config, EventsConfig
from stream_knn.errors import ConfigError
from stream_knn.evaluation.baselines import ItemKnnBaseline, PopularityBaseline, top_k_indices
from stream_knn.evaluation.replay import evaluate_events, event_weight, replay
from stream_knn.evaluation.scoring import MethodStats
from stream_knn.events.synthetic import SyntheticStream


@dataclass(frozen=True)
class Ev:
    user_id: str
    item_id: str
    event_type: str = "view"
    ts_ms: int = 0
    weight: float | None = None
    rating: float | None = None


def _events(pairs: list[tuple[str, str]]) -> list[Ev]:
    return [Ev(u, i, ts_ms=1_000 * j) for j, (u, i) in enumerate(pairs)]


# -- exact item-kNN ------------------------------------------------------------------------


def test_item_knn_hand_computed_ranking_and_hit_rate() -> None:
    # After the first 7 events: C_aa = C_bb = C_cc = 2, C_dd = 1, C_ab = C_ac = C_bc = 1,
    # C_bd = C_cd = 1, C_ad = 0. u1 has {a, b}: score(c) = 1/2 + 1/2 = 1.0,
    # score(d) = 0 + 1/sqrt(2) = 0.707 -> [c, d].
    events = _events(
        [
            ("u1", "a"),
            ("u1", "b"),
            ("u2", "a"),
            ("u2", "c"),
            ("u3", "b"),
            ("u3", "c"),
            ("u3", "d"),
            ("u1", "d"),
        ]
    )
    knn = ItemKnnBaseline(n_items=4, history_items=50)
    for e in events[:7]:
        knn.learn(e.user_id, e.item_id, 1.0, e.ts_ms)
    assert knn.recommend("u1", 5, 0) == ["c", "d"]
    scores = knn.scores("u1")
    assert scores[2:].tolist() == pytest.approx([1.0, 1 / np.sqrt(2)])

    weights = [1.0] * len(events)
    # Scored (user with history, item new to them), lists at k=2 before each event:
    # #2 u1-b: u1 {a} -> [] (b not yet seen)                        miss (cold item)
    # #4 u2-c: u2 {a} -> [b] (c not yet seen)                       miss (cold item)
    # #6 u3-c: u3 {b} -> [a, c] (cos(b,a) = 1/sqrt(2*2), cos(b,c) = 0)  rank 2
    # #7 u3-d: u3 {b, c} -> [a] (d not yet seen)                    miss (cold item)
    # #8 u1-d: u1 {a, b} -> [c, d]                                  rank 2
    outcome = replay(events, [ItemKnnBaseline(4, 50)], k=2, weights=weights)
    stats = outcome.stats["item_knn"][0]
    assert (outcome.first_events, outcome.cold_item_events) == (3, 3)
    assert stats.n_scored == 5
    assert stats.rank_counts == [3, 0, 2]
    assert stats.result(2, 4).hits == _brute_force_hits(events, weights, k=2, history=50) == 2


def _brute_force_scores(
    events: list[Ev], weights: list[float], upto: int, user: str, history: int
) -> dict[str, float]:
    """Item-kNN scores from scratch: W from events[:upto], C = W^T W, cosine, window sum."""
    items = list(dict.fromkeys(e.item_id for e in events[:upto]))
    users = list(dict.fromkeys(e.user_id for e in events[:upto]))
    w = np.zeros((len(users), len(items)))
    order: dict[str, list[str]] = {}
    for e, wt in zip(events[:upto], weights[:upto], strict=True):
        w[users.index(e.user_id), items.index(e.item_id)] += wt
        seq = order.setdefault(e.user_id, [])
        if e.item_id in seq:
            seq.remove(e.item_id)
        seq.append(e.item_id)
    c = w.T @ w
    norms = np.sqrt(np.diag(c))
    cos = c / np.outer(norms, norms)
    recent = order[user][-history:]
    seen = set(order[user])
    return {
        it: float(sum(cos[items.index(h), j] for h in recent))
        for j, it in enumerate(items)
        if it not in seen
    }


def _brute_force_ranking(scores: dict[str, float], k: int, items: list[str]) -> list[str]:
    return sorted(scores, key=lambda it: (-scores[it], items.index(it)))[:k]


def _brute_force_hits(events: list[Ev], weights: list[float], k: int, history: int) -> int:
    hits = 0
    for j, e in enumerate(events):
        prior = [p for p in events[:j] if p.user_id == e.user_id]
        if not prior or e.item_id in {p.item_id for p in prior}:
            continue
        items = list(dict.fromkeys(p.item_id for p in events[:j]))
        scores = _brute_force_scores(events, weights, j, e.user_id, history)
        hits += e.item_id in _brute_force_ranking(scores, k, items)
    return hits


def test_item_knn_matches_brute_force_on_random_weighted_stream() -> None:
    rng = np.random.default_rng(5)
    events = [Ev(f"u{rng.integers(6)}", f"i{rng.integers(9)}", ts_ms=j) for j in range(70)]
    weights = [float(x) for x in rng.choice([0.5, 1.0, 2.0, 3.5], size=len(events))]
    history = 3
    knn = ItemKnnBaseline(n_items=9, history_items=history)
    for j, e in enumerate(events):
        if j > 0 and any(p.user_id == e.user_id for p in events[:j]):
            items = list(dict.fromkeys(p.item_id for p in events[:j]))
            expected = _brute_force_scores(events, weights, j, e.user_id, history)
            assert knn.recommend(e.user_id, 4, e.ts_ms) == _brute_force_ranking(expected, 4, items)
        knn.learn(e.user_id, e.item_id, weights[j], e.ts_ms)
    outcome = replay(events, [ItemKnnBaseline(9, history)], k=3, weights=weights)
    assert outcome.stats["item_knn"][0].result(3, 9).hits == _brute_force_hits(
        events, weights, 3, history
    )


def test_item_knn_refuses_a_matrix_over_budget() -> None:
    with pytest.raises(ConfigError, match=r"needs 763 MiB for 10,000 items.*--limit"):
        ItemKnnBaseline(n_items=10_000, history_items=50, memory_budget_mb=100)


def test_over_budget_baseline_is_left_out_with_a_message() -> None:
    events = _events([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")])
    result = evaluate_events(
        events, Config(), k=2, names=("item_knn", "popularity"), baseline_memory_mb=1e-6
    )
    assert list(result.results) == [
        "popularity_1d",
        "popularity_7d",
        "popularity_30d",
        "popularity_90d",
        "popularity_all",
    ]
    assert "over the budget" in result.skipped["item_knn"]


# -- popularity, top-k, scoring ------------------------------------------------------------


def test_popularity_decays_and_excludes_seen() -> None:
    day = 24 * 3600 * 1000
    pop = PopularityBaseline(half_life_seconds=24 * 3600.0)
    for ts, (user, item) in enumerate([("u1", "old"), ("u2", "old"), ("u3", "old")]):
        pop.learn(user, item, 1.0, ts)
    # Two events two half-lives later weigh 2 * 4 = 8 old-time units vs 3.
    pop.learn("u4", "new", 1.0, 2 * day)
    pop.learn("u5", "new", 1.0, 2 * day)
    assert pop.recommend("u9", 2, 2 * day) == ["new", "old"]
    assert pop.recommend("u4", 2, 2 * day) == ["old"]


def test_top_k_breaks_ties_by_catalog_order_and_drops_excluded() -> None:
    scores = np.array([1.0, 3.0, 3.0, -np.inf, 1.0, 0.0])
    assert top_k_indices(scores, 4).tolist() == [1, 2, 0, 4]
    assert top_k_indices(scores, 10).tolist() == [1, 2, 0, 4, 5]
    assert top_k_indices(np.full(3, -np.inf), 2).tolist() == []


def test_method_stats_metrics() -> None:
    stats = MethodStats(k=3)
    stats.record(["a", "b", "c"], "a", 1_000)  # rank 1
    stats.record(["a", "b", "c"], "c", 3_000)  # rank 3
    stats.record(["d"], "x", 2_000)  # miss
    stats.record([], "x", 2_000)  # miss
    r = stats.result(3, catalog_size=8)
    assert (r.n_scored, r.hits, r.hr) == (4, 2, 0.5)
    assert r.mrr == pytest.approx((1 + 1 / 3) / 4)
    assert r.ndcg == pytest.approx((1 + 0.5) / 4)
    assert r.coverage == pytest.approx(4 / 8)
    assert r.p50_us == pytest.approx(2.0)
    assert stats.result(2, 8).hits == 1


def test_event_weight_rule() -> None:
    ev = EventsConfig(rating_weight_base=0.5, rating_weight_scale=2.0)
    assert event_weight(Ev("u", "i", "rating", rating=4.0), ev) == 8.5
    assert event_weight(Ev("u", "i", "rating", rating=4.0, weight=3.0), ev) == 3.0
    assert event_weight(Ev("u", "i", "purchase"), ev) == 5.0


# -- the streaming model on planted structure ----------------------------------------------


def test_streaming_model_finds_planted_clusters_well_above_popularity(tmp_path: Path) -> None:
    stream = SyntheticStream(
        n_users=150, n_items=200, n_clusters=20, clusters_per_user=1, noise=0.0, seed=3
    )
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in stream.events(3000)))
    out = tmp_path / "out.json"
    assert main(["evaluate", "--data", str(data), "--output", str(out), "--no-progress"]) == 0
    methods = json.loads(out.read_text())["methods"]
    model = methods["streaming"]
    # Compared with the strongest of the five popularity baselines.
    pops = {n: m for n, m in methods.items() if n.startswith("popularity_")}
    assert len(pops) == 5
    strongest = json.loads(out.read_text())["strongest_popularity"]
    pop = pops[strongest]
    assert pop["hr"] == max(m["hr"] for m in pops.values())
    # Each user draws from one cluster of 10 items: a model that learned the clusters
    # serves the user's unseen cluster items first; popularity cannot tell users apart.
    assert model["n_scored"] == 1127
    assert model["hr"] > 0.6
    assert model["hr"] > 3 * pop["hr"]
    assert model["hr_vs_popularity"] == pytest.approx(model["hr"] / pop["hr"])


# -- the command line: every format, bad input, determinism ---------------------------------

# (user, item, rating, epoch seconds): 3 users, repeated item for u1 (not scored).
_ROWS = [
    ("1", "10", 4, 1_000_000_000),
    ("1", "11", 5, 1_000_000_060),
    ("2", "10", 3, 1_000_000_120),
    ("2", "11", 2, 1_000_000_180),
    ("3", "11", 5, 1_000_000_240),
    ("1", "12", 4, 1_000_000_300),
    ("3", "10", 1, 1_000_000_360),
    ("2", "12", 4, 1_000_000_420),
    ("3", "12", 3, 1_000_000_480),
    ("1", "11", 5, 1_000_000_540),
]


def _write(path: Path, fmt: str) -> Path:
    if fmt == "movielens":
        text = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in _ROWS)
    elif fmt == "ratings-csv":
        text = "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{i},{r},{t}\n" for u, i, r, t in _ROWS
        )
    elif fmt == "csv":
        text = "user_id,item_id,event_type,rating,ts\n" + "".join(
            f"{u},{i},rating,{r},{t * 1000}\n" for u, i, r, t in _ROWS
        )
    else:
        text = "".join(
            json.dumps({"user_id": u, "item_id": i, "event_type": "rating", "rating": r, "ts": t})
            + "\n"
            for u, i, r, t in _ROWS
        )
    path.write_text(text)
    return path


@pytest.mark.parametrize("fmt", ["movielens", "ratings-csv", "csv", "jsonl"])
def test_evaluate_reads_every_format_the_same(tmp_path: Path, fmt: str) -> None:
    data = _write(tmp_path / f"events.{fmt}", fmt)
    out = tmp_path / "out.json"
    argv = ["evaluate", "--data", str(data), "--k", "2", "--output", str(out), "--no-progress"]
    assert main([*argv, "--no-timing"]) == 0
    doc = json.loads(out.read_text())
    # 10 events: 3 first events, 1 repeat (u1 on 11) -> 6 scored, of which 2 are on an
    # item nobody had seen (u1-11 at event 2, u1-12 at event 6): certain misses. The other
    # 4 have at most 2 unseen candidates, so with k = 2 every method hits them all.
    assert doc["counts"] == {
        "events": 10,
        "users": 3,
        "items": 3,
        "first_events": 3,
        "repeat_events": 1,
        "cold_item_events": 2,
    }
    assert set(doc["methods"]) == {
        "streaming",
        "item_knn",
        *(f"popularity_{h}" for h in ("1d", "7d", "30d", "90d", "all")),
    }
    for method in doc["methods"].values():
        assert (method["n_scored"], method["hits"]) == (6, 4)
        assert method["coverage"] == 1.0
    assert doc["data"] == str(data)
    assert doc["config"]["model"]["profile_max_items"] == 50


def test_evaluate_prints_a_table_with_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "u.data", "movielens")
    assert main(["evaluate", "--data", str(data), "--k", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "HR@2" in out and "vs item-kNN" in out
    assert out.splitlines()[3].startswith("item_knn") and "1.00x" in out.splitlines()[3]


def test_evaluate_same_seed_same_json(tmp_path: Path) -> None:
    stream = SyntheticStream(n_users=30, n_items=40, n_clusters=4, seed=1)
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in stream.events(600)))
    docs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        argv = ["evaluate", "--data", str(data), "--seed", "7", "--output", str(out)]
        assert main([*argv, "--no-timing", "--no-progress"]) == 0
        docs.append(out.read_bytes())
    assert docs[0] == docs[1]
    assert json.loads(docs[0])["config"]["model"]["seed"] == 7


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("", None, "empty"),
        ("user_id,when\n1,2\n", "csv", "item_id"),
        ("1\t10\t4\t1000000000\n1\t11\t4\tyesterday\n", "movielens", ":2"),
        ("userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,soon\n", "ratings-csv", ":3"),
    ],
)
def test_evaluate_bad_input_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fmt: str | None, message: str
) -> None:
    data = tmp_path / "bad.txt"
    data.write_text(text)
    argv = ["evaluate", "--data", str(data), "--no-progress"]
    assert main([*argv, "--format", fmt] if fmt else argv) == 2
    err = capsys.readouterr().err
    assert "stream-knn evaluate: error:" in err and str(data) in err and message in err


def test_evaluate_rejects_an_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", "x", "--format", "parquet"])
    assert exc.value.code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err


# -- time-scale robustness: the same stream at another pace ---------------------------------


def _at_pace(events: list[dict[str, object]], factor: float) -> list[dict[str, object]]:
    """The same events, their times stretched by ``factor`` around the first one."""
    t0 = int(events[0]["ts"])  # type: ignore[call-overload]
    return [{**e, "ts": t0 + int((int(e["ts"]) - t0) * factor)} for e in events]  # type: ignore[call-overload]


def _hr_at_paces(tmp_path: Path, config: Path | None) -> dict[float, float]:
    # Two years of events with a taste shift halfway: a wall-clock half-life of the
    # data's order (the old 90-day default) weighs these events very differently once the
    # same stream runs 36x slower or 10x faster.
    day_ms = 24 * 3600 * 1000
    stream = SyntheticStream(
        n_users=120, n_items=160, n_clusters=16, shift_at=1500, seed=4, step_ms=240 * 1000 * 1000
    )
    events = list(stream.events(3000))
    assert int(events[-1]["ts"]) - int(events[0]["ts"]) > 700 * day_ms
    hr: dict[float, float] = {}
    for factor in (1.0, 36.0, 0.1):
        data = tmp_path / f"pace-{factor}.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in _at_pace(events, factor)))
        out = tmp_path / f"pace-{factor}.json"
        argv = ["evaluate", "--data", str(data), "--methods", "streaming", "--output", str(out)]
        assert main([*(["--config", str(config)] if config else []), *argv, "--no-progress"]) == 0
        hr[factor] = json.loads(out.read_text())["methods"]["streaming"]["hr"]
    return hr


def test_default_quality_holds_when_the_same_stream_runs_36x_slower_or_10x_faster(
    tmp_path: Path,
) -> None:
    hr = _hr_at_paces(tmp_path, None)
    assert hr[1.0] > 0.2  # the model learned something worth keeping
    assert hr[36.0] == pytest.approx(hr[1.0], rel=0.05)
    assert hr[0.1] == pytest.approx(hr[1.0], rel=0.05)


def test_the_pace_check_catches_a_wall_clock_half_life(tmp_path: Path) -> None:
    # The check has teeth: with the item half-life of the previous defaults (90 days of
    # event time) the same stream at other paces does not score the same.
    config = tmp_path / "wall-clock.toml"
    config.write_text(
        "[model]\nhalf_life_seconds = 7776000.0\nprofile_half_life_seconds = 604800.0\n"
        "profile_half_life_events = inf\n"
    )
    hr = _hr_at_paces(tmp_path, config)
    assert abs(hr[36.0] - hr[1.0]) > 0.05 * hr[1.0] or abs(hr[0.1] - hr[1.0]) > 0.05 * hr[1.0]


def test_evaluate_report_shows_every_method_over_time(tmp_path: Path) -> None:
    stream = SyntheticStream(n_users=40, n_items=60, n_clusters=6, seed=2, step_ms=3_600_000)
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in stream.events(1200)))
    out, report = tmp_path / "out.json", tmp_path / "report"
    argv = ["evaluate", "--data", str(data), "--output", str(out), "--report", str(report)]
    assert main([*argv, "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    windows = doc["windows"]
    assert len(windows) == 10
    assert all(w["first_ts_ms"] <= w["last_ts_ms"] for w in windows)
    assert all(a["last_ts_ms"] <= b["first_ts_ms"] for a, b in itertools.pairwise(windows))
    # The windows partition the scored events of each method.
    for name, method in doc["methods"].items():
        assert sum(w[name]["n_scored"] for w in windows) == method["n_scored"]
    text = (report / "report.md").read_text()
    assert f"vs {doc['strongest_popularity']}" in text and "| streaming |" in text
    png = (report / "over_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
