"""Offline tuning: rolling time-based validation of model settings, then an index sweep.

Model settings (``model.dims``, the item and profile half-lives, an event weight,
``serving.k``)
are scored by replaying the time-ordered data once per trial: events before the first
validation window are only learned, then each of the ``windows`` consecutive windows is
scored prequentially (serve, score, learn), so a prediction never uses a later event.
Serving a list and then learning the event is exactly "replay all earlier data, then score
the window", done in one pass. The objective is the mean over windows of HR at a fixed
cutoff (``min(k, 10)``: HR@10 of the served list), so a longer list does not win by being
longer. The model searches exactly, so its top-``k`` list is a prefix of its top-``K``
list and every ``k`` of the grid is scored from the same replay.

Index settings (``index.metric``, ``index.n_trees``, ``index.search_k``) are then chosen on
the best trial's final item vectors: Annoy recall@10 against exact cosine search for the
users' query vectors, and query latency; the cheapest setting with recall >= 0.95 wins.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from stream_knn.config import Config
from stream_knn.embeddings.model import StreamingModel
from stream_knn.errors import ConfigError
from stream_knn.evaluation.replay import EventLike, StreamingModelMethod, event_weight, replay
from stream_knn.index.annoy_index import SEARCH_K_FACTOR, AnnoyIndex
from stream_knn.index.exact import ExactIndex

__all__ = [
    "EVAL_CUTOFF",
    "RECALL_TARGET",
    "IndexPoint",
    "SearchSpace",
    "Trial",
    "TuneResult",
    "choose_index",
    "default_space",
    "split_windows",
    "sweep_index",
    "trial_table",
    "tune",
]

logger = logging.getLogger(__name__)

#: HR cutoff of the objective: HR@min(k, 10) of the served list.
EVAL_CUTOFF = 10
#: Index settings must reach this recall@10 against exact search.
RECALL_TARGET = 0.95
#: Query vectors (users) the index sweep measures recall and latency on.
_SWEEP_QUERIES = 300
_DAY = 24 * 3600.0

SearchKind = Literal["grid", "random"]


@dataclass(frozen=True)
class SearchSpace:
    """Values tried per setting: ``{"section__name": values}``; ``serving__k`` is special.

    The first value of each setting should be the base configuration's, so the first
    trial of every search is the base configuration.
    """

    model: Mapping[str, tuple[float | int, ...]]
    ks: tuple[int, ...]
    metrics: tuple[str, ...] = ("angular", "euclidean", "dot")
    n_trees: tuple[int, ...] = (5, 10, 20, 50)
    search_ks: tuple[int, ...] = (-1, 100, 200, 500, 1000, 2000, 5000, 10000)

    def points(self) -> list[dict[str, float | int]]:
        """Every combination of the model settings, base values first."""
        names = list(self.model)
        return [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(self.model[n] for n in names))
        ]


def default_space(config: Config, events: Sequence[EventLike]) -> SearchSpace:
    """The default search space around ``config`` for ``events``.

    The event weight searched is ``events.rating_weight_scale`` when the data has ratings,
    else ``events.purchase_weight`` when it has purchases (nothing otherwise).
    """
    m, ev = config.model, config.events
    space: dict[str, tuple[float | int, ...]] = {
        "model__dims": _with_first(m.dims, (32, 64, 128, 256)),
        "model__half_life_seconds": _with_first(
            m.half_life_seconds, (30 * _DAY, 365 * _DAY, math.inf)
        ),
        # Rank decay in the user's own history: the same at any pace of the data.
        "model__profile_half_life_events": _with_first(
            m.profile_half_life_events, (2.0, 5.0, 10.0, 20.0, math.inf)
        ),
    }
    types = {e.event_type for e in events}
    if "rating" in types:
        space["events__rating_weight_scale"] = _with_first(ev.rating_weight_scale, (0.0, 0.5, 1.0))
    elif "purchase" in types:
        space["events__purchase_weight"] = _with_first(ev.purchase_weight, (2.0, 5.0, 10.0))
    ks = tuple(sorted({5, EVAL_CUTOFF, 20, 50, config.serving.k}))
    return SearchSpace(model=space, ks=ks)


def _with_params(base: Config, params: Mapping[str, float | int]) -> Config:
    """``base`` with the trial's settings; the sketch widens to ``dims`` when narrower."""
    dims = params.get("model__dims")
    if dims is not None and dims > base.model.sketch_dims:
        return base.replace(**params, model__sketch_dims=int(dims))
    return base.replace(**params)


