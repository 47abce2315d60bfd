"""The fitted projection from the wide item sketch to the ``dims``-wide vectors the index holds.

Item state is a random-indexing sketch of ``model.sketch_dims`` (wide: its random
cross-user noise on cosines is about ``1/sqrt(sketch_dims)``). The index is built on
``model.dims`` vectors, obtained by projecting each sketch on the top ``dims`` principal
directions of the item sketch matrix (uncentred, like PureSVD): the shared taste structure
lives in a few directions, the random noise is spread evenly over all of them, so the
projection keeps the signal and drops most of the noise.

Rules (shared by the worker and the offline replay):

* **Version 0** is the truncation to the first ``dims`` coordinates (itself a smaller
  random-indexing sketch), used until the first fit.
* **Fit.** Rows are decayed to the newest event time among them (so they weigh by recent
  activity, as the cosines do), at most ``max_items`` rows are used (the highest decayed
  popularity, ties by item id), and the basis is the top ``dims`` eigenvectors of the
  ``sketch_dims x sketch_dims`` Gram matrix, each signed so its largest entry is positive.
  The result depends only on the set of rows, not on their order.
* **Refit** after ``model.projection_refit_updates`` item updates (see
  :class:`SketchProjector`). A new basis changes every projected vector: callers re-project
  all items and rebuild the index from them, and only ever compare vectors of one version.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_knn.config import ModelConfig
from stream_knn.embeddings.sketch import ItemState
from stream_knn.errors import DimensionError

__all__ = ["Projection", "SketchProjector", "fit_projection"]

logger = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

# Header of a serialised projection: format version, basis version, sketch dims, dims.
_HEADER = struct.Struct("<BQII")
_FORMAT_VERSION = 1
#: Rows stacked per step of a fit: the Gram product of a step releases the GIL, so a fit
#: in a worker's thread never holds it for one copy of every sketch.
_FIT_CHUNK = 4096


@dataclass(frozen=True)
class Projection:
    """A versioned linear map from ``sketch_dims`` to ``dims``.

    Attributes
    ----------
    matrix
        float32 array of shape ``(sketch_dims, dims)``; ``vector @ matrix`` projects.
    version
        0 for the truncation used before any fit, then 1, 2, ... per fit.

    Examples
    --------
    >>> p = Projection.truncation(4, 2)
    >>> p.apply(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)).tolist()
    [1.0, 2.0]
    """

    matrix: npt.NDArray[np.float32]
    version: int

    @classmethod
    def truncation(cls, sketch_dims: int, dims: int) -> Projection:
        """Version 0: keep the first ``dims`` coordinates of the sketch."""
        if not 1 <= dims <= sketch_dims:
            raise DimensionError(f"need 1 <= dims <= sketch_dims, got {dims} and {sketch_dims}")
        return cls(np.eye(sketch_dims, dims, dtype=np.float32), 0)

    @property
    def sketch_dims(self) -> int:
        """Input dimension."""
        return int(self.matrix.shape[0])

    @property
    def dims(self) -> int:
        """Output dimension."""
        return int(self.matrix.shape[1])

    def apply(self, vectors: npt.ArrayLike) -> Vector:
        """Project one sketch vector ``(sketch_dims,)`` or a matrix ``(n, sketch_dims)``.

        Raises
        ------
        DimensionError
            If the last axis is not ``sketch_dims`` long.
        """
        array = np.asarray(vectors, dtype=np.float32)
        if array.shape[-1:] != (self.sketch_dims,):
            raise DimensionError(
                f"sketch vector has shape {array.shape}, this projection takes "
                f"sketch_dims={self.sketch_dims}; was the item state written with another "
                "model.sketch_dims?"
            )
        return (array @ self.matrix).astype(np.float32, copy=False)

    def to_bytes(self) -> bytes:
        """Serialise as a 17-byte header and the float32 little-endian matrix (row-major)."""
        header = _HEADER.pack(_FORMAT_VERSION, self.version, self.sketch_dims, self.dims)
        return header + np.ascontiguousarray(self.matrix, dtype="<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Projection:
        """Read what :meth:`to_bytes` wrote.

        Raises
        ------
        DimensionError
            If the payload is truncated, of an unknown format or holds NaN/inf.
        """
        try:
            fmt, version, sketch_dims, dims = _HEADER.unpack_from(data)
        except struct.error:
            raise DimensionError("stored projection is truncated") from None
        if fmt != _FORMAT_VERSION:
            raise DimensionError(
                f"stored projection has format version {fmt}, this code reads {_FORMAT_VERSION}"
            )
        expected = _HEADER.size + 4 * sketch_dims * dims
        if len(data) != expected:
            raise DimensionError(
                f"stored projection has {len(data)} bytes, expected {expected} for "
                f"{sketch_dims} x {dims}"
            )
        matrix = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        if not np.isfinite(matrix).all():
            raise DimensionError("stored projection holds NaN or inf; the record is corrupt")
        return cls(matrix.reshape(sketch_dims, dims), int(version))


def fit_projection(
    states: Mapping[str, ItemState],
    *,
    dims: int,
    half_life_seconds: float,
    version: int,
    max_items: int,
) -> Projection:
    """Fit the top-``dims`` principal directions of the item sketches (see module rules).

    Parameters
    ----------
    states
        Item id -> sketch state; every vector has the same length ``sketch_dims``.
    dims
        Number of directions kept (``model.dims``).
    half_life_seconds
        ``model.half_life_seconds``: rows are decayed to the newest ``last_ts_ms``.
    version
        Version given to the result.
    max_items
        At most this many rows are used, the highest decayed popularity first.

    Returns
    -------
    Projection
        Orthonormal columns.

    Raises
    ------
    DimensionError
        If there are no states, ``dims`` exceeds the sketch width or the vectors differ
        in length.
    """
    if not states:
        raise DimensionError("cannot fit a projection on no item states")
    ids = sorted(states)
    sketch_dims = int(states[ids[0]].vector.shape[0])
    if not 1 <= dims <= sketch_dims:
        raise DimensionError(f"need 1 <= dims <= sketch_dims, got {dims} and {sketch_dims}")
    times = np.fromiter((states[i].last_ts_ms for i in ids), dtype=np.float64, count=len(ids))
    decay = np.exp2(-(times.max() - times) / (half_life_seconds * 1000.0))
    if len(ids) > max_items:
        popularity = decay * np.fromiter(
            (states[i].popularity for i in ids), dtype=np.float64, count=len(ids)
        )
        # Stable sort on -popularity keeps id order among ties (ids are sorted).
        keep = np.sort(np.argsort(-popularity, kind="stable")[:max_items])
        ids = [ids[j] for j in keep.tolist()]
        decay = decay[keep]
    gram = np.zeros((sketch_dims, sketch_dims), dtype=np.float64)
    for start in range(0, len(ids), _FIT_CHUNK):
        chunk = ids[start : start + _FIT_CHUNK]
        try:
            rows = np.stack([states[i].vector for i in chunk]).astype(np.float64)
        except ValueError:
            raise DimensionError("item sketch vectors differ in length") from None
        if rows.shape[1] != sketch_dims:
            raise DimensionError("item sketch vectors differ in length")
        rows *= decay[start : start + len(chunk), None]
        gram += rows.T @ rows
    _, eigenvectors = np.linalg.eigh(gram)
    # eigh sorts eigenvalues ascending: the last columns are the top directions.
    basis = eigenvectors[:, ::-1][:, :dims]
    strongest = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[strongest, np.arange(dims)])
    basis *= np.where(signs == 0, 1.0, signs)
    return Projection(basis.astype(np.float32), version)


class SketchProjector:
    """Wide item states, the current projection, and when to refit it.

    The one object both the offline model and the worker's vector replica keep: ``set``
    each item state as it arrives, read ``project`` for the ``dims``-wide behaviour vector
    that is blended and indexed, and when ``refit_due`` call ``refit`` and re-project every
    item (``projected()``).

    Parameters
    ----------
    config
        The ``[model]`` settings (``sketch_dims``, ``dims``, ``half_life_seconds``,
        ``projection_refit_updates``, ``projection_fit_max_items``).

    Examples
    --------
    >>> from stream_knn.config import ModelConfig
    >>> sp = SketchProjector(ModelConfig(dims=2, sketch_dims=4, projection_refit_updates=1))
    >>> v = np.array([0.0, 0.0, 3.0, 4.0], dtype=np.float32)
    >>> sp.set("a", ItemState(v, 0, 1, 1.0))
    >>> sp.project("a").tolist(), sp.refit_due
    ([0.0, 0.0], True)
    >>> sp.refit()
    True
    >>> sp.projection.version, round(float(np.linalg.norm(sp.project("a"))), 4)
    (1, 5.0)
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.projection = Projection.truncation(config.sketch_dims, config.dims)
        self._states: dict[str, ItemState] = {}
        self._updates = 0

    def __len__(self) -> int:
        """Number of items with a state."""
        return len(self._states)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._states

    def __iter__(self) -> Iterator[str]:
        """Ids of the items with a state, in order of first arrival."""
        return iter(list(self._states))

    def get(self, item_id: str) -> ItemState | None:
        """The item's wide state, ``None`` if it has none."""
        return self._states.get(item_id)

    def set(self, item_id: str, state: ItemState) -> None:
        """Store the item's new state and count one update towards the next refit.

        Raises
        ------
        DimensionError
            If the state is not ``sketch_dims`` wide.
        """
        if state.vector.shape != (self.config.sketch_dims,):
            raise DimensionError(
                f"item state has shape {state.vector.shape}, expected "
                f"({self.config.sketch_dims},) for model.sketch_dims"
            )
        self._states[item_id] = state
        self._updates += 1

    def remove(self, item_id: str) -> bool:
        """Forget the item; returns whether it had a state."""
        return self._states.pop(item_id, None) is not None

    def project(self, item_id: str) -> Vector | None:
        """The item's ``dims``-wide behaviour vector (not normalised), ``None`` if unknown."""
        state = self._states.get(item_id)
        return None if state is None else self.projection.apply(state.vector)

    def project_many(self, item_ids: Sequence[str]) -> tuple[Vector, npt.NDArray[np.bool_]]:
        """The behaviour vectors of ``item_ids`` in one matrix product, and which exist.

        Row ``i`` is :meth:`project` of ``item_ids[i]``; the row of an item without a state
        is zero and flagged ``False``.
        """
        n = len(item_ids)
        states = [self._states.get(i) for i in item_ids]
        known = np.fromiter((s is not None for s in states), dtype=np.bool_, count=n)
        sketches = np.zeros((n, self.config.sketch_dims), dtype=np.float32)
        if known.any():
            sketches[known] = np.stack([s.vector for s in states if s is not None])
        return self.projection.apply(sketches), known

    def projected(self) -> Iterator[tuple[str, Vector]]:
        """Every item and its projected behaviour vector (after a refit: re-index them all)."""
        for item_id, state in self._states.items():
            yield item_id, self.projection.apply(state.vector)

    @property
    def refit_due(self) -> bool:
        """Whether ``projection_refit_updates`` updates arrived since the last fit."""
        return bool(self._states) and self._updates >= self.config.projection_refit_updates

    def refit(self) -> bool:
        """Fit a new projection on the current states; returns whether one was fitted.

        Resets the update count. When ``sketch_dims == dims`` the map stays the truncation
        (the identity): a rotation would not change any cosine.
        """
        self._updates = 0
        cfg = self.config
        if not self._states or cfg.sketch_dims == cfg.dims:
            return False
        self.projection = fit_projection(
            self._states,
            dims=cfg.dims,
            half_life_seconds=cfg.half_life_seconds,
            version=self.projection.version + 1,
            max_items=cfg.projection_fit_max_items,
        )
        logger.debug("projection %d fitted on %d items", self.projection.version, len(self._states))
        return True
