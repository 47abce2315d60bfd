"""Approximate search with hnswlib's HNSW graphs (optional: ``pip install stream-knn[hnsw]``).

hnswlib offers squared L2, inner product and cosine spaces, so ``manhattan`` is not
available with this backend.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_knn.errors import CorruptIndexError, IndexError_
from stream_knn.index.base import (
    KnownIds,
    Metric,
    Neighbours,
    as_matrix,
    as_query,
    check_ids,
    check_metric,
    filtered_search,
    load_ids,
    write_ids,
)

__all__ = ["HNSW_METRICS", "HnswIndex"]

_INDEX_FILE = "index.hnsw"
#: Our metric -> hnswlib space. hnswlib reports 1 - cos, 1 - dot and squared L2.
_SPACES = {"angular": "cosine", "dot": "ip", "euclidean": "l2"}
HNSW_METRICS: tuple[str, ...] = tuple(_SPACES)
_SEED = 100


def _hnswlib() -> ModuleType:
    try:
        return importlib.import_module("hnswlib")
    except ImportError:
        raise IndexError_(
            "the 'hnsw' index backend needs hnswlib: pip install stream-knn[hnsw] "
            "(or choose index.backend = 'annoy' or 'exact')"
        ) from None


class HnswIndex:
    """An HNSW graph over string ids.

    Parameters
    ----------
    dims
        Number of values per vector.
    metric
        ``angular``, ``euclidean`` or ``dot`` (not ``manhattan``).
    m
        Graph degree: more links, better recall, more memory.
    ef_construction
        Candidate list size while building.
    ef_search
        Candidate list size while searching (raised to ``k`` when ``k`` is larger).
    build_threads
        Threads adding items; ``-1`` means all cores.
    """

    backend = "hnsw"

    def __init__(
        self,
        dims: int,
        metric: Metric,
        m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        *,
        build_threads: int = -1,
    ) -> None:
        self.dims = int(dims)
        self.metric: Metric = check_metric(metric, HNSW_METRICS, self.backend)
        self._lib = _hnswlib()
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.build_threads = int(build_threads)
        self._graph: Any = None
        self._ef = self.ef_search
        self._ids: Sequence[str] = []
        self._positions: Mapping[str, int] = {}
        self._built = False

    @property
    def params(self) -> Mapping[str, Any]:
        return {
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "build_threads": self.build_threads,
        }

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def _new_graph(self) -> Any:
        return self._lib.Index(space=_SPACES[self.metric], dim=self.dims)

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        if self._built:
            raise IndexError_("an index is built once; make a new index to rebuild")
        matrix = as_matrix(vectors, self.dims)
        item_ids = check_ids(ids, len(matrix))
        graph = self._new_graph()
        graph.init_index(
            max_elements=max(1, len(matrix)),
            ef_construction=self.ef_construction,
            M=self.m,
            random_seed=_SEED,
        )
        if len(matrix):
            threads = self.build_threads if self.build_threads > 0 else (os.cpu_count() or 1)
            graph.add_items(matrix, np.arange(len(matrix)), num_threads=threads)
        graph.set_ef(self.ef_search)
        self._graph = graph
        self._set_ids(KnownIds.of(item_ids))

    def _set_ids(self, known: KnownIds) -> None:
        self._ids = known.ids
        self._positions = known.positions
        self._ef = self.ef_search
        self._built = True

    def _to_scores(self, distances: npt.NDArray[np.float32]) -> list[float]:
        if self.metric == "euclidean":
            return [-float(d) for d in np.sqrt(np.maximum(distances, 0.0))]
        # cosine and ip spaces report 1 - similarity.
        return [1.0 - float(d) for d in distances]

    def _fetch(self, query: npt.NDArray[np.float32], n: int) -> Neighbours:
        if n > self._ef:
            # ef only ever grows, so a concurrent query never sees it drop below its n.
            self._ef = n
            self._graph.set_ef(n)
        try:
            labels, distances = self._graph.knn_query(query, k=n, num_threads=1)
        except RuntimeError as exc:
            raise IndexError_(f"hnswlib could not return {n} neighbours: {exc}") from None
        ids = self._ids
        scores = self._to_scores(distances[0])
        return [(ids[int(p)], s) for p, s in zip(labels[0], scores, strict=True)]

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours:
        q = as_query(query, self.dims)
        return filtered_search(lambda n: self._fetch(q, n), k, exclude, len(self._ids))

    def vector(self, item_id: str) -> npt.NDArray[np.float32] | None:
        pos = self._positions.get(item_id)
        if pos is None:
            return None
        items = self._graph.get_items([pos], return_type="numpy")
        return np.asarray(items[0], dtype=np.float32)

    def save(self, directory: Path) -> None:
        if self._graph is not None and self._ids:
            self._graph.save_index(str(directory / _INDEX_FILE))
        write_ids(directory, self._ids)

    def load(self, directory: Path, known: KnownIds | None = None) -> None:
        known = load_ids(directory, known)
        ids = known.ids
        path = directory / _INDEX_FILE
        if not ids:
            self._set_ids(known)
            return
        if not path.is_file():
            raise CorruptIndexError(f"{path} is missing; the index version is incomplete")
        graph = self._new_graph()
        try:
            graph.load_index(str(path), max_elements=len(ids))
        except RuntimeError as exc:
            raise CorruptIndexError(f"{path} cannot be loaded by hnswlib: {exc}") from None
        if graph.get_current_count() != len(ids):
            raise CorruptIndexError(
                f"{path} holds {graph.get_current_count()} items but {len(ids)} ids are listed"
            )
        graph.set_ef(self.ef_search)
        self._graph = graph
        self._set_ids(known)
