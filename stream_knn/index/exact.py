"""Exact brute-force search with numpy: the recall oracle and the right choice for small catalogs.

Scores come from batched float32 matrix products (BLAS), which at tens of dimensions
beat tree structures up to hundreds of thousands of items.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_knn.errors import CorruptIndexError, DimensionError, IndexError_
from stream_knn.index.base import (
    METRICS,
    KnownIds,
    Metric,
    Neighbours,
    as_matrix,
    as_query,
    check_ids,
    check_metric,
    load_ids,
    write_ids,
)

__all__ = ["BLOCK_CELLS", "ExactIndex", "exact_scores", "exclusion_cells", "top_k", "top_k_rows"]

_VECTORS_FILE = "vectors.npy"
#: Queries scored per matrix product in ``search_batch``; bounds the score block's memory.
_BATCH_ROWS = 256
#: Score cells (queries x items) per block of a batched search: at most 16 MiB of scores.
BLOCK_CELLS = 4 * 1024 * 1024
#: Rows per chunk of the manhattan distance, which has no matrix-product form.
_MANHATTAN_ROWS = 8192


def _unit_rows(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # A zero vector has no direction: it keeps score 0 against everything.
    norms[norms == 0.0] = 1.0
    return np.ascontiguousarray(matrix / norms, dtype=np.float32)


def _neg_euclidean(
    matrix: npt.NDArray[np.float32],
    sq_norms: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    # |m - q|^2 = |m|^2 - 2 m.q + |q|^2 turns the distances into one matrix product.
    qq = np.einsum("ij,ij->i", queries, queries)
    d2 = qq[:, None] - 2.0 * (queries @ matrix.T) + sq_norms[None, :]
    np.maximum(d2, 0.0, out=d2)
    return np.asarray(-np.sqrt(d2), dtype=np.float32)


def exact_scores(
    matrix: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], metric: str
) -> npt.NDArray[np.float32]:
    """Scores (higher is nearer) of every row of ``matrix`` for each query row.

    Parameters
    ----------
    matrix
        Item vectors, shape ``(n, dims)``.
    queries
        Query vectors, shape ``(q, dims)``.
    metric
        One of ``angular``, ``euclidean``, ``dot``, ``manhattan``.

    Returns
    -------
    numpy.ndarray
        Shape ``(q, n)``: cosine similarity, dot product or negated distance.

    Examples
    --------
    >>> m = np.array([[1, 0], [0, 2]], dtype=np.float32)
    >>> exact_scores(m, np.array([[3, 0]], dtype=np.float32), "euclidean").tolist()
    [[-2.0, -3.605551242828369]]
    """
    if metric == "dot":
        return np.asarray(queries @ matrix.T, dtype=np.float32)
    if metric == "angular":
        return np.asarray(_unit_rows(queries) @ _unit_rows(matrix).T, dtype=np.float32)
    if metric == "euclidean":
        return _neg_euclidean(matrix, np.einsum("ij,ij->i", matrix, matrix), queries)
    if metric == "manhattan":
        out = np.empty((len(queries), len(matrix)), dtype=np.float32)
        for qi, q in enumerate(queries):
            for start in range(0, len(matrix), _MANHATTAN_ROWS):
                block = matrix[start : start + _MANHATTAN_ROWS]
                out[qi, start : start + len(block)] = -np.abs(block - q).sum(axis=1)
        return out
    raise ValueError(f"unknown metric {metric!r}")


def top_k(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    """Row positions of the ``k`` highest ``scores`` (1-d), best first, ties by position."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    order = np.lexsort((part, -scores[part]))
    return part[order]


def neighbour_rows(
    ids: Sequence[str], best: npt.NDArray[np.intp], picked: npt.NDArray[np.float32]
) -> list[Neighbours]:
    """``(ids[best[r, j]], picked[r, j])`` rows, without the ``-inf`` (hidden) entries.

    Rows are sorted best first, so only a row ending in ``-inf`` has any: the pairs are
    made in one pass over the whole block and only those rows are filtered.
    """
    n, k = best.shape
    names = [ids[p] for p in best.ravel().tolist()]
    pairs = list(zip(names, picked.ravel().tolist(), strict=True))
    out = [pairs[i * k : (i + 1) * k] for i in range(n)]
    if k:
        for i in np.flatnonzero(picked[:, -1] == -np.inf).tolist():
            out[i] = [pair for pair in out[i] if pair[1] != -np.inf]
    return out


