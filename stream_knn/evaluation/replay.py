"""Prequential offline replay: serve, score, then learn, one event at a time in time order.

For each event whose user already has history and whose item is new to that user, every
method serves the list the user would have received *before* the event, the list is
scored against the event's item, and only then do all methods learn the event. Events on
an item the user already interacted with are learned but not scored: seen items are
excluded from every method's lists, so they could only add the same miss to every method.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from stream_knn.config import Config, EventsConfig
from stream_knn.embeddings.model import StreamingModel
from stream_knn.errors import ConfigError
from stream_knn.evaluation.baselines import (
    DEFAULT_BASELINE_MEMORY_MB,
    ItemKnnBaseline,
    PopularityBaseline,
    Recommender,
)
from stream_knn.evaluation.scoring import MethodResult, MethodStats, merge_stats
from stream_knn.serving.popularity import Popularity
from stream_knn.serving.recommender import apply_weight_function
from stream_knn.serving.tuning import QuerySetting, SelfTuner, tuner_for

__all__ = [
    "METHODS",
    "EvaluationResult",
    "EventLike",
    "ReplayOutcome",
    "StreamingModelMethod",
    "build_methods",
    "evaluate_events",
    "event_weight",
    "replay",
]

logger = logging.getLogger(__name__)

#: Methods of an ``evaluate`` run, in table order (``popularity`` stands for all of
#: :data:`POPULARITY_HALF_LIVES`).
METHODS: tuple[str, ...] = ("streaming", "item_knn", "popularity")

_DAY = 24 * 3600.0
#: The recent-popularity baselines of an evaluation: name -> half-life in seconds of event
#: time. The model is compared with the strongest of them on each dataset.
POPULARITY_HALF_LIVES: dict[str, float] = {
    "popularity_1d": _DAY,
    "popularity_7d": 7 * _DAY,
    "popularity_30d": 30 * _DAY,
    "popularity_90d": 90 * _DAY,
    "popularity_all": math.inf,
}
#: Consecutive time windows an evaluation reports HR and NDCG over (equal event counts).
EVAL_WINDOWS = 10


class EventLike(Protocol):
    """The fields of :class:`stream_knn.events.sources.RawEvent` the replay reads."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def weight(self) -> float | None: ...
    @property
    def rating(self) -> float | None: ...


def event_weight(event: EventLike, events: EventsConfig) -> float:
    """The learning weight of a file event, by the rule of the ``user-events`` schema.

    The event's own ``weight`` if it has one; for a ``rating`` event
    ``rating_weight_base + rating_weight_scale * rating``; otherwise
    ``events.weight_of(event_type)``.
    """
    if event.weight is not None:
        return float(event.weight)
    if event.event_type == "rating" and event.rating is not None:
        return events.rating_weight_base + events.rating_weight_scale * event.rating
    try:
        return events.weight_of(event.event_type)
    except KeyError:
        raise ConfigError(
            f"event type {event.event_type!r} has no default weight; valid types: "
            "view, click, add_to_cart, purchase, rating"
        ) from None


class StreamingModelMethod:
    """The streaming model behind the :class:`Recommender` contract of the replay.

    The model's profile remembers only the user's recent items; the adapter passes every
    item the user interacted with earlier in the replay as ``exclude``, so the model is
    held to the same exclusion as the baselines.

    Parameters
    ----------
    model : StreamingModel
        A fresh :class:`stream_knn.embeddings.model.StreamingModel`.
    """

    name = "streaming"

    def __init__(self, model: StreamingModel, tuner: SelfTuner | None = None, k: int = 10) -> None:
        self.model = model
        self.tuner = tuner
        self.k = k
        # The worker's popularity (the fallback, and the tuner's "popular" candidate),
        # ranked afresh at every ask so a replay does not depend on its own speed.
        self.popularity = Popularity(model.config.half_life_seconds, refresh_seconds=0.0)
        self._seen: dict[str, set[str]] = {}
        self._n = 0
        #: ``(event time, old setting, new setting)`` of every self-tuning switch.
        self.switches: list[tuple[int, str, str]] = []

    def learn(self, user_id: str, item_id: str, weight: float, ts_ms: int) -> None:
        tuner, seen = self.tuner, self._seen.get(user_id)
        self._n += 1
        # The worker's self-tuning: candidates scored before the event is learned.
        if (
            tuner is not None
            and seen is not None
            and item_id not in seen
            and tuner.sampled(str(self._n))
        ):
            hits = {
                name: item_id in self._list(user_id, self.k, ts_ms, seen, setting)
                for name, setting in tuner.candidates.items()
            }
            switch = tuner.record(hits)
            if switch is not None:
                self.switches.append((ts_ms, switch.old, switch.new))
        self.model.learn_one(user_id, item_id, weight, ts_ms)
        self.popularity.observe(item_id, weight, ts_ms)
        self._seen.setdefault(user_id, set()).add(item_id)

    def recommend(self, user_id: str, k: int, now_ms: int) -> list[str]:
        setting = None if self.tuner is None else self.tuner.served
        return self._list(user_id, k, now_ms, self._seen.get(user_id, set()), setting)

    def _list(
        self,
        user_id: str,
        k: int,
        now_ms: int,
        seen: Collection[str],
        setting: QuerySetting | None,
    ) -> list[str]:
        if setting is not None and setting.popularity:
            return [item for item, _ in self.popularity.top(k, seen)]
        blend = 0.0 if setting is None else setting.popularity_weight
        found = self.model.recommend(
            user_id, 3 * k if blend > 0 else k, now_ms, exclude=seen, setting=setting
        )
        if blend > 0:
            # The worker's blend (Recommender with weight function popularity_blend).
            found = apply_weight_function(
                found, "popularity_blend", "angular", self.popularity, blend
            )[:k]
        return [item for item, _ in found]