def _with_first(first: float | int, values: tuple[float | int, ...]) -> tuple[float | int, ...]:
    return (first, *(v for v in values if v != first))


@dataclass(frozen=True)
class Trial:
    """One scored model setting.

    ``hr_cutoff[k]`` holds HR@min(k, 10) per window, ``hr_at_k[k]`` HR@k per window.
    """

    number: int
    params: dict[str, float | int]
    hr_cutoff: dict[int, list[float]]
    hr_at_k: dict[int, list[float]]
    n_scored: list[int]
    seconds: float

    def objective(self, k: int) -> float:
        """Mean over windows of HR@min(k, 10) for served lists of length ``k``."""
        values = self.hr_cutoff[k]
        return sum(values) / len(values) if values else 0.0

    def best_k(self) -> int:
        """The smallest ``k`` with the highest objective (longer lists cost more)."""
        return max(self.hr_cutoff, key=lambda k: (round(self.objective(k), 12), -k))


@dataclass(frozen=True)
class IndexPoint:
    """Recall@10 against exact search and mean query latency of one Annoy setting."""

    metric: str
    n_trees: int
    search_k: int
    effective_search_k: int
    recall: float
    latency_us: float
    build_seconds: float


@dataclass(frozen=True)
class TuneResult:
    """Everything a tune run found; ``config`` is the best configuration."""

    config: Config
    trials: list[Trial]
    best: Trial
    best_k: int
    windows: list[tuple[int, int]]
    window_times: list[tuple[int, int]]
    index_points: list[IndexPoint]
    chosen_index: IndexPoint | None
    exact_latency_us: float
    search: str
    seed: int
    n_events: int


def split_windows(events: Sequence[EventLike], windows: int) -> list[tuple[int, int]]:
    """Cut time-ordered ``events`` into a warm-up and ``windows`` validation windows.

    The ``windows + 1`` pieces hold about equal numbers of events; each cut moves forward
    past events sharing its timestamp, so no two windows share a moment in time. Returns
    the half-open index ranges of the validation windows (the warm-up is what precedes the
    first).

    Raises
    ------
    ConfigError
        Too few distinct timestamps for the number of windows.
    """
    n = len(events)
    if windows < 1:
        raise ConfigError(f"--windows {windows} is not valid; need >= 1")
    cuts: list[int] = []
    for w in range(1, windows + 1):
        cut = max(round(n * w / (windows + 1)), cuts[-1] + 1 if cuts else 1)
        while 0 < cut < n and events[cut].ts_ms == events[cut - 1].ts_ms:
            cut += 1
        cuts.append(cut)
    cuts.append(n)
    spans = [(cuts[i], cuts[i + 1]) for i in range(windows)]
    if any(start >= end for start, end in spans):
        raise ConfigError(
            f"{n} events with their timestamps cannot be split into {windows} validation "
            "windows after a warm-up; use fewer --windows or more data"
        )
    return spans