def exclusion_cells(
    positions: Mapping[str, int], excludes: Sequence[Collection[str]]
) -> tuple[list[int], list[int]]:
    """The ``(row, column)`` cells of every row's excluded items that ``positions`` holds,
    for one assignment over a block of scores (one per row cost more than the lookups)."""
    at_rows: list[int] = []
    at_cols: list[int] = []
    for row, exclude in enumerate(excludes):
        for item in exclude:
            pos = positions.get(item)
            if pos is not None:
                at_rows.append(row)
                at_cols.append(pos)
    return at_rows, at_cols


#: :func:`top_k_rows` splits a row into this many blocks per item asked for.
_BLOCKS_PER_K = 8


def top_k_rows(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    """:func:`top_k` of every row of ``scores`` (2-d), ``1 <= k <= scores.shape[1]``.

    Long rows are cut into blocks first: the k-th largest block maximum is a lower bound
    of the row's k-th score, so only the few scores at or above it are sorted (a batch of
    lists over 5k items: 16 us a row with a partition of every row, about a third here).
    """
    b, n = scores.shape
    blocks = _BLOCKS_PER_K * k
    if k >= n or n < 4 * blocks:
        return _top_k_rows_partition(scores, k)
    starts = np.arange(0, n, -(-n // blocks))
    block_max = np.maximum.reduceat(scores, starts, axis=1)
    m = block_max.shape[1]
    floor = np.partition(block_max, m - k, axis=1)[:, m - k]
    # One flat pass (2-d nonzero costs ten times more here).
    rows, cols = np.divmod(np.flatnonzero(scores >= floor[:, None]), n)
    counts = np.bincount(rows, minlength=b)
    if counts.min() < k:  # only NaN scores can leave a row short
        return _top_k_rows_partition(scores, k)
    # Best first, ties by position, row by row; then the first k of each row.
    order = np.lexsort((cols, -scores[rows, cols], rows))
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.asarray(cols[order][first[:, None] + np.arange(k)], dtype=np.intp)


def _top_k_rows_partition(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape)
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.asarray(np.take_along_axis(part, order, axis=1), dtype=np.intp)


class ExactIndex:
    """Brute-force search over a float32 matrix; exact for every metric.

    Parameters
    ----------
    dims
        Number of values per vector.
    metric
        ``angular``, ``euclidean``, ``dot`` or ``manhattan``.

    Examples
    --------
    >>> index = ExactIndex(2, "dot")
    >>> index.build(["a", "b"], np.array([[1, 0], [0, 2]], dtype=np.float32))
    >>> index.search(np.array([0, 1], dtype=np.float32), 1)
    [('b', 2.0)]
    """

    backend = "exact"

    def __init__(self, dims: int, metric: Metric) -> None:
        self.dims = int(dims)
        self.metric: Metric = check_metric(metric, METRICS, self.backend)
        self._ids: Sequence[str] = []
        self._positions: Mapping[str, int] = {}
        self._matrix = np.empty((0, self.dims), dtype=np.float32)
        # Rows the metric scores against (unit rows for angular), computed once.
        self._scored = self._matrix
        self._sq_norms = np.empty(0, dtype=np.float32)
        self._built = False

    @property
    def params(self) -> Mapping[str, Any]:
        return {}

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        if self._built:
            raise IndexError_("an index is built once; make a new index to rebuild")
        matrix = as_matrix(vectors, self.dims)
        self._set(KnownIds.of(check_ids(ids, len(matrix))), matrix)

    @classmethod
    def over(cls, known: KnownIds, matrix: npt.NDArray[np.float32], metric: Metric) -> ExactIndex:
        """An exact index of ``matrix`` whose rows are ``known.ids``, trusted as they are
        (the ids and positions of a version already served, shared, not copied)."""
        index = cls(matrix.shape[1], metric)
        index._set(known, np.asarray(matrix, dtype=np.float32))
        return index

    def _set(self, known: KnownIds, matrix: npt.NDArray[np.float32]) -> None:
        self._ids = known.ids
        self._positions = known.positions
        self._matrix = matrix
        self._scored = _unit_rows(matrix) if self.metric == "angular" else matrix
        self._sq_norms = np.einsum("ij,ij->i", matrix, matrix)
        self._built = True

    def _scores(self, queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.metric == "angular":
            # Rows are already unit length; only the queries need normalising.
            return np.asarray(_unit_rows(queries) @ self._scored.T, dtype=np.float32)
        if self.metric == "euclidean":
            return _neg_euclidean(self._scored, self._sq_norms, queries)
        return exact_scores(self._scored, queries, self.metric)

    def _select(
        self, scores: npt.NDArray[np.float32], k: int, exclude: Collection[str]
    ) -> Neighbours:
        hidden = list({self._positions[i] for i in exclude if i in self._positions})
        if hidden:
            scores[hidden] = -np.inf
            k = min(k, len(scores) - len(hidden))
        best = top_k(scores, k)
        return [(self._ids[p], float(scores[p])) for p in best]

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours:
        q = as_query(query, self.dims)
        if k <= 0 or not self._ids:
            return []
        return self._select(self._scores(q[None, :])[0], k, exclude)

    def search_batch(
        self, queries: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> list[Neighbours]:
        """:meth:`search` for each row of ``queries`` (shape ``(q, dims)``), batched.

        One matrix product per block of queries instead of one per query.
        """
        qs = as_matrix(queries, self.dims)
        if k <= 0 or not self._ids:
            return [[] for _ in range(len(qs))]
        out: list[Neighbours] = []
        for start in range(0, len(qs), _BATCH_ROWS):
            block = self._scores(qs[start : start + _BATCH_ROWS])
            out.extend(self._select(row, k, exclude) for row in block)
        return out

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
        """:meth:`search` of each row of ``queries`` with ``excludes[i]`` and every
        ``shared`` id excluded, batched (see :func:`~stream_knn.index.base.search_many`).

        One matrix product and one row-wise partition per block of queries; the shared
        exclusions are looked up once per call, not once per query. ``executor`` and
        ``threads`` are not used: the matrix product already runs on BLAS threads.
        """
        qs = as_matrix(queries, self.dims)
        if len(excludes) != len(qs):
            raise ValueError(f"got {len(excludes)} exclusion sets for {len(qs)} queries")
        if k <= 0 or not self._ids:
            return [[] for _ in range(len(qs))]
        best, picked = self.top_many(qs, k, excludes, shared, hidden_rows)
        return neighbour_rows(self._ids, best, picked)

    def top_many(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        excludes: Sequence[Collection[str]],
        shared: Sequence[Collection[str]] = (),
        hidden_rows: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        """:meth:`search_many` as arrays: each row's positions (build order) and scores,
        best first, ``min(k, len(self))`` of them (``-inf`` where a row ran out of items).
        ``queries`` are checked by the caller. ``hidden_rows`` may also be one mask per
        query (shape ``(len(queries), len(self))``)."""
        n = len(self._ids)
        kk = min(k, n)
        if kk <= 0:
            return np.empty((len(queries), 0), np.intp), np.empty((len(queries), 0), np.float32)
        positions = self._positions
        per_row = hidden_rows if hidden_rows is not None and hidden_rows.ndim == 2 else None
        if per_row is not None:
            common = np.empty(0, dtype=np.intp)
        elif hidden_rows is not None:
            common = np.flatnonzero(hidden_rows)
        else:
            common = np.array(
                sorted({positions[i] for part in shared for i in part if i in positions}),
                dtype=np.intp,
            )
        rows = max(1, min(_BATCH_ROWS, BLOCK_CELLS // n))
        bests, pickeds = [], []
        for start in range(0, len(queries), rows):
            scores = self._scores(queries[start : start + rows])
            if len(common):
                scores[:, common] = -np.inf
            if per_row is not None:
                scores[per_row[start : start + rows]] = -np.inf
            at_rows, at_cols = exclusion_cells(positions, excludes[start : start + rows])
            if at_cols:
                scores[at_rows, at_cols] = -np.inf
            best = top_k_rows(scores, kk)
            bests.append(best)
            pickeds.append(np.take_along_axis(scores, best, axis=1))
        if len(bests) == 1:
            return bests[0], pickeds[0]
        return np.concatenate(bests), np.concatenate(pickeds)

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None:
        pos = self._positions.get(item_id)
        return None if pos is None else np.array(self._matrix[pos])

    def save(self, directory: Path) -> None:
        with open(directory / _VECTORS_FILE, "wb") as fh:
            np.save(fh, self._matrix, allow_pickle=False)
        write_ids(directory, self._ids)

    def load(self, directory: Path, known: KnownIds | None = None) -> None:
        known = load_ids(directory, known)
        ids = known.ids
        path = directory / _VECTORS_FILE
        try:
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CorruptIndexError(f"{path} is missing; the index version is incomplete") from None
        except ValueError as exc:
            raise CorruptIndexError(f"{path} is not a readable .npy matrix: {exc}") from None
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != len(ids):
            raise CorruptIndexError(
                f"{path} holds {matrix.dtype} {matrix.shape}, expected float32 "
                f"({len(ids)}, {self.dims})"
            )
        if matrix.shape[1] != self.dims:
            raise DimensionError(
                f"{path} holds vectors of {matrix.shape[1]} values, expected {self.dims}"
            )
        self._set(known, matrix)
