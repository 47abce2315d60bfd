"""The index lifecycle: current item vectors, a live immutable index, an exact delta, rebuilds.

Searches merge the live index (built from a snapshot) with an exact numpy search over the
items changed since that snapshot, so a fresh or changed item is found before the next
build and a deleted one never comes back. Builds run in a background thread from a
snapshot: a child process builds the index and writes it as a new version of the
:class:`~stream_knn.index.store.IndexStore` (see :mod:`stream_knn.index.builder`), and the
version is memory-mapped and swapped in atomically, so no build holds this process's GIL.

Feed the current vectors with :meth:`IndexManager.upsert_many` (or
:meth:`IndexManager.upsert`) before or right after
:meth:`IndexManager.start`: items of a warm-started version that are never upserted are
served until the next build, which is made from the upserted vectors only.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from stream_knn.config import IndexConfig
from stream_knn.errors import CorruptIndexError, DimensionError, IndexError_, StreamKnnError
from stream_knn.index.base import (
    AutoIndex,
    HiddenIds,
    Index,
    KnownIds,
    Neighbours,
    as_matrix,
    as_query,
    search_many,
)
from stream_knn.index.builder import BuildJob, BuildProcess, VersionWriteError, build_version
from stream_knn.index.exact import (
    BLOCK_CELLS,
    ExactIndex,
    exact_scores,
    exclusion_cells,
    neighbour_rows,
    top_k,
    top_k_rows,
)
from stream_knn.index.recall import RecallSampler
from stream_knn.index.store import IndexStore, VersionInfo

__all__ = ["IndexManager"]

logger = logging.getLogger(__name__)

#: Recall samples averaged by :meth:`IndexManager.sampled_recall`.
_RECALL_WINDOW = 1000
#: The builder thread looks at the PINNED file at least this often, seconds.
_MAX_TICK_SECONDS = 1.0
#: Rows copied per step when a snapshot is stacked: the GIL is released between steps.
_STACK_CHUNK = 4096

SwapCallback = Callable[[VersionInfo, VersionInfo | None], None]


@dataclass(frozen=True)
class _Live:
    """The served index with the vectors it was built from (for diffs and the oracle)."""

    info: VersionInfo
    index: Index
    positions: Mapping[str, int]
    matrix: npt.NDArray[np.float32]
    #: Rows the live index must skip: items changed since its build (their current vector
    #: is in the delta) or deleted. Kept up to date by every change, so a batch search
    #: does not look thousands of ids up per call.
    hidden: npt.NDArray[np.bool_]

    @classmethod
    def of(
        cls,
        info: VersionInfo,
        index: Index,
        matrix: npt.NDArray[np.float32],
        changed: Collection[str],
        dead: Collection[str],
        positions: Mapping[str, int] | None = None,
    ) -> _Live:
        """``positions`` of the index's ids when the caller has them (else made here)."""
        if positions is None:
            positions = {item_id: pos for pos, item_id in enumerate(index.ids)}
        hidden = np.zeros(len(positions), dtype=np.bool_)
        rows = [positions[i] for part in (changed, dead) for i in part if i in positions]
        hidden[rows] = True
        return cls(info, index, positions, matrix, hidden)