@dataclass
class ReplayOutcome:
    """Per-method, per-window tallies of one replay and the counts that frame them."""

    #: ``stats[method][w]`` for scored window ``w``.
    stats: dict[str, list[MethodStats]]
    #: Distinct items seen up to the end of each window.
    catalog_sizes: list[int]
    n_events: int = 0
    n_users: int = 0
    n_items: int = 0
    #: Events of a user's first interaction (no history: not scored).
    first_events: int = 0
    #: Events on an item the user had already interacted with (learned, not scored).
    repeat_events: int = 0
    #: Scored events whose item had never appeared before (a miss for every method).
    cold_item_events: int = 0
    windows: list[tuple[int, int]] = field(default_factory=list)


def replay(
    events: Sequence[EventLike],
    methods: Sequence[Recommender],
    *,
    k: int,
    weights: Sequence[float],
    windows: Sequence[tuple[int, int]] | None = None,
    progress: bool = False,
    desc: str = "replay",
) -> ReplayOutcome:
    """Replay ``events`` through ``methods`` prequentially.

    Parameters
    ----------
    events : sequence of EventLike
        In time order (ties in file order), as :func:`stream_knn.events.sources.read_events`
        returns them.
    methods : sequence of Recommender
        Fresh methods; each learns every event.
    k : int
        Length of the served lists.
    weights : sequence of float
        Learning weight of each event (see :func:`event_weight`).
    windows : sequence of (start, end), optional
        Half-open, ascending, non-overlapping event index ranges to score; events outside
        them are only learned. Default: one window over all events.
    progress : bool
        Show a tqdm progress bar on stderr.
    desc : str
        Label of the progress bar.

    Returns
    -------
    ReplayOutcome
    """
    n = len(events)
    if len(weights) != n:
        raise ConfigError(f"replay got {n} events but {len(weights)} weights")
    spans = list(windows) if windows is not None else [(0, n)]
    stats = {m.name: [MethodStats(k=k) for _ in spans] for m in methods}
    outcome = ReplayOutcome(stats=stats, catalog_sizes=[0] * len(spans), windows=spans)
    seen: dict[str, set[str]] = {}
    catalog: set[str] = set()
    bounds = [(w, start, end) for w, (start, end) in enumerate(spans)]
    current = -1
    perf = time.perf_counter_ns
    with tqdm(
        total=n, desc=desc, unit="ev", file=sys.stderr, disable=not progress, mininterval=0.5
    ) as bar:
        for j, event in enumerate(events):
            while bounds and j >= bounds[0][2]:
                bounds.pop(0)
            current = bounds[0][0] if bounds and j >= bounds[0][1] else -1
            user, item, ts = event.user_id, event.item_id, event.ts_ms
            history = seen.get(user)
            if current >= 0:
                if history is None:
                    outcome.first_events += 1
                elif item in history:
                    outcome.repeat_events += 1
                else:
                    if item not in catalog:
                        outcome.cold_item_events += 1
                    for method in methods:
                        t0 = perf()
                        served = method.recommend(user, k, ts)
                        stats[method.name][current].record(served, item, perf() - t0)
            weight = weights[j]
            for method in methods:
                t0 = perf()
                method.learn(user, item, weight, ts)
                if current >= 0:
                    tally = stats[method.name][current]
                    tally.learn_ns += perf() - t0
                    tally.n_learned += 1
            if history is None:
                seen[user] = {item}
            else:
                history.add(item)
            catalog.add(item)
            if current >= 0:
                outcome.catalog_sizes[current] = len(catalog)
            if j % 256 == 0:
                bar.update(256 if j else 1)
        bar.update(n - bar.n)
    outcome.n_events = n
    outcome.n_users = len(seen)
    outcome.n_items = len(catalog)
    return outcome


