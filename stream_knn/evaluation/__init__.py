"""Offline replay, evaluation against exact item-kNN and popularity, and tuning.

``stream-knn evaluate`` and ``stream-knn tune`` run this package on event files; the same
streaming model code as the worker is replayed, with no broker involved.
"""

from stream_knn.evaluation.baselines import ItemKnnBaseline, PopularityBaseline, Recommender
from stream_knn.evaluation.replay import (
    EvaluationResult,
    StreamingModelMethod,
    evaluate_events,
    event_weight,
    replay,
)
from stream_knn.evaluation.scoring import MethodResult, MethodStats
from stream_knn.evaluation.tune import SearchSpace, TuneResult, default_space, tune

__all__ = [
    "EvaluationResult",
    "ItemKnnBaseline",
    "MethodResult",
    "MethodStats",
    "PopularityBaseline",
    "Recommender",
    "SearchSpace",
    "StreamingModelMethod",
    "TuneResult",
    "default_space",
    "evaluate_events",
    "event_weight",
    "replay",
    "tune",
]
