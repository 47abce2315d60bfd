"""Catalog features: imputation, standardisation, projection, PCA, errors, blend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_knn.embeddings import CatalogFeatures, blend
from stream_knn.errors import DimensionError


def _projection_row(seed: int, index: int, dims: int) -> np.ndarray:
    # The documented rule: row j depends only on (seed, j).
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    return rng.standard_normal(dims) / math.sqrt(dims)


def _some(vector: np.ndarray | None) -> np.ndarray:
    assert vector is not None
    return vector


def test_imputation_and_standardisation_exact() -> None:
    cf = CatalogFeatures(dims=4, pca=False, warmup_items=0, seed=7)
    assert cf.content_vector(features={"a": 1.0}) is None  # one value: no spread yet
    r0 = _projection_row(7, 0, 4)
    r1 = _projection_row(7, 1, 4)
    # a: values 1, 3 -> mean 2, population std 1 -> z = 1.
    np.testing.assert_allclose(_some(cf.content_vector(features={"a": 3})), r0, rtol=1e-6)
    # a missing -> imputed with its mean (z = 0); b first seen (no spread) -> nothing.
    assert cf.content_vector(features={"a": None, "b": 5.0}) is None
    assert cf.names == ["a", "b"]
    # b: 5, 7 -> mean 6, std 1 -> z_b = 1; a absent -> z_a = 0; NaN counts as missing.
    np.testing.assert_allclose(
        _some(cf.content_vector(features={"b": 7, "a": math.nan})), r1, rtol=1e-6
    )
    state = cf.state()
    assert state["count"] == [2, 2]
    assert state["mean"] == [2.0, 6.0]
    assert state["m2"] == [2.0, 2.0]
    # transform learns nothing: a=4 is z=2, b=4 is z=-2.
    np.testing.assert_allclose(
        _some(cf.transform(features={"a": 4, "b": 4})), 2 * r0 - 2 * r1, rtol=1e-5
    )
    assert cf.state()["count"] == [2, 2]


def test_explicit_vector_used_directly_and_checked() -> None:
    cf = CatalogFeatures(dims=3, pca=True, warmup_items=10, seed=0)
    out = cf.content_vector(vector=[1, 2, 3], features={"a": 1.0})
    assert out is not None
    assert out.dtype == np.float32
    assert out.tolist() == [1.0, 2.0, 3.0]
    assert cf.state()["count"] == [1]  # features still feed the statistics
    with pytest.raises(DimensionError, match=r"expected \(3,\)"):
        cf.content_vector(vector=[1.0, 2.0])
    with pytest.raises(DimensionError, match="NaN or inf"):
        cf.content_vector(vector=[1.0, math.inf, 0.0])
    with pytest.raises(DimensionError, match="list of numbers"):
        cf.content_vector(vector=["x", "y", "z"])


@pytest.mark.parametrize("value", ["12", True, [1.0], math.inf])
def test_bad_feature_values_rejected_without_learning(value: object) -> None:
    cf = CatalogFeatures(dims=3, pca=False, warmup_items=0, seed=0)
    with pytest.raises(DimensionError, match="'price'"):
        cf.content_vector(features={"price": value})  # type: ignore[dict-item]
    assert cf.state()["count"] == []


def test_pca_fitted_after_warmup_with_version_and_padding() -> None:
    cf = CatalogFeatures(dims=4, pca=True, warmup_items=6, seed=0)
    rng = np.random.default_rng(0)
    for k in range(5):
        x = float(k)
        cf.content_vector(features={"x": x, "y": 2 * x + 1, "z": float(rng.normal())})
    assert cf.pca_version == 0
    before = cf.transform(features={"x": 1.0, "y": 3.0, "z": 0.0})
    cf.content_vector(features={"x": 5.0, "y": 11.0, "z": 0.3})
    assert cf.pca_version == 1
    after = cf.transform(features={"x": 1.0, "y": 3.0, "z": 0.0})
    assert before is not None
    assert after is not None
    assert after.shape == (4,)
    # x and y are perfectly correlated: rank 2, so at most 2 components, rest zero-padded.
    assert after[2:].tolist() == [0.0, 0.0]
    assert not np.allclose(before, after)
    # The fit happens once.
    for k in range(10):
        cf.content_vector(features={"x": float(k), "y": 0.0, "z": 1.0})
    assert cf.pca_version == 1


def test_state_round_trip_gives_same_vectors() -> None:
    cf = CatalogFeatures(dims=4, pca=True, warmup_items=3, seed=1)
    for k in range(4):
        cf.content_vector(features={"x": float(k), "y": float(k * k), "w": None})
    restored = CatalogFeatures.from_bytes(cf.to_bytes())
    record = {"x": 2.5, "y": 1.0}
    np.testing.assert_array_equal(
        _some(restored.transform(features=record)), _some(cf.transform(features=record))
    )
    assert restored.pca_version == cf.pca_version == 1
    warm = CatalogFeatures(dims=4, pca=True, warmup_items=100, seed=1)
    warm.content_vector(features={"x": 1.0, "y": None})
    again = CatalogFeatures.from_state(warm.state())
    assert again.state() == warm.state()
    with pytest.raises(DimensionError, match="version"):
        CatalogFeatures.from_state({**warm.state(), "state_version": 99})


def test_blend() -> None:
    out = blend(np.array([3.0, 0.0]), np.array([0.0, 2.0]), 0.25)
    assert out is not None
    np.testing.assert_allclose(out, [0.75, 0.25])
    content_only = blend(None, np.array([0.0, 2.0]), 0.25)
    assert content_only is not None
    assert content_only.tolist() == [0.0, 1.0]
    behaviour_only = blend(np.array([0.0, -4.0]), np.zeros(2), 0.9)
    assert behaviour_only is not None
    assert behaviour_only.tolist() == [0.0, -1.0]
    assert blend(None, None, 0.5) is None
    with pytest.raises(DimensionError, match="shape"):
        blend(np.ones(2), np.ones(3), 0.5)
