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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
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
    "AutoIndex",
    "BatchSearch",
    "HiddenIds",
    "Index",
    "KnownIds",
    "Metric",
    "Neighbours",
    "as_matrix",
    "as_query",
    "check_ids",
    "check_metric",
    "create_index",
    "filtered_search",
    "load_ids",
    "make_index",
    "read_ids",
    "same_vector",
    "search_many",
    "write_ids",
]

Metric = Literal["angular", "euclidean", "dot", "manhattan"]
METRICS: tuple[str, ...] = get_args(Metric)
BACKENDS: tuple[str, ...] = ("auto", "annoy", "exact", "hnsw")

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

    def load(self, directory: Path, known: KnownIds | None = None) -> None:
        """Read (memory-map where the backend can) what :meth:`save` wrote.

        ``known`` are the ids the files were written with, when the caller has them (the
        process that built the version): the ids file is then not read again.
        """

    def __len__(self) -> int:
        """Number of indexed items."""

    @property
    def ids(self) -> Sequence[str]:
        """Indexed item ids, in build order."""


@runtime_checkable
class BatchSearch(Protocol):
    """A backend that answers many queries at once faster than one by one."""

    def search_many(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        excludes: Sequence[Collection[str]],
        shared: Sequence[Collection[str]] = (),
        executor: Executor | None = None,
        threads: int = 1,
        hidden_rows: npt.NDArray[np.bool_] | None = None,
    ) -> list[Neighbours]:
        """What :func:`search_many` returns for this index."""


class HiddenIds(Collection[str]):
    """The ids one query skips: its own exclusions plus ``shared`` ones (a view, no copy).

    ``len`` sizes the first over-fetch of :func:`filtered_search`: every own exclusion (a
    user's recent items rank high), but at most ``2 * k`` of the shared ids, which may be
    thousands (the items changed since a build) of which few rank high; a short result
    fetches again, wider.
    """

    __slots__ = ("_k", "_own", "_shared")

    def __init__(self, own: Collection[str], shared: Sequence[Collection[str]], k: int) -> None:
        self._own, self._shared, self._k = own, shared, k

    def __contains__(self, item: object) -> bool:
        if item in self._own:
            return True
        # A loop, not any() over a generator: this runs for every fetched candidate.
        for part in self._shared:  # noqa: SIM110
            if item in part:
                return True
        return False

    def __len__(self) -> int:
        return len(self._own) + min(sum(len(part) for part in self._shared), 2 * self._k)

    def without(self, found: Neighbours) -> Neighbours:
        """``found`` less the hidden ids: the membership tests inlined, no call per id."""
        own = self._own
        if len(self._shared) == 2:
            a, b = self._shared
            return [(i, s) for i, s in found if i not in own and i not in a and i not in b]
        return [(i, s) for i, s in found if i not in self]

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in (self._own, *self._shared):
            for item in part:
                if item not in seen:
                    seen.add(item)
                    yield item