def tune(
    events: Sequence[EventLike],
    base: Config,
    *,
    trials: int = 8,
    search: SearchKind = "random",
    seed: int = 0,
    windows: int = 3,
    space: SearchSpace | None = None,
    progress: bool = False,
) -> TuneResult:
    """Search model and index settings on ``events`` by rolling time-based validation.

    Parameters
    ----------
    events : sequence of EventLike
        Time-ordered events.
    base : Config
        Settings not searched come from here.
    trials : int
        Model settings tried by ``random`` search (sampled without replacement from the
        grid; the first is always ``base``). ``grid`` tries every point of the grid.
    search : {"random", "grid"}
        How settings are chosen.
    seed : int
        Seeds the sampler, the model (``model.seed``) and the sweep's query sample.
    windows : int
        Number of validation windows.
    space : SearchSpace, optional
        Default: :func:`default_space`.
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    TuneResult
    """
    if trials < 1:
        raise ConfigError(f"--trials {trials} is not valid; need >= 1")
    if search not in ("grid", "random"):
        raise ConfigError(f"--search {search!r} is not valid; valid values: grid, random")
    base = base.replace(model__seed=seed)
    space = space or default_space(base, events)
    spans = split_windows(events, windows)
    points = space.points()
    if search == "random" and trials < len(points):
        rng = np.random.default_rng(seed)
        picked = sorted(rng.choice(np.arange(1, len(points)), size=trials - 1, replace=False))
        points = [points[0], *(points[int(i)] for i in picked)]
    logger.info("tune: %d trials over %d events, %d windows", len(points), len(events), windows)
    max_k = max(space.ks)
    done: list[Trial] = []
    best_model: StreamingModel | None = None
    best_score = -1.0
    for number, params in enumerate(points, start=1):
        config = _with_params(base, params)
        weights = [event_weight(e, config.events) for e in events]
        method = StreamingModelMethod(StreamingModel(config.model, config.events))
        t0 = time.perf_counter()
        outcome = replay(
            events,
            [method],
            k=max_k,
            weights=weights,
            windows=spans,
            progress=progress,
            desc=f"trial {number}/{len(points)}",
        )
        stats = outcome.stats[method.name]
        trial = Trial(
            number=number,
            params=params,
            hr_cutoff={k: [s.result(min(k, EVAL_CUTOFF), 1).hr for s in stats] for k in space.ks},
            hr_at_k={k: [s.result(k, 1).hr for s in stats] for k in space.ks},
            n_scored=[s.n_scored for s in stats],
            seconds=time.perf_counter() - t0,
        )
        done.append(trial)
        score = trial.objective(trial.best_k())
        logger.info("trial %d %s: mean HR@%d = %.4f", number, params, EVAL_CUTOFF, score)
        # Strictly better only: on a tie the earlier trial (the base first) stays.
        if score > best_score:
            best_score, best_model = score, method.model
    best = max(done, key=lambda t: (t.objective(t.best_k()), -t.number))
    best_k = best.best_k()
    assert best_model is not None
    now_ms = events[-1].ts_ms
    users = list(dict.fromkeys(e.user_id for e in events))
    points_ix, chosen, exact_us = sweep_index(
        best_model, users, space, now_ms=now_ms, seed=seed, progress=progress
    )
    config = _with_params(base, best.params).replace(serving__k=best_k)
    if chosen is not None:
        config = config.replace(
            index__metric=chosen.metric,
            index__n_trees=chosen.n_trees,
            index__search_k=chosen.search_k,
        )
    times = [(events[s].ts_ms, events[e - 1].ts_ms) for s, e in spans]
    return TuneResult(
        config=config,
        trials=done,
        best=best,
        best_k=best_k,
        windows=spans,
        window_times=times,
        index_points=points_ix,
        chosen_index=chosen,
        exact_latency_us=exact_us,
        search=search,
        seed=seed,
        n_events=len(events),
    )


