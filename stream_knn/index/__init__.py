"""Nearest-neighbour indexes (Annoy, exact numpy, optional HNSW) and their rebuild lifecycle."""

from __future__ import annotations

from stream_knn.index.annoy_index import AnnoyIndex
from stream_knn.index.base import Index, Metric, Neighbours, create_index, make_index
from stream_knn.index.exact import ExactIndex
from stream_knn.index.hnsw import HnswIndex
from stream_knn.index.manager import IndexManager
from stream_knn.index.store import IndexStore, VersionInfo

__all__ = [
    "AnnoyIndex",
    "ExactIndex",
    "HnswIndex",
    "Index",
    "IndexManager",
    "IndexStore",
    "Metric",
    "Neighbours",
    "VersionInfo",
    "create_index",
    "make_index",
]