class _Delta:
    """Current vectors of the items changed since the live snapshot, searched exactly."""

    def __init__(self, dims: int, metric: str) -> None:
        self._metric = metric
        # Angular rows are kept as unit vectors, so a query costs one matrix product.
        self._unit = metric == "angular"
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._matrix = np.empty((64, dims), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._ids)

    def _place(self, item_id: str) -> int:
        """The row of ``item_id``, appended (the matrix grown) if it has none."""
        pos = self._pos.get(item_id)
        if pos is None:
            pos = len(self._ids)
            if pos == len(self._matrix):
                grown = np.empty((2 * len(self._matrix), self._matrix.shape[1]), np.float32)
                grown[:pos] = self._matrix
                self._matrix = grown
            self._ids.append(item_id)
            self._pos[item_id] = pos
        return pos

    def set(self, item_id: str, vector: npt.NDArray[np.float32]) -> None:
        pos = self._place(item_id)
        if self._unit:
            norm = float(np.linalg.norm(vector))
            self._matrix[pos] = vector / norm if norm > 0.0 else vector
        else:
            self._matrix[pos] = vector

    def set_many(self, ids: Sequence[str], matrix: npt.NDArray[np.float32]) -> None:
        """:meth:`set` of row ``i`` for ``ids[i]`` (unique ids), normalised in one pass."""
        if not ids:
            return
        rows = np.fromiter((self._place(i) for i in ids), dtype=np.intp, count=len(ids))
        self._matrix[rows] = _unit(matrix) if self._unit else matrix

    def remove(self, item_id: str) -> None:
        pos = self._pos.pop(item_id, None)
        if pos is None:
            return
        last = len(self._ids) - 1
        if pos != last:
            # Swap the last row into the hole so rows stay contiguous.
            moved = self._ids[last]
            self._ids[pos] = moved
            self._pos[moved] = pos
            self._matrix[pos] = self._matrix[last]
        self._ids.pop()

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str]
    ) -> Neighbours:
        n = len(self._ids)
        if n == 0 or k <= 0:
            return []
        if self._unit:
            norm = float(np.linalg.norm(query))
            unit_query = (query / norm if norm > 0.0 else query).astype(np.float32)
            scores = np.asarray(self._matrix[:n] @ unit_query, dtype=np.float32)
        else:
            scores = exact_scores(self._matrix[:n], query[None, :], self._metric)[0]
        hidden = {self._pos[i] for i in exclude if i in self._pos}
        if hidden:
            scores[list(hidden)] = -np.inf
            k = min(k, n - len(hidden))
        return [(self._ids[p], float(scores[p])) for p in top_k(scores, k)]

    def search_many(
        self, queries: npt.NDArray[np.float32], k: int, excludes: Sequence[Collection[str]]
    ) -> list[Neighbours]:
        """:meth:`search` of every row of ``queries`` (``excludes[i]`` for row ``i``): one
        matrix product and one row-wise partition per block of rows."""
        if not self._ids or k <= 0:
            return [[] for _ in range(len(queries))]
        best, picked = self.top_many(queries, k, excludes)
        return neighbour_rows(self._ids, best, picked)

    def top_many(
        self, queries: npt.NDArray[np.float32], k: int, excludes: Sequence[Collection[str]]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        """:meth:`search_many` as arrays: rows of positions in :attr:`ids` and scores, best
        first, ``min(k, len(self))`` wide (``-inf`` where a row ran out of items)."""
        n = len(self._ids)
        kk = min(k, n)
        if kk <= 0:
            return np.empty((len(queries), 0), np.intp), np.empty((len(queries), 0), np.float32)
        matrix = self._matrix[:n]
        if self._unit:
            norms = np.linalg.norm(queries, axis=1, keepdims=True)
            queries = np.asarray(queries / np.where(norms > 0.0, norms, 1.0), dtype=np.float32)
        step = max(1, min(256, BLOCK_CELLS // n))
        bests, pickeds = [], []
        for start in range(0, len(queries), step):
            block = queries[start : start + step]
            scores = (
                np.asarray(block @ matrix.T, dtype=np.float32)
                if self._unit
                else exact_scores(matrix, block, self._metric)
            )
            at_rows, at_cols = exclusion_cells(self._pos, excludes[start : start + step])
            if at_cols:
                scores[at_rows, at_cols] = -np.inf
            best = top_k_rows(scores, kk)
            bests.append(best)
            pickeds.append(np.take_along_axis(scores, best, axis=1))
        if len(bests) == 1:
            return bests[0], pickeds[0]
        return np.concatenate(bests), np.concatenate(pickeds)

    @property
    def ids(self) -> list[str]:
        """Item ids by row (changes with every :meth:`set` and :meth:`remove`)."""
        return self._ids


def _exact_of(index: Index) -> ExactIndex | None:
    """The exact index searched by ``index`` (itself, or the one ``auto`` chose), if any."""
    if isinstance(index, AutoIndex):
        chosen = index.chosen
        return chosen if isinstance(chosen, ExactIndex) else None
    return index if isinstance(index, ExactIndex) else None


def _index_matrix(index: Index) -> npt.NDArray[np.float32]:
    """The vectors an index holds, in build order (read back item by item)."""
    if not len(index):
        return np.empty((0, index.dims), dtype=np.float32)
    rows = []
    for item_id in index.ids:
        vector = index.vector(item_id)
        if vector is None:  # pragma: no cover - ids come from the index itself
            raise CorruptIndexError(f"index lists {item_id!r} but holds no vector for it")
        rows.append(vector)
    return np.stack(rows).astype(np.float32, copy=False)


#: The smallest delta that forces a build through ``index.max_delta_share``.
_MIN_DELTA_LIMIT = 100

#: File of an index version holding the embedding basis its vectors are expressed in.
BASIS_FILE = "basis.bin"


def _basis_file(basis: bytes | None) -> dict[str, bytes]:
    return {} if basis is None else {BASIS_FILE: basis}


def _unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0.0] = 1.0
    return np.asarray(matrix / norms, dtype=np.float32)


def _same_rows(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], metric: str
) -> npt.NDArray[np.bool_]:
    # np.isclose's rule for finite values, without its per-call overhead (upserts of one
    # row pay it on every changelog record).
    rtol, atol = 1e-6, 1e-7
    if metric == "angular":
        # Some backends store unit vectors for angular: compare directions.
        a, b = _unit(a), _unit(b)
        rtol, atol = 1e-5, 1e-6
    return np.asarray((np.abs(a - b) <= atol + rtol * np.abs(b)).all(axis=1))


class IndexManager:
    """Keeps a fresh k-NN index over changing item vectors.

    Parameters
    ----------
    config
        Backend, metric and the rebuild policy.
    root
        Directory of the index versions (see :class:`~stream_knn.index.store.IndexStore`).
    dims
        Values per item vector; other lengths are rejected on :meth:`upsert`.
    on_swap
        Called as ``on_swap(new, old)`` after a version starts being served (from the
        builder thread or the caller of :meth:`start`/:meth:`rebuild_now`).
    build_in_process
        Build in the calling thread instead of a child process: for tools that serve no
        event loop, where starting a process buys nothing. The worker builds in a child
        (the default), whose finished version it memory-maps.
    """

    def __init__(
        self,
        config: IndexConfig,
        root: Path,
        dims: int,
        *,
        on_swap: SwapCallback | None = None,
        build_in_process: bool = False,
    ) -> None:
        self.config = config
        self.dims = int(dims)
        self.metric = config.metric
        self.store = IndexStore(Path(root), config.keep_versions)
        self._on_swap = on_swap
        #: Where builds run: None in the calling thread, else a child process.
        self._builder = (
            None
            if build_in_process
            else BuildProcess(config.build_priority, config.build_cpu_share)
        )
        # One lock guards every mutable field; searches hold it only for the delta part.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._build_lock = threading.Lock()
        self._vectors: dict[str, npt.NDArray[np.float32]] = {}
        #: Items whose current vector may differ from the live index -> change sequence.
        self._changed: dict[str, int] = {}
        #: Deleted ids: never returned, even by a (re-served) version that still has them.
        self._tombstones: set[str] = set()
        #: Items touched since the last build snapshot (what the rebuild policy counts).
        self._dirty: set[str] = set()
        self._delta = _Delta(self.dims, self.metric)
        self._seq = 0
        self._live: _Live | None = None
        self._pinned: int | None = None
        self._build_errors = 0
        self._last_build_seconds: float | None = None
        self._last_build_started = time.monotonic()
        self._retry_after = 0.0
        self._requested = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._recall = RecallSampler(self.dims, self.metric, _RECALL_WINDOW)
        self._rng = random.Random()
        #: What the vectors' coordinates mean (an opaque embedding basis from the caller),
        #: saved with every version and read back on a warm start; None: not recorded.
        self.basis: bytes | None = None

    # -- properties ------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The served index version, or ``None`` before the first one."""
        live = self._live
        return None if live is None else live.info.version

    @property
    def item_count(self) -> int:
        """Number of current items (upserted and not deleted)."""
        return len(self._vectors)

    @property
    def pending_items(self) -> int:
        """Items searched exactly because they changed since the live snapshot."""
        return len(self._delta)

    @property
    def age_seconds(self) -> float | None:
        """Seconds since the served version was created, or ``None``."""
        live = self._live
        return None if live is None else time.time() - live.info.created_at.timestamp()

    @property
    def last_build_seconds(self) -> float | None:
        """Duration of the last successful index build (without saving), seconds."""
        return self._last_build_seconds

    @property
    def build_errors(self) -> int:
        """Builds that failed (including failed writes) since this manager was made."""
        return self._build_errors

    @property
    def pinned(self) -> int | None:
        """The version pinned by ``stream-knn index rollback``, as last seen."""
        return self._pinned

    # -- item vectors ----------------------------------------------------------------

    def upsert(self, item_id: str, vector: npt.ArrayLike) -> None:
        """Set the current vector of ``item_id``; searches see it at once.

        Raises
        ------
        DimensionError
            If ``vector`` does not have ``dims`` values or holds NaN/inf.
        """
        self.upsert_many((item_id,), as_query(vector, self.dims)[None, :])

    def upsert_many(self, ids: Sequence[str], vectors: npt.ArrayLike) -> None:
        """Set the current vector of ``ids[i]`` to row ``i`` of ``vectors``, at once.

        The same as :meth:`upsert` of each row in order (a repeated id ends with its last
        row), with one vectorised comparison against the live version for the whole batch.

        Raises
        ------
        DimensionError
            If ``vectors`` is not ``(len(ids), dims)`` or holds NaN/inf (nothing is set).
        """
        matrix = as_matrix(vectors, self.dims)
        if len(matrix) != len(ids):
            raise DimensionError(f"got {len(ids)} ids for {len(matrix)} vectors")
        n = len(ids)
        if n == 0:
            return
        # Row of the last occurrence of each id: what it ends up with.
        last = dict(zip(ids, range(n), strict=True))
        # Own copies, one per item: a view would keep the caller's whole batch alive.
        own = {item_id: matrix[row].copy() for item_id, row in last.items()}
        for vec in own.values():
            vec.setflags(write=False)
        with self._lock:
            same = np.zeros(n, dtype=np.bool_)
            live = self._live
            if live is not None:
                found = live.positions
                pos = np.fromiter((found.get(i, -1) for i in ids), dtype=np.intp, count=n)
                rows = np.flatnonzero(pos >= 0)
                if len(rows):
                    same[rows] = _same_rows(live.matrix[pos[rows]], matrix[rows], self.metric)
            base = self._seq
            self._seq += n
            self._tombstones.difference_update(last)
            self._vectors.update(own)
            # Every id with a row unlike the live version counts for the rebuild policy.
            self._dirty.update(ids[row] for row in np.flatnonzero(~same).tolist())
            moved: list[str] = []
            for item_id, row in last.items():
                if same[row]:
                    # Back to what the live version holds (e.g. a changelog replayed after
                    # a warm start reaching the vector the version was built from).
                    self._changed.pop(item_id, None)
                    self._delta.remove(item_id)
                else:
                    self._changed[item_id] = base + row + 1
                    moved.append(item_id)
            if live is not None:
                rows = np.fromiter(last.values(), dtype=np.intp, count=len(last))
                at = pos[rows]
                keep = at >= 0
                live.hidden[at[keep]] = ~same[rows[keep]]
            self._delta.set_many(moved, matrix[[last[i] for i in moved]])
            if self._due_now():
                self._wake.notify_all()

    def delete(self, item_id: str) -> bool:
        """Remove ``item_id``; it is never returned again. ``False`` if it was unknown."""
        with self._lock:
            known = self._vectors.pop(item_id, None) is not None
            live = self._live
            if not known and (live is None or item_id not in live.positions):
                return False
            self._seq += 1
            self._changed.pop(item_id, None)
            self._delta.remove(item_id)
            self._tombstones.add(item_id)
            if live is not None and item_id in live.positions:
                live.hidden[live.positions[item_id]] = True
            self._dirty.add(item_id)
            return True

    def replace_all(
        self, vectors: dict[str, npt.NDArray[np.float32]], basis: bytes | None = None
    ) -> VersionInfo:
        """Switch every item vector at once (a new embedding basis) and serve a version of them.

        The version is built from ``vectors`` (in the build process, the caller's thread
        waiting; or in the caller's thread with ``build_in_process``); until it is built,
        searches and :meth:`vector` keep answering from the old vectors, so a query never
        mixes the two bases. The caller must not :meth:`upsert` meanwhile (those vectors
        would be in the old basis). Items not in ``vectors`` are dropped, like deletes.
        ``basis`` (saved with this and every later version) names the new basis.

        Raises
        ------
        DimensionError
            If a vector does not have ``dims`` finite values.
        StreamKnnError, OSError
            If the build or the write fails (nothing is switched then).
        """
        fresh: dict[str, npt.NDArray[np.float32]] = {}
        for item_id, vector in vectors.items():
            vec = as_query(vector, self.dims).copy()
            vec.setflags(write=False)
            fresh[item_id] = vec
        ids = list(fresh)
        known = KnownIds.of(ids)
        matrix = self._stack(fresh, ids)
        with self._build_lock:
            self._last_build_started = time.monotonic()
            try:
                index, info, seconds = self._make_version(known, matrix, basis)
            except (StreamKnnError, OSError) as exc:
                with self._lock:
                    self._build_errors += 1
                logger.error("index build (new basis) failed: %s", exc)
                raise
            self._last_build_seconds = seconds
            with self._lock:
                old = self._live
                dropped = set(self._vectors) | (set() if old is None else set(old.positions))
                self._tombstones |= dropped - set(fresh)
                self._seq += 1
                self.basis = basis
                self._vectors = fresh
                self._changed = {}
                self._live = _Live.of(info, index, matrix, (), self._tombstones, known.positions)
                self._dirty = set()
                self._delta = _Delta(self.dims, self.metric)
            logger.info(
                "built index version %d (new basis): %d items in %.2fs",
                info.version,
                len(ids),
                seconds,
                extra={"version": info.version},
            )
            self._notify_swap(info, None if old is None else old.info)
            self.store.prune(protect=(info.version,))
            return info

    def vectors_snapshot(self) -> dict[str, npt.NDArray[np.float32]]:
        """A copy of the current item vectors (the arrays are read-only, not copied)."""
        with self._lock:
            return dict(self._vectors)

    @property
    def change_seq(self) -> int:
        """A counter that grows with every upsert and delete (a cache key for answers)."""
        return self._seq

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None:
        """The current vector of ``item_id`` (read-only), or None for an unknown item."""
        return self._vectors.get(item_id)

    # -- search ----------------------------------------------------------------------

    def search(self, query: npt.ArrayLike, k: int, exclude: Collection[str] = ()) -> Neighbours:
        """The ``k`` current items nearest ``query``, best first, none in ``exclude``.

        Raises
        ------
        DimensionError
            If ``query`` does not have ``dims`` finite values.
        """
        q = as_query(query, self.dims)
        if k <= 0:
            return []
        live = self._live
        while True:
            with self._lock:
                live = self._live
                changed, dead = self._changed, self._tombstones
            # The immutable live index is searched without the lock. Items changed since
            # its build are skipped there in one pass (their current vectors are searched
            # exactly in the delta): no repeated, ever wider searches when a user's query
            # sits among the items that user has just moved.
            hidden = HiddenIds(exclude, (changed, dead), k)
            found = [] if live is None else live.index.search(q, k, hidden)
            with self._lock:
                if live is not self._live:  # swapped meanwhile: start over on the new one
                    continue
                extra = self._delta.search(q, k, exclude)
                merged = found + extra
                merged.sort(key=lambda pair: -pair[1])
                result = merged[:k]
                if self.config.recall_sample_rate > 0 and (
                    self._rng.random() < self.config.recall_sample_rate
                ):
                    self._sample_recall(live, q, k, exclude, extra, result)
                return result

    def search_many(
        self,
        queries: npt.ArrayLike,
        k: int,
        excludes: Sequence[Collection[str]],
        executor: Executor | None = None,
        threads: int = 1,
    ) -> list[Neighbours]:
        """:meth:`search` of every row of ``queries``, ``excludes[i]`` for row ``i``.

        The same lists as row-by-row searches, made in bulk: the live index through
        :func:`~stream_knn.index.base.search_many` (an exact backend scores all rows with
        one matrix product; Annoy is searched from ``threads`` threads, the caller's and
        ``threads - 1`` of ``executor``, as its search releases the GIL) and the delta
        with one matrix product for all rows. Recall sampling works as in :meth:`search`.

        Raises
        ------
        DimensionError
            If ``queries`` is not ``(n, dims)`` finite values.
        ValueError
            If ``excludes`` does not have one entry per row.
        """
        qs = as_matrix(queries, self.dims)
        if len(excludes) != len(qs):
            raise ValueError(f"got {len(excludes)} exclusion sets for {len(qs)} queries")
        if k <= 0 or not len(qs):
            return [[] for _ in range(len(qs))]
        while True:
            with self._lock:
                live = self._live
                changed, dead = self._changed, self._tombstones
            exact = None if live is None else _exact_of(live.index)
            if exact is not None:
                assert live is not None
                # Arrays from the exact live index, merged with the delta's before any
                # (id, score) pair is made: one pass of pairs per list, not three.
                arrays = exact.top_many(qs, k, excludes, hidden_rows=live.hidden)
                with self._lock:
                    if live is not self._live:
                        continue
                    return self._merge_exact(live, arrays, qs, k, excludes)
            found: list[Neighbours] = (
                [[] for _ in range(len(qs))]
                if live is None
                else search_many(
                    live.index, qs, k, excludes, (changed, dead), executor, threads, live.hidden
                )
            )
            with self._lock:
                if live is not self._live:  # swapped meanwhile: start over on the new one
                    continue
                fresh = self._delta.search_many(qs, k, excludes)
                results: list[Neighbours] = []
                for mine, extra in zip(found, fresh, strict=True):
                    merged = mine + extra
                    merged.sort(key=lambda pair: -pair[1])
                    results.append(merged[:k])
                self._sample_many(live, qs, k, excludes, results, fresh.__getitem__)
                return results

    def _merge_exact(
        self,
        live: _Live,
        arrays: tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]],
        qs: npt.NDArray[np.float32],
        k: int,
        excludes: Sequence[Collection[str]],
    ) -> list[Neighbours]:
        """The lists of an exact live index's ``arrays`` and the delta; caller holds the lock.

        The delta's columns follow the live ones and positions past the live items name
        delta rows, so ties keep the live item first, as a stable merge of the two lists.
        """
        best, picked = arrays
        ids = live.index.ids
        delta_best, delta_picked = self._delta.top_many(qs, k, excludes)
        delta_ids = self._delta.ids
        if delta_best.shape[1]:
            scores = np.concatenate([picked, delta_picked], axis=1)
            cells = np.concatenate([best, delta_best + len(ids)], axis=1)
            order = top_k_rows(scores, min(k, scores.shape[1]))
            picked = np.take_along_axis(scores, order, axis=1)
            best = np.take_along_axis(cells, order, axis=1)
            ids = [*ids, *delta_ids]
        results = neighbour_rows(ids, best, picked)

        def delta_part(row: int) -> Neighbours:
            return neighbour_rows(
                delta_ids, delta_best[row : row + 1], delta_picked[row : row + 1]
            )[0]

        self._sample_many(live, qs, k, excludes, results, delta_part)
        return results

    def _sample_many(
        self,
        live: _Live | None,
        qs: npt.NDArray[np.float32],
        k: int,
        excludes: Sequence[Collection[str]],
        results: list[Neighbours],
        delta_part: Callable[[int], Neighbours],
    ) -> None:
        """Sample rows of a batch for recall; caller holds the lock."""
        rate = self.config.recall_sample_rate
        if rate <= 0:
            return
        for row, result in enumerate(results):
            if self._rng.random() < rate:
                self._sample_recall(live, qs[row], k, excludes[row], delta_part(row), result)

    def similar(self, item_id: str, k: int) -> Neighbours | None:
        """The ``k`` items nearest ``item_id`` (itself excluded), or ``None`` if unknown."""
        with self._lock:
            vector = self._vectors.get(item_id)
            live = self._live
            if vector is None and live is not None and item_id not in self._tombstones:
                pos = live.positions.get(item_id)
                vector = None if pos is None else live.matrix[pos]
        if vector is None:
            return None
        return self.search(vector, k, exclude={item_id})

    def _sample_recall(
        self,
        live: _Live | None,
        query: npt.NDArray[np.float32],
        k: int,
        exclude: Collection[str],
        delta: Neighbours,
        result: Neighbours,
    ) -> None:
        """Queue ``result`` to be scored against an exact search of the same vectors: the
        live rows not hidden now, and ``delta``, the delta's (exact) part of the answer.
        Caller holds the lock."""
        if live is None:
            self._recall.submit(None, None, None, query, k, exclude, delta, result)
        else:
            known = KnownIds(live.index.ids, live.positions)
            self._recall.submit(known, live.matrix, live.hidden, query, k, exclude, delta, result)

    def sampled_recall(self, settle_seconds: float = 0.0) -> float | None:
        """Mean recall@k of the last sampled searches against exact search, or ``None``.

        Samples are scored in a thread of their own; ``settle_seconds`` waits (at most
        that long) for the ones still queued.
        """
        if settle_seconds > 0:
            self._recall.settle(settle_seconds)
        return self._recall.mean()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Serve the pinned or newest valid saved version, then start the builder thread."""
        if self._thread is not None and self._thread.is_alive():
            raise IndexError_("the index manager is already started; call stop() first")
        pinned = self.store.pinned()
        loaded: tuple[VersionInfo, Index] | None = None
        if pinned is not None:
            loaded = self._load_version(pinned)
        if loaded is None:
            loaded = self.store.latest_valid(dims=self.dims, metric=self.metric)
        if loaded is not None:
            self.basis = self.store.read_extra(loaded[0].version, BASIS_FILE)
            self._adopt(*loaded)
            logger.info("warm start from index version %d", loaded[0].version)
        self._pinned = pinned
        with self._lock:
            self._stopping = False
            self._last_build_started = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name="stream-knn-index-builder", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the builder thread and the build process (a build in progress finishes
        first); a later build starts a new process."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._builder is not None:
            self._builder.shutdown()
        self._recall.close()

    def rebuild_now(self, wait: bool = True) -> VersionInfo | None:
        """Build a version from the current vectors now.

        With ``wait`` the build runs in the caller's thread (after any build in progress)
        and its version is returned; errors are raised (and counted). Without ``wait`` the
        builder thread is asked to build and ``None`` is returned.
        """
        if wait:
            return self._build("requested", raise_errors=True)
        with self._lock:
            self._requested = True
            self._wake.notify_all()
            running = self._thread is not None and self._thread.is_alive()
        if not running:
            threading.Thread(
                target=self._build, args=("requested",), name="stream-knn-index-build", daemon=True
            ).start()
        return None

    def _due_now(self) -> bool:
        """Whether changes alone (not the clock) call for a build; caller holds the lock."""
        if self._pinned is not None or time.monotonic() < self._retry_after:
            return False
        return (
            len(self._delta) >= self._delta_limit()
            or len(self._dirty) >= self.config.rebuild_min_changes
        )

    def _delta_limit(self) -> int:
        """Delta size that forces a build: ``max_delta_items``, or ``max_delta_share`` of
        the live items if fewer (never under 100); caller holds the lock.

        An exact live index is bounded too: every delta row is scored by every query on
        top of the live rows (a quarter of 5k items changed costs a quarter more per
        list), and a swap is cheap now (the snapshot grows the live matrix, the version
        is loaded with the ids it was built from).
        """
        live = self._live
        limit = self.config.max_delta_items
        if live is not None:
            share = int(self.config.max_delta_share * len(live.positions))
            limit = min(limit, max(_MIN_DELTA_LIMIT, share))
        return limit

    def _due(self) -> str | None:
        with self._lock:
            if self._requested:
                return "requested"
            if not self._dirty or time.monotonic() < self._retry_after:
                return None
            if self._pinned is None and len(self._delta) >= self._delta_limit():
                return "max_delta_items"
            if self._pinned is None and len(self._dirty) >= self.config.rebuild_min_changes:
                return "rebuild_min_changes"
            elapsed = time.monotonic() - self._last_build_started
            if elapsed >= self.config.rebuild_interval_seconds:
                return "interval"
            return None

    def _run(self) -> None:
        tick = min(self.config.rebuild_interval_seconds, _MAX_TICK_SECONDS)
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._wake.wait(tick)
                if self._stopping:
                    return
            self._follow_pin()
            reason = self._due()
            if reason is not None:
                self._build(reason)

    def _stack(
        self, vectors: dict[str, npt.NDArray[np.float32]], ids: list[str]
    ) -> npt.NDArray[np.float32]:
        matrix = np.empty((len(ids), self.dims), dtype=np.float32)
        # In steps: one copy of a whole large snapshot would hold the GIL for tens of ms.
        for start in range(0, len(ids), _STACK_CHUNK):
            chunk = ids[start : start + _STACK_CHUNK]
            np.stack([vectors[i] for i in chunk], out=matrix[start : start + len(chunk)])
        return matrix

    def _make_version(
        self, known: KnownIds, matrix: npt.NDArray[np.float32], basis: bytes | None
    ) -> tuple[Index, VersionInfo, float]:
        """Build an index of ``ids`` and save it as the next version (errors propagate).

        Through the build process, the version written there is served memory-mapped.
        """
        store = self.store
        job = BuildJob(
            store.root,
            store.keep_versions,
            self.config,
            self.dims,
            list(known.ids),
            matrix,
            _basis_file(basis),
        )
        if self._builder is None:
            return build_version(job, store)
        try:
            info, seconds = self._builder.build(job)
        except VersionWriteError:
            store.write_errors += 1  # counted in the child's copy of the store
            raise
        # Written and checksummed by the child a moment ago, from the ids known here.
        return store.load(info.version, known, verify=False), info, seconds

    def _snapshot(self) -> Callable[[], tuple[KnownIds, npt.NDArray[np.float32]]]:
        """What the next version is built from, as a function that stacks it off the lock;
        caller holds the lock.

        The live version's matrix plus the rows changed since it: a copy and a few thousand
        rows, where stacking every item of a 100k catalog from the dict held the GIL for
        tens of milliseconds a build. When the live version is not simply the current items
        minus changes (deletes, a version adopted from disk), every vector is stacked.
        """
        vectors, live = self._vectors, self._live
        if live is not None:
            positions = live.positions
            fresh = [i for i in self._changed if i not in positions]
            # Every live item still current (none deleted or unknown) and nothing else new.
            if len(positions) + len(fresh) == len(vectors):
                moved = [i for i in self._changed if i in positions]
                rows = np.fromiter((positions[i] for i in moved), np.intp, len(moved))
                moved_vectors = [vectors[i] for i in moved]
                fresh_vectors = [vectors[i] for i in fresh]
                base = live.matrix

                def grown() -> tuple[KnownIds, npt.NDArray[np.float32]]:
                    n = len(base)
                    matrix = np.empty((n + len(fresh), self.dims), dtype=np.float32)
                    matrix[:n] = base
                    if moved_vectors:
                        matrix[rows] = np.stack(moved_vectors)
                    if fresh_vectors:
                        matrix[n:] = np.stack(fresh_vectors)
                    ids = list(live.index.ids)
                    ids.extend(fresh)
                    placed = dict(positions)
                    placed.update(zip(fresh, range(n, n + len(fresh)), strict=True))
                    return KnownIds(ids, placed), matrix

                return grown
        snapshot = dict(vectors)

        def stacked() -> tuple[KnownIds, npt.NDArray[np.float32]]:
            ids = list(snapshot)
            return KnownIds.of(ids), self._stack(snapshot, ids)

        return stacked

    def _build(self, reason: str, raise_errors: bool = False) -> VersionInfo | None:
        with self._build_lock:
            with self._lock:
                self._requested = False
                snap_seq = self._seq
                snapshot = self._snapshot()
                basis = self.basis
                dirty, self._dirty = self._dirty, set()
                self._last_build_started = time.monotonic()
            known, matrix = snapshot()
            ids = known.ids
            try:
                index, info, seconds = self._make_version(known, matrix, basis)
            except (StreamKnnError, OSError) as exc:
                with self._lock:
                    self._build_errors += 1
                    # Keep the changes pending, but wait an interval before retrying.
                    self._dirty |= dirty
                    self._retry_after = time.monotonic() + self.config.rebuild_interval_seconds
                logger.error("index build (%s) failed: %s", reason, exc)
                if raise_errors:
                    raise
                return None
            self._last_build_seconds = seconds
            logger.info(
                "built index version %d (%s): %d items in %.2fs",
                info.version,
                reason,
                len(ids),
                seconds,
                extra={"version": info.version},
            )
            if self.store.pinned() is None:
                self._swap(info, index, matrix, known.positions, snap_seq)
            else:
                logger.info(
                    "index version %d written but not served: version %s is pinned",
                    info.version,
                    self.store.pinned(),
                )
            live = self._live
            self.store.prune(protect=() if live is None else (live.info.version,))
            return info

    def _swap(
        self,
        info: VersionInfo,
        index: Index,
        matrix: npt.NDArray[np.float32],
        positions: Mapping[str, int],
        snap_seq: int,
    ) -> None:
        """Serve ``index``, built from the vectors as of change ``snap_seq``."""
        with self._lock:
            old = self._live
            self._changed = {i: s for i, s in self._changed.items() if s > snap_seq}
            self._live = _Live.of(info, index, matrix, self._changed, self._tombstones, positions)
            delta = _Delta(self.dims, self.metric)
            for item_id in self._changed:
                delta.set(item_id, self._vectors[item_id])
            self._delta = delta
        self._notify_swap(info, None if old is None else old.info)

    def _adopt(self, info: VersionInfo, index: Index) -> None:
        """Serve a saved version whose snapshot is unknown: diff it against the vectors."""
        matrix = _index_matrix(index)
        positions = {item_id: pos for pos, item_id in enumerate(index.ids)}
        with self._lock:
            old = self._live
            ids = list(self._vectors)
            in_index = [i for i in ids if i in positions]
            same: set[str] = set()
            if in_index:
                current = np.stack([self._vectors[i] for i in in_index])
                rows = matrix[[positions[i] for i in in_index]]
                equal = _same_rows(rows, current, self.metric)
                same = {i for i, ok in zip(in_index, equal.tolist(), strict=True) if ok}
            self._changed = {i: self._seq for i in ids if i not in same}
            self._live = _Live.of(info, index, matrix, self._changed, self._tombstones)
            delta = _Delta(self.dims, self.metric)
            for item_id in self._changed:
                delta.set(item_id, self._vectors[item_id])
            self._delta = delta
        self._notify_swap(info, None if old is None else old.info)

    def _load_version(self, version: int) -> tuple[VersionInfo, Index] | None:
        try:
            info = self.store.info(version)
            if info.dims != self.dims or info.metric != self.metric:
                logger.error(
                    "cannot serve index version %d: built for %s/%d dims, need %s/%d dims",
                    version,
                    info.metric,
                    info.dims,
                    self.metric,
                    self.dims,
                )
                return None
            return info, self.store.load(version)
        except CorruptIndexError as exc:
            logger.error("cannot serve index version %d: %s", version, exc)
            return None

    def _follow_pin(self) -> None:
        """Serve what ``stream-knn index rollback`` (another process) asked for."""
        pinned = self.store.pinned()
        if pinned == self._pinned:
            return
        self._pinned = pinned
        if pinned is not None:
            loaded = self._load_version(pinned)
            if loaded is not None:
                logger.info("serving pinned index version %d", pinned)
        else:
            loaded = self.store.latest_valid(dims=self.dims, metric=self.metric)
            logger.info("index unpinned; serving the newest valid version")
        if loaded is not None and loaded[0].version != self.version:
            if self.store.read_extra(loaded[0].version, BASIS_FILE) != self.basis:
                logger.warning(
                    "index version %d was built in another embedding basis than the current "
                    "vectors: its answers are approximate until the next basis refit",
                    loaded[0].version,
                )
            self._adopt(*loaded)

    def _notify_swap(self, new: VersionInfo, old: VersionInfo | None) -> None:
        if self._on_swap is None:
            return
        try:
            self._on_swap(new, old)
        except Exception:
            # A faulty listener must not take the index lifecycle down with it.
            logger.exception("on_swap callback failed for index version %d", new.version)
