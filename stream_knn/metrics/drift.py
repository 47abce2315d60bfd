"""Drift mathematics: how far embeddings, neighbour lists and the input stream have moved.

Plain numpy and dictionaries, no Kafka and no Prometheus: the worker feeds these functions
snapshots and exports the numbers as ``stream_knn_*_drift`` gauges; the offline replay can
call the very same code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_knn.errors import ConfigError, DimensionError

__all__ = [
    "OTHER",
    "AlignedCounts",
    "DriftThresholds",
    "EmbeddingDrift",
    "InputDriftMonitor",
    "align_counts",
    "embedding_drift",
    "js_divergence",
    "neighbour_drift",
    "psi",
]

logger = logging.getLogger(__name__)

#: Label of the bucket that collects every category outside the kept top ones.
OTHER = "__other__"

_Counts = npt.ArrayLike


@dataclass(frozen=True)
class EmbeddingDrift:
    """How far item vectors moved between two snapshots (see :func:`embedding_drift`).

    Attributes
    ----------
    mean_cosine_shift : float
        Mean of ``1 - cos(old_i, new_i)`` over the common items, in ``[0, 2]``; NaN when
        there is no common item.
    centroid_shift : float
        ``1 - cos`` between the means of the old and of the new unit vectors of the common
        items, in ``[0, 2]``; NaN when there is no common item or a mean is the zero vector.
    common_items : int
        Items present, with a non-zero vector, in both snapshots.
    """

    mean_cosine_shift: float
    centroid_shift: float
    common_items: int

    def values(self) -> dict[str, float]:
        """The two shifts keyed by their ``kind`` label (and :class:`DriftThresholds` name)."""
        return {"item_cosine_shift": self.mean_cosine_shift, "centroid_shift": self.centroid_shift}


@dataclass(frozen=True)
class DriftThresholds:
    """Values above which a drift measure is reported as crossed (strictly above).

    Calibrated on :class:`~stream_knn.events.synthetic.SyntheticStream` (10 clusters, 2 per
    user, 25k events between snapshots) with the random-indexing sketch, half-life 200 s of
    event time. Well-sampled catalog (200 users, 110 items): stationary item cosine shift
    0.057-0.059, a taste shift 0.39; centroid shift below 0.005 in both (a taste shift
    reshuffles items, it does not move the catalog as a whole); neighbour drift 0 when
    stationary, 0.90 when the item structure is permuted. Input windows of 5k events, top 50:
    stationary item-popularity JS 0.004-0.009, a taste shift with 1-3 users 0.54-0.88;
    event-type JS below 5e-4. Sparse data moves the stationary level up (1000 users, 500
    items: cosine shift 0.42, neighbour drift 0.88 from exchangeable neighbours), so
    re-calibrate on a replay of your own traffic. Field names are the label values of the
    drift gauges, so :meth:`crossed` takes their values as is.

    Attributes
    ----------
    item_cosine_shift : float
        Mean ``1 - cos`` of items' old and new vectors (default 0.2).
    centroid_shift : float
        ``1 - cos`` of the old and new mean unit vectors (default 0.1).
    neighbour_drift : float
        ``1 -`` mean Jaccard of probe items' top-k lists (default 0.5).
    item_popularity : float
        Jensen-Shannon divergence (base 2) of item popularity, top items plus the rest (0.1).
    event_type : float
        Jensen-Shannon divergence (base 2) of the event-type mix (default 0.02; four or five
        categories with tens of thousands of events leave sampling noise near 1e-5, and 0.02
        is e.g. a view share that falls from 80 % to 60 %).
    """

    item_cosine_shift: float = 0.2
    centroid_shift: float = 0.1
    neighbour_drift: float = 0.5
    item_popularity: float = 0.1
    event_type: float = 0.02

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"drift threshold {f.name} = {value!r} is not valid; need a number >= 0"
                )

    def crossed(self, values: Mapping[str, float]) -> list[str]:
        """Names in ``values`` whose value is strictly above its threshold, sorted.

        Parameters
        ----------
        values
            Drift values keyed by threshold name (``item_cosine_shift``, ``centroid_shift``,
            ``neighbour_drift``, ``item_popularity``, ``event_type``). NaN never crosses.

        Returns
        -------
        list of str
            The crossing names in alphabetical order; empty when none crosses.

        Raises
        ------
        ConfigError
            A name has no threshold.

        Examples
        --------
        >>> DriftThresholds().crossed({"neighbour_drift": 0.7, "centroid_shift": 0.05})
        ['neighbour_drift']
        """
        known = {f.name for f in dataclasses.fields(self)}
        out = []
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"no drift threshold named {name!r}; known: {', '.join(sorted(known))}"
                )
            if value > getattr(self, name):  # NaN compares False: an unknown drift is no alarm
                out.append(name)
        return sorted(out)


@dataclass(frozen=True)
class AlignedCounts:
    """Two count vectors over the same categories (see :func:`align_counts`)."""

    labels: tuple[str, ...]
    reference: npt.NDArray[np.float64]
    current: npt.NDArray[np.float64]


def embedding_drift(
    old_ids: Sequence[str],
    old_vectors: npt.ArrayLike,
    new_ids: Sequence[str],
    new_vectors: npt.ArrayLike,
) -> EmbeddingDrift:
    """Compare two snapshots of item vectors on the items they share.

    Only items present in both snapshots with a non-zero vector in each count: a zero vector
    has no direction (an item not learned yet), and items that appeared or vanished are
    catalog churn, not drift. Both measures use this same population so they can be read
    side by side:

    * ``mean_cosine_shift`` = mean over common items of ``1 - cos(old_i, new_i)``: how much
      an average item moved (0 unchanged, 1 orthogonal, 2 reversed).
    * ``centroid_shift`` = ``1 - cos(mean_i old_i/|old_i|, mean_i new_i/|new_i|)``: how much
      the catalog moved as a whole. It stays near 0 when items move in different directions
      (a reshuffle) and rises when they move together (a global taste change or a change of
      the model's coordinates); scale changes of vectors are ignored by both.

    Parameters
    ----------
    old_ids, new_ids
        Unique item ids, one per row of the matching vectors.
    old_vectors, new_vectors
        Arrays of shape ``(len(ids), dims)`` with the same ``dims``, finite values.

    Returns
    -------
    EmbeddingDrift
        The two shifts and the number of common items (NaN shifts when none is common).

    Raises
    ------
    DimensionError
        Shapes disagree with the ids or each other, an id repeats, or a value is NaN/inf.

    Examples
    --------
    >>> d = embedding_drift(["a", "b"], [[1, 0], [0, 1]], ["a", "b"], [[0, 1], [0, 1]])
    >>> d.mean_cosine_shift, d.common_items
    (0.5, 2)
    """
    old = _matrix("old", old_ids, old_vectors)
    new = _matrix("new", new_ids, new_vectors)
    if old.shape[1] != new.shape[1]:
        raise DimensionError(
            f"old vectors have {old.shape[1]} dimensions and new ones {new.shape[1]}; "
            "compare snapshots of the same model"
        )
    old_rows = _rows_by_id("old", old_ids)
    new_rows = _rows_by_id("new", new_ids)
    common = [i for i in old_rows if i in new_rows]
    a = old[[old_rows[i] for i in common]] if common else old[:0]
    b = new[[new_rows[i] for i in common]] if common else new[:0]
    a_norm = np.linalg.norm(a, axis=1)
    b_norm = np.linalg.norm(b, axis=1)
    keep = (a_norm > 0) & (b_norm > 0)
    n = int(keep.sum())
    if n == 0:
        return EmbeddingDrift(math.nan, math.nan, 0)
    a_unit = a[keep] / a_norm[keep, None]
    b_unit = b[keep] / b_norm[keep, None]
    cosines = np.clip(np.einsum("ij,ij->i", a_unit, b_unit), -1.0, 1.0)
    mean_shift = float(np.mean(1.0 - cosines))
    centroid = _cosine(a_unit.mean(axis=0), b_unit.mean(axis=0))
    return EmbeddingDrift(
        mean_cosine_shift=_snap(mean_shift),
        centroid_shift=_snap(1.0 - centroid) if not math.isnan(centroid) else math.nan,
        common_items=n,
    )


def neighbour_drift(
    old_neighbours: Mapping[str, Sequence[str]], new_neighbours: Mapping[str, Sequence[str]]
) -> float:
    """``1 -`` mean Jaccard similarity of the top-k sets of probe items found in both.

    Parameters
    ----------
    old_neighbours, new_neighbours
        For each probe item, its neighbour ids (order is ignored) under the old and the new
        index. Probes present in only one mapping are skipped; two empty lists count as
        identical (Jaccard 1).

    Returns
    -------
    float
        In ``[0, 1]``: 0 when every common probe kept exactly its neighbours, 1 when all
        changed; NaN when no probe is in both mappings.

    Examples
    --------
    >>> neighbour_drift({"a": ["x", "y"]}, {"a": ["y", "z"]})
    0.6666666666666667
    """
    scores = []
    for probe, old in old_neighbours.items():
        if probe not in new_neighbours:
            continue
        a, b = set(old), set(new_neighbours[probe])
        union = len(a | b)
        scores.append(len(a & b) / union if union else 1.0)
    if not scores:
        return math.nan
    return _snap(1.0 - math.fsum(scores) / len(scores))


def align_counts(
    reference: Mapping[str, float], current: Mapping[str, float], top: int | None = None
) -> AlignedCounts:
    """Put two dictionaries of category counts on the same categories.

    With ``top`` set, the kept categories are the ``top`` most frequent of the reference
    together with the ``top`` most frequent of the current counts (ties broken by label, so
    the result is deterministic); everything else is summed into a last :data:`OTHER`
    bucket. Taking both sides' heads makes the comparison symmetric: an item that becomes
    popular gets its own bucket instead of hiding in the tail. Without ``top`` every
    category is kept and the :data:`OTHER` bucket is zero.

    Parameters
    ----------
    reference, current
        Non-negative counts by category.
    top
        Head size per side, or None for every category.

    Returns
    -------
    AlignedCounts
        Labels (kept categories sorted, then :data:`OTHER`) and the two count vectors.

    Examples
    --------
    >>> a = align_counts({"x": 5, "y": 1, "z": 1}, {"x": 1, "w": 4}, top=1)
    >>> a.labels, a.reference.tolist(), a.current.tolist()
    (('w', 'x', '__other__'), [0.0, 5.0, 2.0], [4.0, 1.0, 0.0])
    """
    if top is not None and top < 0:
        raise ConfigError(f"top = {top} is not valid; need >= 0 or None")
    if top is None:
        kept = set(reference) | set(current)
    else:
        kept = set(_head(reference, top)) | set(_head(current, top))
    labels = sorted(kept)
    ref = [float(reference.get(k, 0.0)) for k in labels]
    cur = [float(current.get(k, 0.0)) for k in labels]
    ref.append(math.fsum(float(v) for k, v in reference.items() if k not in kept))
    cur.append(math.fsum(float(v) for k, v in current.items() if k not in kept))
    return AlignedCounts(
        labels=(*labels, OTHER),
        reference=np.asarray(ref, dtype=np.float64),
        current=np.asarray(cur, dtype=np.float64),
    )


def psi(reference_counts: _Counts, current_counts: _Counts, eps: float = 1e-4) -> float:
    """Population stability index of two aligned count vectors.

    ``PSI = sum_i (q_i - p_i) * ln(q_i / p_i)`` where ``p`` and ``q`` are the reference and
    current shares, each share first raised to at least ``eps`` so an empty bin on one side
    gives a large but finite term. Natural logarithm, as in the credit-scoring convention
    (< 0.1 stable, 0.1-0.25 moderate, > 0.25 significant).

    Parameters
    ----------
    reference_counts, current_counts
        Non-negative counts over the same categories, each with a positive total.
    eps
        Floor of a share, > 0.

    Returns
    -------
    float
        ``>= 0``; 0 for identical shares.

    Examples
    --------
    >>> round(psi([1, 1], [1, 3]), 6)
    0.274653
    """
    if not eps > 0:
        raise ConfigError(f"psi eps = {eps!r} is not valid; need > 0")
    p, q = _shares(reference_counts, current_counts)
    p = np.maximum(p, eps)
    q = np.maximum(q, eps)
    return _snap(float(np.sum((q - p) * np.log(q / p))))


def js_divergence(p: _Counts, q: _Counts) -> float:
    """Jensen-Shannon divergence, base 2, of two aligned count (or probability) vectors.

    ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2`` after normalising each
    vector to sum 1; ``0 log 0 = 0``, so empty bins need no smoothing. Symmetric, bounded in
    ``[0, 1]``: 0 for identical distributions, 1 for disjoint supports.

    Parameters
    ----------
    p, q
        Non-negative counts over the same categories, each with a positive total.

    Returns
    -------
    float
        The divergence in bits, in ``[0, 1]``.

    Examples
    --------
    >>> js_divergence([1, 0], [0, 1]), js_divergence([2, 2], [1, 1])
    (1.0, 0.0)
    """
    a, b = _shares(p, q)
    m = (a + b) / 2.0
    value = 0.5 * _kl2(a, m) + 0.5 * _kl2(b, m)
    return min(1.0, _snap(value))


class InputDriftMonitor:
    """Jensen-Shannon drift of item popularity and of the event-type mix, in tumbling windows.

    Events are counted in consecutive windows of ``window_events`` events. The first full
    window becomes the reference; each later full window is compared with the reference and
    then becomes the reference itself (the reference rolls forward one window at a time).
    The monitor therefore measures change between adjacent windows: a sudden shift shows up
    as a spike for the window or two that straddle it, and a slow, steady trend as a level
    proportional to its speed. Gauges keep the last value until the next window closes, so
    alert on ``max_over_time`` of a few windows rather than on an instantaneous value.

    Item popularity keeps the ``top_items`` most frequent items of either window and folds
    the long tail into one :data:`OTHER` bucket, so the cost and the sampling noise do not
    grow with the catalog.

    Parameters
    ----------
    window_events
        Events per window, >= 1. For a stationary stream the divergence of two windows is
        sampling noise of about ``(bins - 1) / (2.77 * window_events)`` bits, with up to
        ``2 * top_items + 1`` item bins: keep it far below the threshold.
    top_items
        Head size of the item-popularity distribution per window, >= 1.
    thresholds
        Used by :meth:`crossed` and to log a warning when a window crosses one.

    Examples
    --------
    >>> m = InputDriftMonitor(window_events=2, top_items=10)
    >>> m.observe_many([("a", "view"), ("b", "view")])  # the first window: the reference
    >>> m.current()
    {}
    >>> m.observe_many([("b", "view"), ("a", "view")])  # same shares: no drift
    >>> m.current()
    {'item_popularity': 0.0, 'event_type': 0.0}
    >>> m.observe_many([("c", "view"), ("c", "view")])  # disjoint items: maximal drift
    >>> m.current()["item_popularity"]
    1.0
    """

    def __init__(
        self,
        window_events: int = 50_000,
        top_items: int = 100,
        thresholds: DriftThresholds | None = None,
    ) -> None:
        if window_events < 1:
            raise ConfigError(f"window_events = {window_events} is not valid; need >= 1")
        if top_items < 1:
            raise ConfigError(f"top_items = {top_items} is not valid; need >= 1")
        self.window_events = window_events
        self.top_items = top_items
        self.thresholds = thresholds or DriftThresholds()
        self._items: Counter[str] = Counter()
        self._types: Counter[str] = Counter()
        self._seen = 0
        self._reference: tuple[Counter[str], Counter[str]] | None = None
        self._values: dict[str, float] = {}
        self._windows = 0

    @property
    def windows(self) -> int:
        """Full windows closed so far (values exist from the second one on)."""
        return self._windows

    def observe(self, item_id: str, event_type: str) -> None:
        """Count one event; closes the window when it is full."""
        self._items[item_id] += 1
        self._types[event_type] += 1
        self._seen += 1
        if self._seen >= self.window_events:
            self._close_window()

    def observe_many(self, events: Iterable[tuple[str, str]]) -> None:
        """Count ``(item_id, event_type)`` pairs, as :meth:`observe` one by one."""
        for item_id, event_type in events:
            self.observe(item_id, event_type)

    def current(self) -> dict[str, float]:
        """Divergences of the last closed window against its reference.

        Returns
        -------
        dict
            ``{"item_popularity": js, "event_type": js}``; empty until two windows closed.
        """
        return dict(self._values)

    def crossed(self) -> list[str]:
        """Names of the current values above their thresholds (see :class:`DriftThresholds`)."""
        return self.thresholds.crossed(self._values)

    def _close_window(self) -> None:
        window = (self._items, self._types)
        self._items, self._types, self._seen = Counter(), Counter(), 0
        self._windows += 1
        if self._reference is not None:
            ref_items, ref_types = self._reference
            items = align_counts(ref_items, window[0], top=self.top_items)
            types = align_counts(ref_types, window[1])
            self._values = {
                "item_popularity": js_divergence(items.reference, items.current),
                "event_type": js_divergence(types.reference, types.current),
            }
            crossed = self.crossed()
            if crossed:
                logger.warning(
                    "input drift above threshold in window %d: %s",
                    self._windows,
                    ", ".join(f"{n}={self._values[n]:.4f}" for n in crossed),
                )
        self._reference = window


def _matrix(name: str, ids: Sequence[str], vectors: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(vectors, dtype=np.float64)
    if array.size == 0 and len(ids) == 0:
        # An empty snapshot: its dimension is unknown, accept any 2-D emptiness.
        return array.reshape(0, array.shape[-1] if array.ndim == 2 else 0)
    if array.ndim != 2 or array.shape[0] != len(ids):
        raise DimensionError(
            f"{name} vectors have shape {array.shape}; expected ({len(ids)}, dims), "
            f"one row per {name} id"
        )
    if not np.isfinite(array).all():
        raise DimensionError(f"{name} vectors hold NaN or inf; drift needs finite vectors")
    return array


def _rows_by_id(name: str, ids: Sequence[str]) -> dict[str, int]:
    rows = {item: row for row, item in enumerate(ids)}
    if len(rows) != len(ids):
        repeated = next(item for item, n in Counter(ids).items() if n > 1)
        raise DimensionError(
            f"{name} ids repeat {repeated!r}; ids and vectors must match one to one"
        )
    return rows


def _head(counts: Mapping[str, float], top: int) -> list[str]:
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _shares(p: _Counts, q: _Counts) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise DimensionError(
            f"count vectors have shapes {a.shape} and {b.shape}; align them first "
            "(align_counts) so both cover the same categories"
        )
    for side in (a, b):
        if not np.isfinite(side).all() or (side < 0).any() or side.sum() <= 0:
            raise DimensionError(
                "counts must be finite, non-negative and have a positive total; "
                "skip drift until both windows hold events"
            )
    return a / a.sum(), b / b.sum()


def _kl2(a: npt.NDArray[np.float64], m: npt.NDArray[np.float64]) -> float:
    mask = a > 0  # m > 0 wherever a > 0, since m >= a / 2
    return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def _snap(value: float) -> float:
    # Floating-point sums of identical inputs leave residues like 1e-17 or -2e-16; drift of
    # identical snapshots is exactly 0 and should read so on a dashboard.
    return 0.0 if abs(value) < 1e-12 else value
