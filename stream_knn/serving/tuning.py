"""Self-tuning of the query step: candidate settings scored side by side on live events.

A user's list is built from a query vector made of the user's recent items
(:func:`~stream_knn.embeddings.profile.query_vectors`). How much the newest items count
(a rank half-life) and how many items make the query suit some data better than others,
and nobody knows which before seeing the data. On a sample of events the
:class:`SelfTuner` asks: with the user's history *before* this event, would each candidate
setting have put the event's item in its top k? Hit rates are kept per candidate over a
decaying window of samples (the same events for every candidate, so they are compared on
equal terms), and when a candidate beats the served one by a clear margin on enough
samples, it becomes the served setting.

The worker and ``stream-knn evaluate`` (the replay) run the same class with the same
candidates, so the offline figure includes the adaptation. No Kafka here.

Examples
--------
>>> tuner = SelfTuner(DEFAULT_CANDIDATES, "rank5", sample_rate=1.0, min_samples=4, memory=50)
>>> for _ in range(10):
...     switched = tuner.record({"rank5": False, "rank2": True, "recent10": False})
>>> tuner.served.name, len(tuner.switches)
('rank2', 1)
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CANDIDATES",
    "QuerySetting",
    "SelfTuner",
    "Switch",
    "configured_setting",
    "tuner_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuerySetting:
    """How a user's query vector is made: the rank half-life and how many items count."""

    name: str
    #: An item's weight halves with every this many newer items of the user.
    half_life_events: float
    #: Only the newest this many items of the profile make the query (None: all of them).
    max_items: int | None = None
    #: No query at all: the recent-popularity list (where the neighbour signal is weak, a
    #: stream dominated by a few hits, this is the better answer, and the tuner finds it).
    popularity: bool = False
    #: Re-rank the nearest ``3 k`` by ``(1 - w) * similarity + w * popularity`` (both scaled
    #: to 0..1), ``w`` this weight; 0: similarity alone.
    popularity_weight: float = 0.0


#: The candidates: the default (rank half-life 5), a sharper and a flatter decay, a short
#: memory, the default blended with recent popularity, and recent popularity alone. Chosen
#: to span what ML-100K showed (2: 0.165, 5: 0.165, 20: 0.149) without tuning to it.
DEFAULT_CANDIDATES: tuple[QuerySetting, ...] = (
    QuerySetting("rank5", 5.0),
    QuerySetting("rank2", 2.0),
    QuerySetting("rank20", 20.0),
    QuerySetting("recent10", math.inf, 10),
    QuerySetting("rank5+pop", 5.0, popularity_weight=0.2),
    QuerySetting("popular", math.inf, popularity=True),
)


def configured_setting(half_life_events: float) -> QuerySetting:
    """The query setting of ``model.profile_half_life_events`` (named like a candidate)."""
    name = "rank_inf" if math.isinf(half_life_events) else f"rank{half_life_events:g}"
    return QuerySetting(name, half_life_events)


def tuner_for(half_life_events: float, sample_rate: float) -> SelfTuner:
    """A tuner serving the configured rank half-life first, beside the other candidates."""
    served = configured_setting(half_life_events)
    others = [c for c in DEFAULT_CANDIDATES if c.name != served.name]
    return SelfTuner((served, *others), served.name, sample_rate=sample_rate)


@dataclass(frozen=True)
class Switch:
    """The served setting changed after ``sample`` scored samples."""

    sample: int
    old: str
    new: str
    hit_rates: Mapping[str, float]


class SelfTuner:
    """Decayed prequential hit rates of candidate settings; serves the best one.

    Parameters
    ----------
    candidates
        The settings compared (names unique).
    served
        Name of the setting served at the start.
    sample_rate
        Share of events scored by every candidate (each costs one extra list per
        candidate): chosen by a hash of the event's key, so a replay samples the same
        events every time.
    min_samples
        Samples before the first switch (and between two switches).
    margin
        A candidate replaces the served setting when its hit rate is at least
        ``1 + margin`` times the served one's.
    memory
        Samples after which an old sample weighs half (the window follows drifting data).
    """

    def __init__(
        self,
        candidates: Sequence[QuerySetting],
        served: str,
        *,
        sample_rate: float = 0.05,
        min_samples: int = 500,
        margin: float = 0.05,
        memory: float = 5_000.0,
    ) -> None:
        self.candidates = {c.name: c for c in candidates}
        if len(self.candidates) != len(candidates):
            raise ValueError("candidate names must be unique")
        if served not in self.candidates:
            raise ValueError(f"served setting {served!r} is not a candidate")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in 0..1, got {sample_rate}")
        self.served = self.candidates[served]
        self.sample_rate = sample_rate
        self.min_samples = min_samples
        self.margin = margin
        self._keep = 0.5 ** (1.0 / memory)
        self._hits = dict.fromkeys(self.candidates, 0.0)
        self._weight = 0.0
        self.samples = 0
        self._since_switch = 0
        self.switches: list[Switch] = []
        self._threshold = int(sample_rate * 2**32)

    def sampled(self, key: str) -> bool:
        """Whether the event with ``key`` (its id, or its position in a replay) is scored."""
        if self.sample_rate >= 1.0:
            return True
        return zlib.crc32(key.encode()) < self._threshold

    @property
    def hit_rates(self) -> dict[str, float]:
        """Each candidate's decayed hit rate (0.0 before any sample)."""
        w = self._weight
        return {name: (h / w if w > 0 else 0.0) for name, h in self._hits.items()}

    def record(self, hits: Mapping[str, bool]) -> Switch | None:
        """One scored sample: whether each candidate's list held the event's item.

        Returns the switch it caused, if any (the new setting is :attr:`served`).
        """
        keep = self._keep
        for name in self._hits:
            self._hits[name] = self._hits[name] * keep + (1.0 if hits.get(name) else 0.0)
        self._weight = self._weight * keep + 1.0
        self.samples += 1
        self._since_switch += 1
        if self._since_switch < self.min_samples:
            return None
        rates = self.hit_rates
        best = max(rates, key=lambda name: rates[name])
        current = self.served.name
        if best == current or rates[best] < rates[current] * (1.0 + self.margin):
            return None
        switch = Switch(self.samples, current, best, rates)
        self.served = self.candidates[best]
        self._since_switch = 0
        self.switches.append(switch)
        logger.info(
            "self-tuning: serving %s instead of %s after %d samples (hit rates %s)",
            best,
            current,
            self.samples,
            ", ".join(f"{n} {r:.4f}" for n, r in rates.items()),
        )
        return switch
