"""The nearest-neighbour index contract every backend implements, and its shared helpers.

An index is built once from a snapshot of item vectors and never mutated afterwards
(Annoy cannot add items after ``build``); freshness comes from rebuilding and from the
exact delta kept by the index manager.

Scores are "higher is nearer" for every metric so results of different sources can be
merged: ``angular`` gives the cosine similarity, ``dot`` the dot product, ``euclidean``
and ``manhattan`` the negated distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson

from stream_knn.errors import ConfigError, CorruptIndexError, DimensionError, IndexError_

if TYPE_CHECKING:
    from stream_knn.config import IndexConfig

__all__ = [
    "BACKENDS",
    "IDS_FILE",
    "METRICS",
    "Index",
    "Metric",
    "Neighbours",
    "as_matrix",
    "as_query",
    "check_ids",
    "check_metric",
    "create_index",
    "filtered_search",
    "make_index",
    "read_ids",
    "same_vector",
    "write_ids",
]

Metric = Literal["angular", "euclidean", "dot", "manhattan"]
METRICS: tuple[str, ...] = get_args(Metric)
BACKENDS: tuple[str, ...] = ("annoy", "exact", "hnsw")

#: Search result: (item id, score) pairs, best first.
Neighbours = list[tuple[str, float]]

#: Every backend writes its ids, in build order, to this file beside its own files.
IDS_FILE = "ids.json"


@runtime_checkable
class Index(Protocol):
    """An immutable k-nearest-neighbour index over string item ids."""

    #: Backend name as written in configs and saved metadata ("annoy", "exact", "hnsw").
    backend: str
    metric: Metric
    dims: int

    @property
    def params(self) -> Mapping[str, Any]:
        """Backend parameters (e.g. ``n_trees``) that rebuild an equal, empty index."""

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        """Index ``vectors`` (shape ``(len(ids), dims)``); may be called once."""

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours:
        """The ``k`` items nearest ``query``, best first, never an id in ``exclude``."""

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None:
        """The indexed vector of ``item_id`` (unit length for ``angular`` in some
        backends), or ``None`` when the id is not indexed."""

    def save(self, directory: Path) -> None:
        """Write the index files into ``directory`` (which exists and is empty)."""

    def load(self, directory: Path) -> None:
        """Read (memory-map where the backend can) what :meth:`save` wrote."""

    def __len__(self) -> int:
        """Number of indexed items."""

    @property
    def ids(self) -> Sequence[str]:
        """Indexed item ids, in build order."""


def check_metric(metric: str, supported: Collection[str], backend: str) -> Metric:
    """``metric`` if ``backend`` supports it, else a :class:`ConfigError` listing the valid ones."""
    if metric not in supported:
        raise ConfigError(
            f"index.metric = {metric!r} is not supported by the {backend!r} backend; "
            f"valid values: {', '.join(supported)}"
        )
    return metric  # type: ignore[return-value]


def as_matrix(vectors: Any, dims: int) -> npt.NDArray[np.float32]:
    """``vectors`` as a C-contiguous float32 ``(n, dims)`` matrix.

    Raises
    ------
    DimensionError
        If the rows do not all have ``dims`` values or any value is NaN or infinite.
    """
    try:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise DimensionError(
            f"vectors must all have {dims} values (mixed lengths?): {exc}"
        ) from None
    if matrix.size == 0 and matrix.ndim <= 2:
        return np.empty((0, dims), dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dims:
        raise DimensionError(
            f"expected vectors of shape (n, {dims}), got shape {matrix.shape}; "
            "every vector of one index must have the index's dims"
        )
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise DimensionError(f"vector at row {bad} holds NaN or infinite values")
    return matrix


def as_query(query: Any, dims: int) -> npt.NDArray[np.float32]:
    """``query`` as a float32 vector of ``dims`` finite values, else :class:`DimensionError`."""
    try:
        vector = np.asarray(query, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise DimensionError(f"query must be {dims} numbers: {exc}") from None
    if vector.shape != (dims,):
        raise DimensionError(f"query has shape {vector.shape}, the index expects ({dims},)")
    if not np.isfinite(vector).all():
        raise DimensionError("query holds NaN or infinite values")
    return vector


def check_ids(ids: Sequence[str], n: int) -> list[str]:
    """``ids`` as a list after checking there is one unique string id per vector."""
    out = [str(i) for i in ids]
    if len(out) != n:
        raise IndexError_(f"got {len(out)} ids for {n} vectors; pass one id per vector")
    if len(set(out)) != len(out):
        raise IndexError_("item ids must be unique within one index build")
    return out


def write_ids(directory: Path, ids: Sequence[str]) -> None:
    """Write ``ids`` (build order) to ``directory / IDS_FILE``."""
    (directory / IDS_FILE).write_bytes(orjson.dumps(list(ids)))


def read_ids(directory: Path) -> list[str]:
    """Read what :func:`write_ids` wrote; :class:`CorruptIndexError` if missing or invalid."""
    path = directory / IDS_FILE
    try:
        ids = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptIndexError(f"{path} is missing; the index version is incomplete") from None
    except orjson.JSONDecodeError as exc:
        raise CorruptIndexError(f"{path} is not a JSON array of ids: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CorruptIndexError(f"{path} is not a JSON array of string ids")
    return ids


def filtered_search(
    fetch: Callable[[int], Neighbours], k: int, exclude: Collection[str], total: int
) -> Neighbours:
    """The best ``k`` of ``fetch(n)`` not in ``exclude``, over-fetching as needed.

    ``fetch(n)`` returns up to ``n`` results best first from an index of ``total``
    items. Starts at ``k`` plus the excluded count (capped at 256, since an exclusion set
    can be large while few of its ids rank high; a user's own recent items, though, are
    typically the nearest to that user's query, so all of them are expected on top) and
    doubles ``n`` until ``k`` results survive or the index is exhausted, so exclusion
    never shortens a result needlessly.
    """
    if k <= 0 or total == 0:
        return []
    n = min(total, k + min(len(exclude), 256))
    while True:
        found = fetch(n)
        kept = [(i, s) for i, s in found if i not in exclude] if exclude else found
        if len(kept) >= k or n >= total:
            return kept[:k]
        n = min(total, n * 2)


def same_vector(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], metric: str) -> bool:
    """Whether ``a`` and ``b`` are the same vector as far as ``metric`` can tell.

    Angular backends may store unit vectors, so angular vectors compare by direction.
    """
    if a.shape != b.shape:
        return False
    if metric == "angular":
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 or nb == 0.0:
            return na == nb
        return bool(np.allclose(a / na, b / nb, rtol=1e-5, atol=1e-6))
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-7))


def create_index(backend: str, metric: str, dims: int, params: Mapping[str, Any]) -> Index:
    """An empty index of ``backend`` with saved ``params`` (as in ``meta.json``).

    Backends are imported here, lazily, so the optional ``hnswlib`` is only needed by
    those who choose it.
    """
    if dims < 1 or not math.isfinite(dims):
        raise DimensionError(f"index dims must be >= 1, got {dims}")
    if backend == "annoy":
        from stream_knn.index.annoy_index import AnnoyIndex

        return AnnoyIndex(dims, metric, **params)  # type: ignore[arg-type]
    if backend == "exact":
        from stream_knn.index.exact import ExactIndex

        return ExactIndex(dims, metric, **params)  # type: ignore[arg-type]
    if backend == "hnsw":
        from stream_knn.index.hnsw import HnswIndex

        return HnswIndex(dims, metric, **params)  # type: ignore[arg-type]
    raise ConfigError(f"index.backend = {backend!r} is not valid; valid values: {BACKENDS}")


def make_index(config: IndexConfig, dims: int) -> Index:
    """An empty index as ``config`` describes it, for vectors of ``dims`` values."""
    params: dict[str, Any]
    if config.backend == "annoy":
        params = {
            "n_trees": config.n_trees,
            "search_k": config.search_k,
            "build_threads": config.build_threads,
        }
    elif config.backend == "hnsw":
        params = {
            "m": config.hnsw_m,
            "ef_construction": config.hnsw_ef_construction,
            "ef_search": config.hnsw_ef_search,
            "build_threads": config.build_threads,
        }
    else:
        params = {}
    return create_index(config.backend, config.metric, dims, params)
