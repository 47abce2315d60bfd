"""Online item embeddings, catalog content vectors and user profiles (pure Python/numpy)."""

from __future__ import annotations

from stream_knn.embeddings.catalog import CatalogFeatures, blend, unit
from stream_knn.embeddings.codec import decode_vector, encode_vector
from stream_knn.embeddings.model import StreamingModel
from stream_knn.embeddings.profile import Interaction, UserProfile
from stream_knn.embeddings.projection import Projection, SketchProjector, fit_projection
from stream_knn.embeddings.sketch import ItemState, RandomIndexing, activity_weight

__all__ = [
    "CatalogFeatures",
    "Interaction",
    "ItemState",
    "Projection",
    "RandomIndexing",
    "SketchProjector",
    "StreamingModel",
    "UserProfile",
    "activity_weight",
    "blend",
    "decode_vector",
    "encode_vector",
    "fit_projection",
    "unit",
]
