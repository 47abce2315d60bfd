"""Offline tuning: time windows, index choice, the written config and report, determinism."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream_knn.cli import main
from stream_knn.config import Config, load_config
from stream_knn.errors import ConfigError
from stream_knn.evaluation.report import tune_json
from stream_knn.evaluation.tune import (
    IndexPoint,
    SearchSpace,
    choose_index,
    split_windows,
    tune,
)
from stream_knn.events.sources import read_events
from stream_knn.events.synthetic import SyntheticStream

_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Ev:
    user_id: str
    item_id: str
    event_type: str = "view"
    ts_ms: int = 0
    weight: float | None = None
    rating: float | None = None


def _stream_file(tmp_path: Path, n: int = 900) -> Path:
    stream = SyntheticStream(n_users=40, n_items=60, n_clusters=6, seed=2)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in stream.events(n)))
    return path


def test_split_windows_equal_counts_and_never_splits_a_timestamp() -> None:
    events = [Ev("u", "i", ts_ms=t) for t in [0, 1, 2, 3, 4, 5, 6, 7]]
    assert split_windows(events, 3) == [(2, 4), (4, 6), (6, 8)]
    # The cut at index 2 falls inside the run of ts=1 (indices 1..3): it moves past it.
    tied = [Ev("u", "i", ts_ms=t) for t in [0, 1, 1, 1, 2, 3, 4, 5]]
    assert split_windows(tied, 3) == [(4, 5), (5, 6), (6, 8)]
    with pytest.raises(ConfigError, match="cannot be split into 3"):
        split_windows([Ev("u", "i", ts_ms=0)] * 8, 3)


def test_choose_index_takes_the_cheapest_setting_reaching_the_target() -> None:
    def point(metric: str, trees: int, nodes: int, recall: float) -> IndexPoint:
        return IndexPoint(metric, trees, nodes, nodes, recall, 1.0, 0.0)

    points = [
        point("angular", 10, 200, 0.90),
        point("angular", 10, 500, 0.96),
        point("angular", 5, 500, 0.95),
        point("dot", 5, 1000, 0.99),
    ]
    assert choose_index(points) == points[2]
    assert choose_index(points[:1]) == points[0]  # none reaches 0.95: best recall
    assert choose_index([]) is None


def test_tune_scores_windows_and_keeps_the_base_first(tmp_path: Path) -> None:
    events = read_events(_stream_file(tmp_path))
    space = SearchSpace(
        model={"model__dims": (16, 32), "model__half_life_seconds": (3600.0,)},
        ks=(5, 10, 20),
        metrics=("angular",),
        n_trees=(2, 5),
        search_ks=(-1, 50, 400),
    )
    result = tune(events, Config(), trials=2, search="grid", seed=4, windows=2, space=space)
    assert [t.params for t in result.trials] == [
        {"model__dims": 16, "model__half_life_seconds": 3600.0},
        {"model__dims": 32, "model__half_life_seconds": 3600.0},
    ]
    assert result.windows == [(300, 600), (600, 900)]
    for trial in result.trials:
        # HR@10 of a 20-item list is HR@10 of a 10-item list: k = 10 is the smallest best.
        assert trial.hr_cutoff[20] == trial.hr_cutoff[10]
        assert trial.hr_at_k[20][0] >= trial.hr_at_k[10][0] >= trial.hr_at_k[5][0]
        assert trial.best_k() == 10
    assert result.best_k == 10
    assert len(result.index_points) == 1 * 2 * 3
    cfg = result.config
    assert cfg.model.seed == 4 and cfg.serving.k == 10
    assert cfg.model.dims == result.best.params["model__dims"]
    assert result.chosen_index is not None
    assert (cfg.index.n_trees, cfg.index.search_k) == (
        result.chosen_index.n_trees,
        result.chosen_index.search_k,
    )


def test_tune_command_writes_a_loadable_config_and_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _stream_file(tmp_path)
    toml, report = tmp_path / "tuned.toml", tmp_path / "report"
    argv = ["tune", "--data", str(data), "--trials", "2", "--seed", "3", "--no-progress"]
    assert main([*argv, "--output-config", str(toml), "--report", str(report)]) == 0
    config = load_config(toml, environ={})
    assert config.model.seed == 3
    assert config.index.metric in ("angular", "euclidean", "dot")
    assert config.serving.k == 10
    text = (report / "report.md").read_text()
    assert "| 1 **best** |" in text or "| 2 **best** |" in text
    assert "**Chosen:**" in text and "(hr_vs_k.png)" in text and "(index_sweep.png)" in text
    for name in ("hr_vs_k.png", "index_sweep.png"):
        assert (report / name).read_bytes()[:8] == _PNG
    assert f"wrote {toml}" in capsys.readouterr().out


def test_tune_same_seed_same_result(tmp_path: Path) -> None:
    events = read_events(_stream_file(tmp_path, n=600))
    space = SearchSpace(
        model={"model__dims": (16, 32, 48), "model__half_life_seconds": (3600.0, 60.0)},
        ks=(10,),
        metrics=("angular", "dot"),
        n_trees=(3,),
        search_ks=(-1, 60),
    )
    docs = [
        tune_json(
            tune(events, Config(), trials=3, seed=9, windows=2, space=space),
            data="x",
            timing=False,
        )
        for _ in range(2)
    ]
    assert docs[0] == docs[1]
    # Random search: the base setting first, then 2 more of the 6 grid points.
    assert docs[0]["trials"][0]["model__dims"] == 16
    assert len(docs[0]["trials"]) == 3