def search_many(
    index: Index,
    queries: npt.NDArray[np.float32],
    k: int,
    excludes: Sequence[Collection[str]],
    shared: Sequence[Collection[str]] = (),
    executor: Executor | None = None,
    threads: int = 1,
    hidden_rows: npt.NDArray[np.bool_] | None = None,
) -> list[Neighbours]:
    """``index.search(queries[i], k, excludes[i] + shared)`` for every row ``i``, batched.

    A :class:`BatchSearch` backend answers all rows itself (the exact backend: one matrix
    product). Any other is asked row by row, the rows split into ``threads`` contiguous
    parts: all but the last are searched on ``executor`` while the calling thread searches
    the last, which pays off for backends that release the GIL while searching (Annoy).
    The results are those of the row-by-row searches, in row order. ``hidden_rows``, if
    given, is ``shared`` as a mask over the index's build order, kept by the caller: a
    batch backend uses it instead of looking every shared id up.
    """
    if len(excludes) != len(queries):
        raise ValueError(f"got {len(excludes)} exclusion sets for {len(queries)} queries")
    if isinstance(index, BatchSearch):
        return index.search_many(queries, k, excludes, shared, executor, threads, hidden_rows)

    def run(start: int, stop: int) -> list[Neighbours]:
        return [
            index.search(queries[i], k, HiddenIds(excludes[i], shared, k))
            for i in range(start, stop)
        ]

    n = len(queries)
    parts = min(threads, n)
    if executor is None or parts <= 1:
        return run(0, n)
    bounds = [n * j // parts for j in range(parts + 1)]
    futures = [executor.submit(run, bounds[j], bounds[j + 1]) for j in range(parts - 1)]
    last = run(bounds[-2], bounds[-1])
    out: list[Neighbours] = []
    for future in futures:
        out.extend(future.result())
    out.extend(last)
    return out


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


@dataclass(frozen=True)
class KnownIds:
    """The ids of a version in build order and their positions, as its builder has them.

    Handed to :meth:`Index.load` by the process that built the version, so a load of a
    large version neither parses its ids file nor rebuilds the position map (both are
    read-only once made, and shared, not copied).
    """

    ids: Sequence[str]
    positions: Mapping[str, int]

    @classmethod
    def of(cls, ids: Sequence[str]) -> KnownIds:
        return cls(ids, {item: pos for pos, item in enumerate(ids)})


def load_ids(directory: Path, known: KnownIds | None) -> KnownIds:
    """``known``, or the ids file of ``directory`` with its position map."""
    return KnownIds.of(read_ids(directory)) if known is None else known


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
        if isinstance(exclude, HiddenIds):
            kept = exclude.without(found)
        else:
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


class AutoIndex:
    """Exact search up to ``exact_max_items`` items, Annoy above; chosen at :meth:`build`.

    Built, it is the chosen index (``backend``, ``params``, files and answers are that
    backend's), so a saved version loads as a plain ``exact`` or ``annoy`` index.

    Parameters
    ----------
    dims, metric
        As for every backend.
    exact_max_items
        The largest catalog searched exactly (``index.exact_max_items``).
    annoy
        Annoy's parameters (``n_trees``, ``search_k``, ``build_threads``) for larger ones.

    Examples
    --------
    >>> index = AutoIndex(2, "dot", exact_max_items=10)
    >>> index.build(["a", "b"], np.array([[1, 0], [0, 2]], dtype=np.float32))
    >>> index.backend, index.search(np.array([0, 1], dtype=np.float32), 1)
    ('exact', [('b', 2.0)])
    """

    def __init__(self, dims: int, metric: Metric, exact_max_items: int = 0, **annoy: Any) -> None:
        self.dims = int(dims)
        self.metric: Metric = check_metric(metric, METRICS, "auto")
        self.backend = "auto"
        self.exact_max_items = int(exact_max_items)
        self._annoy = dict(annoy)
        self._inner: Index | None = None

    @property
    def chosen(self) -> Index | None:
        """The built (or loaded) index, ``None`` before."""
        return self._inner

    @property
    def params(self) -> Mapping[str, Any]:
        if self._inner is not None:
            return self._inner.params
        return {"exact_max_items": self.exact_max_items, **self._annoy}

    @property
    def ids(self) -> Sequence[str]:
        return () if self._inner is None else self._inner.ids

    def __len__(self) -> int:
        return 0 if self._inner is None else len(self._inner)

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        if self._inner is not None:
            raise IndexError_("an index is built once; make a new index to rebuild")
        exact = len(ids) <= self.exact_max_items
        inner = create_index(
            "exact" if exact else "annoy", self.metric, self.dims, {} if exact else self._annoy
        )
        inner.build(ids, vectors)
        self._inner, self.backend = inner, inner.backend

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours:
        if self._inner is None:
            as_query(query, self.dims)
            return []
        return self._inner.search(query, k, exclude)

    def search_many(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        excludes: Sequence[Collection[str]],
        shared: Sequence[Collection[str]] = (),
        executor: Executor | None = None,
        threads: int = 1,
        hidden_rows: npt.NDArray[np.bool_] | None = None,
    ) -> list[Neighbours]:
        """:func:`search_many` of the chosen index."""
        if self._inner is None:
            return [[] for _ in range(len(queries))]
        return search_many(
            self._inner, queries, k, excludes, shared, executor, threads, hidden_rows
        )

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None:
        return None if self._inner is None else self._inner.vector(item_id)

    def save(self, directory: Path) -> None:
        if self._inner is None:
            raise IndexError_("build the index before saving it")
        self._inner.save(directory)

    def load(self, directory: Path, known: KnownIds | None = None) -> None:
        # The backend that wrote the files is recognised by its main file.
        backend = "annoy" if (directory / "index.ann").is_file() else "exact"
        params = self._annoy if backend == "annoy" else {}
        inner = create_index(backend, self.metric, self.dims, params)
        inner.load(directory, known)
        self._inner, self.backend = inner, inner.backend


def create_index(backend: str, metric: str, dims: int, params: Mapping[str, Any]) -> Index:
    """An empty index of ``backend`` with saved ``params`` (as in ``meta.json``).

    Backends are imported here, lazily, so the optional ``hnswlib`` is only needed by
    those who choose it.
    """
    if dims < 1 or not math.isfinite(dims):
        raise DimensionError(f"index dims must be >= 1, got {dims}")
    if backend == "auto":
        return AutoIndex(dims, metric, **params)  # type: ignore[arg-type]
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
    annoy = {
        "n_trees": config.n_trees,
        "search_k": config.search_k,
        "build_threads": config.build_threads,
    }
    if config.backend == "annoy":
        params = annoy
    elif config.backend == "auto":
        params = {"exact_max_items": config.exact_max_items, **annoy}
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
