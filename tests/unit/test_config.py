"""The typed configuration root: TOML, environment overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_knn.config import Config, VariantConfig, dump_toml, load_config
from stream_knn.errors import ConfigError


def test_defaults_without_file_or_environment():
    config = load_config(environ={})
    assert config == Config()
    assert config.model.dims == 64
    assert config.index.backend == "auto"
    assert config.index.exact_max_items == 100_000
    assert config.serving.search_threads == 2
    assert config.serving.variants == (VariantConfig(),)


def test_toml_then_environment_override(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[index]\nn_trees = 20\nmetric = "euclidean"\n[serving]\nk = 7\n')
    config = load_config(path, environ={"STREAM_KNN_TREES": "30", "STREAM_KNN_SERVING__K": "5"})
    assert config.index.n_trees == 30
    assert config.index.metric == "euclidean"
    assert config.serving.k == 5


def test_dump_toml_round_trips_with_variants(tmp_path: Path):
    config = Config().replace(
        serving__variants=(
            VariantConfig(name="a", share=0.7),
            VariantConfig(name="b", share=0.3, backend="exact", k=5),
        ),
        index__rebuild_interval_seconds=2.5,
    )
    path = tmp_path / "out.toml"
    path.write_text(dump_toml(config))
    assert load_config(path, environ={}) == config


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"STREAM_KNN_METRIC": "cosine"},
            "index.metric = 'cosine' is not valid; valid values: 'angular', 'euclidean', 'dot', 'manhattan'",
        ),
        (
            {"STREAM_KNN_BACKEND": "faiss"},
            "index.backend = 'faiss' is not valid; valid values: 'auto', 'annoy', 'exact', 'hnsw'",
        ),
        ({"STREAM_KNN_TREES": "many"}, "index.n_trees = 'many' is not valid; expected an integer"),
        ({"STREAM_KNN_TREES": "0"}, "index.n_trees = 0 is not valid; valid values: integers >= 1"),
        (
            {"STREAM_KNN_INDEX__EXACT_MAX_ITEMS": "-1"},
            "index.exact_max_items = -1 is not valid; valid values: integers >= 0",
        ),
        (
            {"STREAM_KNN_SERVING__SEARCH_THREADS": "0"},
            "serving.search_threads = 0 is not valid; valid values: integers >= 1",
        ),
        (
            {"STREAM_KNN_K": "500"},
            "serving.k = 500 is not valid; valid values: integers 1..serving.max_k (200)",
        ),
        (
            {"STREAM_KNN_REBUILD_INTERVAL": "inf"},
            "index.rebuild_interval_seconds = 'inf' is not valid; expected a finite number",
        ),
        (
            {"STREAM_KNN_INDEX__BUILD_CPU_SHARE": "1.5"},
            "index.build_cpu_share = 1.5 is not valid; valid values: 0 < x <= 1",
        ),
        ({"STREAM_KNN_NOPE__X": "1"}, "STREAM_KNN_NOPE__X: unknown section 'nope'"),
        (
            {"STREAM_KNN_INDEX__TREES": "1"},
            "unknown setting index.trees; valid settings of [index]:",
        ),
    ],
)
def test_invalid_settings_name_the_setting_and_valid_values(environ, message):
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert message in str(info.value)


def test_bad_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[index\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[indexes]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[indexes\]"):
        load_config(unknown, environ={})


def test_variant_shares_must_be_positive():
    with pytest.raises(ConfigError, match=r"serving\.variants\.share"):
        Config().replace(serving__variants=(VariantConfig(name="a", share=0.0),))