def build_methods(
    config: Config,
    n_items: int,
    names: Sequence[str] = METHODS,
    *,
    baseline_memory_mb: float = DEFAULT_BASELINE_MEMORY_MB,
) -> tuple[list[Recommender], dict[str, str]]:
    """Fresh methods for a replay, and a note for each requested method left out.

    Parameters
    ----------
    config : Config
        Model, event-weight and history-window settings.
    n_items : int
        Distinct items of the replay (sizes the item-kNN matrix).
    names : sequence of str
        Any of :data:`METHODS`.
    baseline_memory_mb : float
        Memory budget of the exact item-kNN baseline; over it the baseline is left out
        with a note saying why.
    """
    methods: list[Recommender] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "streaming":
            tuner = (
                tuner_for(config.model.profile_half_life_events, config.serving.tuning_sample_rate)
                if config.serving.self_tuning
                else None
            )
            model = StreamingModel(config.model, config.events)
            methods.append(StreamingModelMethod(model, tuner, config.serving.k))
        elif name == "popularity":
            for label, half_life in POPULARITY_HALF_LIVES.items():
                methods.append(PopularityBaseline(half_life, name=label))
        elif name == "item_knn":
            try:
                methods.append(
                    ItemKnnBaseline(n_items, config.model.profile_max_items, baseline_memory_mb)
                )
            except ConfigError as exc:
                skipped[name] = str(exc)
                logger.warning("item-kNN baseline left out: %s", exc)
        else:
            raise ConfigError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return methods, skipped


@dataclass(frozen=True)
class EvaluationResult:
    """What an ``evaluate`` run measured, ready to print or dump as JSON."""

    k: int
    results: dict[str, MethodResult]
    skipped: dict[str, str]
    n_events: int
    n_users: int
    n_items: int
    first_events: int
    repeat_events: int
    cold_item_events: int
    #: Per method, its metrics in each of :attr:`windows` (consecutive, equal event counts).
    by_window: dict[str, list[MethodResult]] = field(default_factory=dict)
    #: ``(first, last)`` event time of each window, epoch ms.
    windows: list[tuple[int, int]] = field(default_factory=list)
    #: The streaming model's self-tuning: settings served, samples, hit rates, switches
    #: (None when it was off or the model did not run).
    tuning: dict[str, Any] | None = None

    @property
    def strongest_popularity(self) -> str | None:
        """The popularity baseline with the highest HR@k (None if none ran)."""
        pops = [n for n in self.results if n.startswith("popularity")]
        return max(pops, key=lambda n: self.results[n].hr) if pops else None

    def ratio(self, method: str, reference: str) -> float | None:
        """HR@k of ``method`` over HR@k of ``reference`` (None when undefined);
        ``reference = "popularity"`` means the strongest popularity baseline."""
        if reference == "popularity":
            reference = self.strongest_popularity or reference
        a, b = self.results.get(method), self.results.get(reference)
        if a is None or b is None or b.hr == 0:
            return None
        return a.hr / b.hr


def evaluate_events(
    events: Sequence[EventLike],
    config: Config,
    *,
    k: int = 10,
    names: Sequence[str] = METHODS,
    baseline_memory_mb: float = DEFAULT_BASELINE_MEMORY_MB,
    progress: bool = False,
) -> EvaluationResult:
    """Replay ``events`` through the streaming model and the baselines in one run.

    Parameters
    ----------
    events : sequence of EventLike
        Time-ordered events.
    config : Config
        Settings of the model and the event weights.
    k : int
        Length of the served lists and the metric cutoff.
    names : sequence of str
        Methods to compare (default: all of :data:`METHODS`).
    baseline_memory_mb : float
        Memory budget of the exact item-kNN baseline.
    progress : bool
        Show a progress bar on stderr.
    """
    if k < 1:
        raise ConfigError(f"k = {k} is not valid; need >= 1")
    weights = [event_weight(e, config.events) for e in events]
    n_items = len({e.item_id for e in events})
    methods, skipped = build_methods(config, n_items, names, baseline_memory_mb=baseline_memory_mb)
    n = len(events)
    parts = max(1, min(EVAL_WINDOWS, n))
    cuts = [n * w // parts for w in range(parts + 1)]
    spans = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    outcome = replay(
        events, methods, k=k, weights=weights, windows=spans, progress=progress, desc="evaluate"
    )
    catalog = outcome.catalog_sizes[-1] if outcome.catalog_sizes else 0
    results = {m.name: merge_stats(outcome.stats[m.name]).result(k, catalog) for m in methods}
    by_window = {
        m.name: [
            s.result(k, size)
            for s, size in zip(outcome.stats[m.name], outcome.catalog_sizes, strict=True)
        ]
        for m in methods
    }
    tuning = None
    for method in methods:
        if isinstance(method, StreamingModelMethod) and method.tuner is not None:
            tuner = method.tuner
            tuning = {
                "served_first": next(iter(tuner.candidates)),
                "served_last": tuner.served.name,
                "candidates": {
                    c.name: {"half_life_events": c.half_life_events, "max_items": c.max_items}
                    for c in tuner.candidates.values()
                },
                "samples": tuner.samples,
                "hit_rates": tuner.hit_rates,
                "switches": [
                    {"ts_ms": ts, "from": old, "to": new} for ts, old, new in method.switches
                ],
            }
    return EvaluationResult(
        tuning=tuning,
        by_window=by_window,
        windows=[(events[a].ts_ms, events[b - 1].ts_ms) for a, b in spans],
        k=k,
        results=results,
        skipped=skipped,
        n_events=outcome.n_events,
        n_users=outcome.n_users,
        n_items=outcome.n_items,
        first_events=outcome.first_events,
        repeat_events=outcome.repeat_events,
        cold_item_events=outcome.cold_item_events,
    )
