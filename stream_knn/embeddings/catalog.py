"""Catalog features to content vectors, and the blend of behaviour and content vectors.

A catalog record carries an explicit ``vector`` (used as is) and/or named numeric
``features``. Features are imputed, standardised with running statistics and projected to
``dims``, so a brand-new item with only catalog data has a vector at once.

Rules (the contract the worker and the offline replay share):

* **Registration.** A feature name is registered the first time it is seen; names are
  kept in order of first sight, at most :data:`MAX_FEATURE_NAMES` of them (later new
  names are ignored, logged once: a stream of made-up names must not grow the state
  without bound).
* **Imputation.** A missing feature (absent, ``None`` or NaN) takes the running mean of
  that feature, i.e. a standardised value of exactly 0.
* **Standardisation.** ``z = (x - mean) / std`` with running mean and population variance
  (Welford), updated with the record *before* it is transformed; ``z = 0`` while a
  feature has no spread (fewer than two distinct values seen).
* **Projection.** Until PCA is fitted (or with ``pca=False``), ``z`` is multiplied by a
  fixed seeded Gaussian random projection (row ``j`` depends only on the seed and ``j``,
  so new features do not move old ones). With ``pca=True`` the standardised rows of the
  first ``warmup_items`` feature records are kept; then the top principal components are
  fitted once, ``pca_version`` becomes 1, and from then on ``z`` is projected on them
  (zero-padded when there are fewer components than ``dims``). Content vectors made
  before the fit live in a different basis: recompute them with :meth:`transform` when
  ``pca_version`` changes. Features first seen after the fit are ignored by the PCA basis.
* **Errors.** Wrong vector dims, NaN/inf in a vector, infinite feature values and
  non-numeric feature values (strings, booleans, lists) raise
  :class:`~stream_knn.errors.DimensionError` naming the culprit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream_knn.errors import DimensionError

__all__ = ["MAX_FEATURE_NAMES", "CatalogFeatures", "blend", "unit"]

logger = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
Features = Mapping[str, float | int | None]

_STATE_VERSION = 1
#: Feature names a catalog registers, at most.
MAX_FEATURE_NAMES = 1024


def unit(vector: npt.ArrayLike | None) -> Vector | None:
    """``vector`` scaled to unit length as float32, ``None`` for ``None`` or a zero vector."""
    if vector is None:
        return None
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return (array / norm).astype(np.float32, copy=False)


def blend(
    behaviour: npt.ArrayLike | None, content: npt.ArrayLike | None, catalog_weight: float
) -> Vector | None:
    """Blend an item's behaviour and content vectors into the vector that is indexed.

    ``(1 - w) * unit(behaviour) + w * unit(content)``; when only one of them exists (or the
    other is zero) it is used alone, unit length, so an item known only from the catalog is
    still recommendable.

    Parameters
    ----------
    behaviour
        Sketch vector of the item, or ``None``.
    content
        Content vector of the item, or ``None``.
    catalog_weight
        ``model.catalog_weight``, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray or None
        float32 vector (not renormalised when both exist), ``None`` if neither exists.

    Examples
    --------
    >>> blend([3.0, 0.0], [0.0, 2.0], 0.25).tolist()
    [0.75, 0.25]
    >>> blend(None, [0.0, 2.0], 0.25).tolist()
    [0.0, 1.0]
    """
    b, c = unit(behaviour), unit(content)
    if b is None:
        return c
    if c is None:
        return b
    if b.shape != c.shape:
        raise DimensionError(f"behaviour vector has shape {b.shape} but content vector {c.shape}")
    w = np.float32(catalog_weight)
    return ((np.float32(1.0) - w) * b + w * c).astype(np.float32, copy=False)


class CatalogFeatures:
    """Turns catalog records into content vectors of ``dims`` (see module docstring).

    Parameters
    ----------
    dims
        Output dimension (``model.dims``).
    pca
        Fit PCA on the first ``warmup_items`` feature records (``model.pca``).
    warmup_items
        Number of feature records in the PCA warm-up sample (``model.pca_warmup_items``).
    seed
        Seed of the random projection used before/instead of PCA (``model.seed``).

    Examples
    --------
    >>> cf = CatalogFeatures(dims=4, pca=False, warmup_items=0, seed=0)
    >>> cf.content_vector(features={"price": 1.0}) is None  # one value: no spread yet
    True
    >>> cf.content_vector(features={"price": 3.0}).shape
    (4,)
    """

    def __init__(self, dims: int, pca: bool, warmup_items: int, seed: int) -> None:
        if dims < 1:
            raise DimensionError(f"dims must be >= 1, got {dims}")
        self.dims = dims
        self.pca = pca
        self.warmup_items = warmup_items
        self.seed = seed
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._count: list[int] = []
        self._mean: list[float] = []
        self._m2: list[float] = []
        self._projection = np.zeros((0, dims), dtype=np.float64)
        #: 0 until PCA is fitted, then 1 (incremented on every fit).
        self.pca_version = 0
        self._components: npt.NDArray[np.float64] | None = None  # (n_components, n_features)
        self._warmup: list[npt.NDArray[np.float64]] = []  # raw rows, NaN = missing
        self._late_names_logged: set[str] = set()
        self._full_logged = False

    # -- public API -------------------------------------------------------------------------

    def content_vector(
        self,
        vector: npt.ArrayLike | None = None,
        features: Features | None = None,
        *,
        learn: bool = True,
    ) -> Vector | None:
        """Content vector of one catalog record, learning from its features first.

        Parameters
        ----------
        vector
            Explicit vector of ``dims`` finite numbers; if given it is the result.
        features
            Named numeric features, values may be ``None``/NaN (missing).
        learn
            Update the running statistics (and the PCA warm-up sample) with ``features``.

        Returns
        -------
        numpy.ndarray or None
            float32 vector of ``dims``, or ``None`` when the record has no vector and its
            features carry no information yet (e.g. the very first record).

        Raises
        ------
        DimensionError
            Wrong dims or non-finite values in ``vector``; non-numeric or infinite feature
            values.
        """
        explicit = None if vector is None else self._check_vector(vector)
        row = self._parse(features) if features else None
        if row is not None and learn:
            self._learn(row)
        if explicit is not None:
            return explicit
        if row is None:
            return None
        return self._project(row)

    def transform(
        self, vector: npt.ArrayLike | None = None, features: Features | None = None
    ) -> Vector | None:
        """Content vector with the current statistics, learning nothing (for recomputing)."""
        return self.content_vector(vector, features, learn=False)

    def state(self) -> dict[str, Any]:
        """Everything needed to restore this object, as plain JSON-able values."""
        return {
            "state_version": _STATE_VERSION,
            "dims": self.dims,
            "pca": self.pca,
            "warmup_items": self.warmup_items,
            "seed": self.seed,
            "names": list(self.names),
            "count": list(self._count),
            "mean": list(self._mean),
            "m2": list(self._m2),
            "pca_version": self.pca_version,
            "components": None if self._components is None else self._components.tolist(),
            "warmup": [_nan_to_none(r) for r in self._warmup],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CatalogFeatures:
        """Restore from :meth:`state`."""
        if state.get("state_version") != _STATE_VERSION:
            raise DimensionError(
                f"catalog feature state has version {state.get('state_version')!r}, "
                f"this code reads {_STATE_VERSION}"
            )
        obj = cls(
            int(state["dims"]), bool(state["pca"]), int(state["warmup_items"]), int(state["seed"])
        )
        for name in state["names"]:
            obj._register(str(name))
        obj._count = [int(c) for c in state["count"]]
        obj._mean = [float(m) for m in state["mean"]]
        obj._m2 = [float(m) for m in state["m2"]]
        obj.pca_version = int(state["pca_version"])
        if state["components"] is not None:
            obj._components = np.atleast_2d(np.asarray(state["components"], dtype=np.float64))
        obj._warmup = [
            np.array([np.nan if v is None else v for v in r], dtype=np.float64)
            for r in state["warmup"]
        ]
        return obj

    def to_bytes(self) -> bytes:
        """:meth:`state` as orjson bytes."""
        return orjson.dumps(self.state())

    @classmethod
    def from_bytes(cls, data: bytes) -> CatalogFeatures:
        """Restore from :meth:`to_bytes`."""
        try:
            state = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DimensionError(f"catalog feature state is not valid JSON: {exc}") from None
        return cls.from_state(state)

    # -- internals --------------------------------------------------------------------------

    def _check_vector(self, vector: npt.ArrayLike) -> Vector:
        try:
            array = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise DimensionError("catalog vector must be a list of numbers") from None
        if array.shape != (self.dims,):
            raise DimensionError(
                f"catalog vector has shape {array.shape}, expected ({self.dims},) "
                "(model.dims); send vectors of the configured dimension"
            )
        if not np.isfinite(array).all():
            raise DimensionError("catalog vector holds NaN or inf; send finite numbers")
        return array

    def _register(self, name: str) -> int:
        index = len(self.names)
        self.names.append(name)
        self._index[name] = index
        self._count.append(0)
        self._mean.append(0.0)
        self._m2.append(0.0)
        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        row = rng.standard_normal(self.dims) / math.sqrt(self.dims)
        self._projection = np.vstack([self._projection, row[None, :]])
        return index

    def _parse(self, features: Features) -> npt.NDArray[np.float64]:
        """Raw row over all registered features (registering new names), NaN = missing."""
        values: dict[int, float] = {}
        for name, value in features.items():
            if value is None:
                number = math.nan
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DimensionError(
                    f"catalog feature {name!r} = {value!r} is not a number; send numbers "
                    "or null for missing values"
                )
            else:
                number = float(value)
                if math.isinf(number):
                    raise DimensionError(
                        f"catalog feature {name!r} is infinite; send a finite number"
                    )
            index = self._index.get(name)
            if index is None:
                if len(self.names) >= MAX_FEATURE_NAMES:
                    self._log_full(name)
                    continue
                index = self._register(str(name))
            values[index] = number
        row = np.full(len(self.names), np.nan)
        for index, number in values.items():
            row[index] = number
        return row

    def _learn(self, row: npt.NDArray[np.float64]) -> None:
        for j, x in enumerate(row.tolist()):
            if math.isnan(x):
                continue
            self._count[j] += 1
            delta = x - self._mean[j]
            self._mean[j] += delta / self._count[j]
            self._m2[j] += delta * (x - self._mean[j])
        if self.pca and self.pca_version == 0:
            self._warmup.append(row)
            if len(self._warmup) >= self.warmup_items:
                self._fit_pca()

    def _standardise(self, row: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        n = len(self.names)
        padded = np.full(n, np.nan)
        padded[: len(row)] = row
        mean = np.asarray(self._mean)
        count = np.asarray(self._count, dtype=np.float64)
        var = np.divide(np.asarray(self._m2), count, out=np.zeros(n), where=count > 0)
        std = np.sqrt(var)
        # Relative threshold: float rounding of identical values leaves a tiny m2.
        spread = std > 1e-12 * np.maximum(1.0, np.abs(mean))
        z: npt.NDArray[np.float64] = np.divide(padded - mean, std, out=np.zeros(n), where=spread)
        z[np.isnan(padded)] = 0.0  # imputed with the mean
        z[~spread] = 0.0
        return z

    def _project(self, row: npt.NDArray[np.float64]) -> Vector | None:
        z = self._standardise(row)
        if self._components is not None:
            n_features = self._components.shape[1]
            if len(z) > n_features:
                self._log_late_features()
            coords = self._components @ z[:n_features]
            out = np.zeros(self.dims)
            out[: len(coords)] = coords
        else:
            out = z @ self._projection
        if not np.any(out):
            return None
        return out.astype(np.float32)

    def _fit_pca(self) -> None:
        rows = np.stack([self._standardise(r) for r in self._warmup])
        # Centre on the sample (the running mean already nearly does; this makes it exact).
        rows = rows - rows.mean(axis=0)
        _, singular, vt = np.linalg.svd(rows, full_matrices=False)
        keep = int(min(self.dims, int(np.count_nonzero(singular > 1e-9)) or 1))
        components = vt[:keep]
        # Deterministic signs: largest absolute loading of each component positive.
        signs = np.sign(components[np.arange(keep), np.abs(components).argmax(axis=1)])
        signs[signs == 0] = 1.0
        self._components = components * signs[:, None]
        self.pca_version += 1
        self._warmup = []
        logger.info(
            "catalog PCA fitted on %d items: %d features -> %d components (version %d)",
            rows.shape[0],
            rows.shape[1],
            keep,
            self.pca_version,
        )

    def _log_full(self, name: Any) -> None:
        if not self._full_logged:
            self._full_logged = True
            logger.warning(
                "catalog feature %r ignored: %d feature names are registered, the most kept; "
                "later new names are ignored too",
                str(name)[:64],
                MAX_FEATURE_NAMES,
            )

    def _log_late_features(self) -> None:
        assert self._components is not None
        late = set(self.names[self._components.shape[1] :]) - self._late_names_logged
        if late:
            self._late_names_logged |= late
            logger.warning(
                "catalog features %s first seen after the PCA fit are ignored by the PCA "
                "basis; restart with a larger model.pca_warmup_items to include them",
                sorted(late),
            )


def _nan_to_none(row: npt.NDArray[np.float64]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in row.tolist()]