def sweep_index(
    model: StreamingModel,
    users: Sequence[str],
    space: SearchSpace,
    *,
    now_ms: int,
    seed: int,
    progress: bool = False,
    k: int = EVAL_CUTOFF,
) -> tuple[list[IndexPoint], IndexPoint | None, float]:
    """Measure Annoy recall@k and latency for every metric, tree count and ``search_k``.

    Queries are the query vectors at ``now_ms`` of a seeded sample of ``users``; the
    oracle is exact cosine search (the model's own ranking). See :func:`choose_index`.

    Returns
    -------
    (points, chosen, exact_latency_us)
        ``chosen`` is ``None`` when the model has no item vectors.
    """
    ids, vectors = model.item_matrix()
    if not ids:
        return [], None, 0.0
    dims = vectors.shape[1]
    rng = np.random.default_rng([seed, 3])
    sample = list(users)
    if len(sample) > _SWEEP_QUERIES:
        sample = [sample[int(i)] for i in sorted(rng.choice(len(sample), _SWEEP_QUERIES, False))]
    queries = [q for q in (model.query_vector(u, now_ms) for u in sample) if q is not None]
    if not queries:
        queries = [vectors[int(i)] for i in rng.choice(len(ids), min(len(ids), 100), False)]
    exact = ExactIndex(dims, "angular")
    exact.build(ids, vectors)
    t0 = time.perf_counter_ns()
    truth = [{item for item, _ in exact.search(q, k)} for q in queries]
    exact_us = (time.perf_counter_ns() - t0) / 1000.0 / len(queries)
    wanted = sum(len(t) for t in truth)
    out: list[IndexPoint] = []
    combos = list(itertools.product(space.metrics, space.n_trees))
    for metric, n_trees in tqdm(
        combos, desc="index sweep", file=sys.stderr, disable=not progress, unit="forest"
    ):
        # One build per forest; search_k is a query-time setting. One build thread keeps
        # the forest (and so the recall) the same from run to run.
        index = AnnoyIndex(dims, metric, n_trees, -1, build_threads=1)
        b0 = time.perf_counter()
        index.build(ids, vectors)
        build_s = time.perf_counter() - b0
        for search_k in space.search_ks:
            index.search_k = search_k
            t0 = time.perf_counter_ns()
            found = [{item for item, _ in index.search(q, k)} for q in queries]
            latency = (time.perf_counter_ns() - t0) / 1000.0 / len(queries)
            hits = sum(len(f & t) for f, t in zip(found, truth, strict=True))
            effective = search_k if search_k > 0 else n_trees * k * SEARCH_K_FACTOR
            out.append(
                IndexPoint(
                    metric=metric,
                    n_trees=n_trees,
                    search_k=search_k,
                    effective_search_k=effective,
                    recall=hits / wanted if wanted else 1.0,
                    latency_us=latency,
                    build_seconds=build_s,
                )
            )
    return out, choose_index(out), exact_us


def choose_index(points: Sequence[IndexPoint]) -> IndexPoint | None:
    """The cheapest point reaching :data:`RECALL_TARGET`, else the highest-recall one.

    Cheapest means fewest nodes inspected per query (``effective_search_k``), then fewer
    trees: the deterministic driver of query latency (measured latency varies from run
    to run, so it is reported, not used to choose).
    """
    if not points:
        return None
    good = [p for p in points if p.recall >= RECALL_TARGET]
    if good:
        return min(good, key=lambda p: (p.effective_search_k, p.n_trees))
    logger.warning("no index setting reached recall@10 >= %.2f", RECALL_TARGET)
    return max(points, key=lambda p: (p.recall, -p.effective_search_k, -p.n_trees))


def trial_table(result: TuneResult) -> list[dict[str, Any]]:
    """Rows (one per trial) of parameters, per-window HR and the objective, for reports."""
    rows = []
    for t in result.trials:
        k = t.best_k()
        rows.append(
            {
                "trial": t.number,
                **t.params,
                "k": k,
                "hr_windows": [round(v, 6) for v in t.hr_cutoff[k]],
                "objective": round(t.objective(k), 6),
                "seconds": round(t.seconds, 3),
            }
        )
    return rows
