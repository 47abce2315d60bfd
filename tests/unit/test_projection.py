"""Sketch -> index projection: the fit's maths, its determinism, bytes, refit schedule, model use."""

from __future__ import annotations

import numpy as np
import pytest

from stream_knn.config import Config, ModelConfig
from stream_knn.embeddings import ItemState, StreamingModel
from stream_knn.embeddings.projection import Projection, SketchProjector, fit_projection
from stream_knn.errors import ConfigError, DimensionError

DAY_MS = 86_400_000


def _state(values: list[float], ts_ms: int = 0, popularity: float = 1.0) -> ItemState:
    return ItemState(np.array(values, dtype=np.float32), ts_ms, 1, popularity)


def test_truncation_keeps_the_first_coordinates() -> None:
    p = Projection.truncation(4, 2)
    assert p.version == 0
    assert (p.sketch_dims, p.dims) == (4, 2)
    assert p.apply([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).tolist() == [
        [1.0, 2.0],
        [5.0, 6.0],
    ]
    with pytest.raises(DimensionError, match="sketch_dims=4"):
        p.apply([1.0, 2.0, 3.0])
    with pytest.raises(DimensionError, match="dims <= sketch_dims"):
        Projection.truncation(2, 3)


def test_fit_finds_the_principal_directions_signed_positive() -> None:
    # Rows span the e3 axis (weight 9 + 16 = 25) and -e1 (weight 1): e3 first, then e1 signed +.
    states = {
        "a": _state([0.0, 0.0, 3.0, 0.0]),
        "b": _state([0.0, 0.0, -4.0, 0.0]),
        "c": _state([-1.0, 0.0, 0.0, 0.0]),
    }
    p = fit_projection(states, dims=2, half_life_seconds=1.0, version=7, max_items=10)
    assert p.version == 7
    np.testing.assert_allclose(p.matrix, [[0, 1], [0, 0], [1, 0], [0, 0]], atol=1e-6)
    assert p.apply(states["b"].vector).tolist() == [-4.0, 0.0]


def test_fit_decays_rows_to_the_newest_time() -> None:
    # Undecayed, e1 (norm 2) would lead; 2 half-lives older, it weighs 0.5 < 1 of e2.
    states = {
        "old": _state([2.0, 0.0], ts_ms=0),
        "new": _state([0.0, 1.0], ts_ms=2 * DAY_MS),
    }
    p = fit_projection(states, dims=1, half_life_seconds=86_400.0, version=1, max_items=10)
    np.testing.assert_allclose(p.matrix, [[0.0], [1.0]], atol=1e-6)


def test_fit_uses_the_most_popular_items_only() -> None:
    states = {
        "big_but_rare": _state([5.0, 0.0], popularity=1.0),
        "popular": _state([0.0, 1.0], popularity=3.0),
    }
    p = fit_projection(states, dims=1, half_life_seconds=1.0, version=1, max_items=1)
    np.testing.assert_allclose(p.matrix, [[0.0], [1.0]], atol=1e-6)


def test_fit_does_not_depend_on_row_order() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((30, 16)).astype(np.float32)
    states = {f"i{j}": ItemState(rows[j], j * 1000, 1, 1.0) for j in range(30)}
    reversed_states = dict(reversed(list(states.items())))
    a = fit_projection(states, dims=4, half_life_seconds=3600.0, version=1, max_items=100)
    b = fit_projection(reversed_states, dims=4, half_life_seconds=3600.0, version=1, max_items=100)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_allclose(a.matrix.T @ a.matrix, np.eye(4), atol=1e-5)


def test_fit_rejects_empty_and_ragged_input() -> None:
    with pytest.raises(DimensionError, match="no item states"):
        fit_projection({}, dims=1, half_life_seconds=1.0, version=1, max_items=1)
    ragged = {"a": _state([1.0, 0.0]), "b": _state([1.0, 0.0, 0.0])}
    with pytest.raises(DimensionError, match="differ in length"):
        fit_projection(ragged, dims=1, half_life_seconds=1.0, version=1, max_items=5)


def test_projection_bytes_round_trip_and_checks() -> None:
    p = Projection(np.arange(6, dtype=np.float32).reshape(3, 2), 4)
    data = p.to_bytes()
    assert len(data) == 17 + 4 * 6
    q = Projection.from_bytes(data)
    assert q.version == 4
    np.testing.assert_array_equal(q.matrix, p.matrix)
    with pytest.raises(DimensionError, match="expected"):
        Projection.from_bytes(data[:-4])
    with pytest.raises(DimensionError, match="truncated"):
        Projection.from_bytes(data[:5])
    bad = data[:-4] + np.array([np.nan], dtype="<f4").tobytes()
    with pytest.raises(DimensionError, match="NaN"):
        Projection.from_bytes(bad)


def test_projector_refits_after_the_configured_updates() -> None:
    sp = SketchProjector(ModelConfig(dims=1, sketch_dims=2, projection_refit_updates=2))
    sp.set("a", _state([0.0, 2.0]))
    assert not sp.refit_due
    assert sp.project("a") is not None and sp.project("a").tolist() == [0.0]  # truncation
    sp.set("a", _state([0.0, 3.0]))
    assert sp.refit_due
    assert sp.refit()
    assert not sp.refit_due
    assert sp.projection.version == 1
    assert dict((i, v.tolist()) for i, v in sp.projected()) == {"a": [3.0]}
    assert sp.remove("a") and not sp.remove("a")
    assert sp.project("a") is None
    with pytest.raises(DimensionError, match="sketch_dims"):
        sp.set("b", _state([1.0, 2.0, 3.0]))


def test_projector_without_widening_never_refits() -> None:
    sp = SketchProjector(ModelConfig(dims=2, sketch_dims=2, projection_refit_updates=1))
    sp.set("a", _state([1.0, 2.0]))
    assert sp.refit_due
    assert not sp.refit()
    assert sp.projection.version == 0


def test_model_keeps_wide_state_and_searches_projected_vectors() -> None:
    cfg = ModelConfig(dims=4, sketch_dims=16, projection_refit_updates=5, catalog_weight=0.0)
    m = StreamingModel(cfg)
    for j in range(12):
        m.learn_one(f"u{j % 3}", f"i{j % 4}", 1.0, ts_ms=j)
    state = m.item_state("i0")
    assert state is not None and state.vector.shape == (16,)
    assert m.projection.version == 2  # refits after update 5 and 10
    ids, matrix = m.item_matrix()
    assert matrix.shape == (4, 4)
    for item_id, row in zip(ids, matrix, strict=True):
        wide = m.item_state(item_id)
        assert wide is not None
        expected = m.projection.apply(wide.vector)
        np.testing.assert_allclose(row, expected / np.linalg.norm(expected), rtol=1e-5)


def test_model_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[tuple[str, float]]:
        m = StreamingModel(
            ModelConfig(dims=4, sketch_dims=32, seed=seed, projection_refit_updates=7)
        )
        for j in range(60):
            m.learn_one(f"u{j % 7}", f"i{(j * 5) % 11}", 1.0, ts_ms=j * 1000)
        return m.recommend("u1", k=3, now_ms=60_000)

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_config_checks_sketch_settings() -> None:
    with pytest.raises(ConfigError, match=r"model.sketch_dims = 32 .*model.dims \(64\)"):
        Config().replace(model__sketch_dims=32)
    with pytest.raises(ConfigError, match=r"model\.projection_refit_updates = 0"):
        Config().replace(model__projection_refit_updates=0)
    with pytest.raises(ConfigError, match=r"model\.projection_fit_max_items = 0"):
        Config().replace(model__projection_fit_max_items=0)
    assert Config().model.sketch_dims == 256
