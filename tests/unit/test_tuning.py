"""The self-tuner of the query step, alone and inside the replay of ``stream-knn evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_knn.cli import main
from stream_knn.events.synthetic import SyntheticStream
from stream_knn.serving.tuning import DEFAULT_CANDIDATES, SelfTuner, tuner_for


def _tuner(**overrides: float) -> SelfTuner:
    options = {"sample_rate": 1.0, "min_samples": 20, "margin": 0.1, "memory": 1000.0}
    options.update(overrides)
    return SelfTuner(DEFAULT_CANDIDATES, "rank5", **options)  # type: ignore[arg-type]


def test_a_better_candidate_is_served_only_after_enough_samples_and_a_clear_margin() -> None:
    tuner = _tuner()
    # rank2 hits 3 of 4, the served rank5 2 of 4: 1.5x, but only after 20 samples.
    for j in range(19):
        assert tuner.record({"rank5": j % 2 == 0, "rank2": j % 4 != 3}) is None
    switch = tuner.record({"rank5": True, "rank2": True})
    assert switch is not None and (switch.old, switch.new) == ("rank5", "rank2")
    assert tuner.served.name == "rank2" and tuner.switches == [switch]
    # Within the margin: no switch back and forth.
    for _ in range(100):
        assert tuner.record({"rank5": True, "rank2": True, "rank20": True}) is None


def test_hit_rates_follow_the_recent_samples() -> None:
    tuner = _tuner(memory=10.0, min_samples=10**9)
    for _ in range(200):
        tuner.record({"rank5": True})
    for _ in range(200):
        tuner.record({"rank5": False, "rank20": True})
    rates = tuner.hit_rates
    assert rates["rank5"] < 0.01 and rates["rank20"] > 0.99 and rates["rank2"] == 0.0


def test_sampling_is_by_key_and_at_the_rate() -> None:
    tuner = SelfTuner(DEFAULT_CANDIDATES, "rank5", sample_rate=0.1)
    picked = [k for k in range(20_000) if tuner.sampled(str(k))]
    assert 1_700 < len(picked) < 2_300
    again = SelfTuner(DEFAULT_CANDIDATES, "rank5", sample_rate=0.1)
    assert picked == [k for k in range(20_000) if again.sampled(str(k))]


def test_the_configured_setting_is_served_first() -> None:
    tuner = tuner_for(7.0, 0.05)
    assert tuner.served.name == "rank7" and tuner.served.half_life_events == 7.0
    assert set(tuner.candidates) == {"rank7", *(c.name for c in DEFAULT_CANDIDATES)}
    assert tuner_for(5.0, 0.05).served == DEFAULT_CANDIDATES[0]
    with pytest.raises(ValueError):
        SelfTuner(DEFAULT_CANDIDATES, "nope")


def _evaluate(tmp_path: Path, data: Path, name: str, self_tuning: bool) -> dict[str, object]:
    config = tmp_path / f"{name}.toml"
    # A flat query (no rank decay) on a stream whose users change taste: the tuner should
    # find that a query weighted to the newest items does better, and serve it.
    config.write_text(
        "[model]\nprofile_half_life_events = inf\n"
        f"[serving]\nself_tuning = {'true' if self_tuning else 'false'}\n"
        "tuning_sample_rate = 0.5\n"
    )
    out = tmp_path / f"{name}.json"
    argv = ["--config", str(config), "evaluate", "--data", str(data), "--methods", "streaming"]
    assert main([*argv, "--output", str(out), "--no-progress", "--no-timing"]) == 0
    doc: dict[str, object] = json.loads(out.read_text())
    return doc


def test_evaluate_replays_the_self_tuning_and_reports_its_switches(tmp_path: Path) -> None:
    stream = SyntheticStream(n_users=100, n_items=160, n_clusters=16, shift_at=2000, seed=6)
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in stream.events(6000)))
    tuned = _evaluate(tmp_path, data, "tuned", True)
    fixed = _evaluate(tmp_path, data, "fixed", False)
    tuning = tuned["self_tuning"]
    assert isinstance(tuning, dict) and fixed["self_tuning"] is None
    assert tuning["served_first"] == "rank_inf"
    assert tuning["switches"] and tuning["switches"][0]["from"] == "rank_inf"
    assert tuning["served_last"] != "rank_inf"
    rates = tuning["hit_rates"]
    assert rates[tuning["served_last"]] > rates["rank_inf"]
    hr = {name: doc["methods"]["streaming"]["hr"] for name, doc in (("t", tuned), ("f", fixed))}  # type: ignore[index]
    assert hr["t"] > hr["f"]


def test_on_a_stream_of_a_few_hits_the_tuner_falls_back_to_popularity(tmp_path: Path) -> None:
    # Users pick items by one global popularity, unrelated to what else they took: the
    # neighbour signal is noise, recent popularity the better answer. The model must not
    # stay below it.
    rng = np.random.default_rng(8)
    weights = 1.0 / np.arange(1, 301) ** 1.1
    items = rng.choice(300, size=8000, p=weights / weights.sum())
    users = rng.integers(0, 300, size=8000)
    data = tmp_path / "hits.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{i}",
                    "event_type": "view",
                    "ts": 1_700_000_000_000 + 60_000 * j,
                }
            )
            + "\n"
            for j, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))
        )
    )
    config = tmp_path / "sample.toml"
    config.write_text("[serving]\ntuning_sample_rate = 0.5\n")
    out = tmp_path / "out.json"
    argv = ["--config", str(config), "evaluate", "--data", str(data), "--output", str(out)]
    assert main([*argv, "--methods", "streaming,popularity", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    tuning = doc["self_tuning"]
    assert tuning["served_last"] == "popular"
    # Once switched (after its minimum of samples), it answers as well as the best
    # popularity baseline.
    switched = tuning["switches"][-1]["ts_ms"]
    after = [w for w in doc["windows"] if w["first_ts_ms"] > switched]
    assert len(after) >= 5

    def hr(name: str) -> float:
        return sum(w[name]["hr"] * w[name]["n_scored"] for w in after) / sum(
            w[name]["n_scored"] for w in after
        )

    assert hr("streaming") >= 0.95 * hr(doc["strongest_popularity"])
