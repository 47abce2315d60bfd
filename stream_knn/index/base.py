"""The nearest-neighbour index contract every backend implements.

An index is built once from a snapshot of item vectors and never mutated afterwards
(Annoy cannot add items after ``build``); freshness comes from rebuilding and from the
exact delta kept by the index manager.

Scores are "higher is nearer" for every metric so results of different sources can be
merged: ``angular`` gives the cosine similarity, ``dot`` the dot product, ``euclidean``
and ``manhattan`` the negated distance.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Index", "Metric", "Neighbours"]

Metric = Literal["angular", "euclidean", "dot", "manhattan"]

#: Search result: (item id, score) pairs, best first.
Neighbours = list[tuple[str, float]]


@runtime_checkable
class Index(Protocol):
    """An immutable k-nearest-neighbour index over string item ids."""

    #: Backend name as written in configs and saved metadata ("annoy", "exact", "hnsw").
    backend: str
    metric: Metric
    dims: int

    def build(self, ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        """Index ``vectors`` (shape ``(len(ids), dims)``); may be called once."""

    def search(
        self, query: npt.NDArray[np.float32], k: int, exclude: Collection[str] = ()
    ) -> Neighbours:
        """The ``k`` items nearest ``query``, best first, never an id in ``exclude``."""

    def save(self, directory: Path) -> None:
        """Write the index files into ``directory`` (which exists and is empty)."""

    def load(self, directory: Path) -> None:
        """Read (memory-map where the backend can) what :meth:`save` wrote."""

    def __len__(self) -> int:
        """Number of indexed items."""

    @property
    def ids(self) -> Sequence[str]:
        """Indexed item ids, in build order."""
