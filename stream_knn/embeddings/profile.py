"""User profiles: a bounded list of recent interactions and the query vector built from it.

Forgetting a user (a privacy request) is deleting the profile: the worker deletes the
table key, :class:`~stream_knn.embeddings.model.StreamingModel` drops the entry. The user's
past contributions to item vectors cannot be traced back (users enter item vectors only
through an anonymous pseudo-random vector) and fade with the item half-life.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from stream_knn.errors import DimensionError

__all__ = ["Interaction", "UserProfile", "query_vectors"]

Vector = npt.NDArray[np.float32]

#: One recent interaction: (item id, event time in epoch ms, accumulated weight).
Interaction = tuple[str, int, float]

# Header of a stored profile: format version, profile version, number of interactions.
_HEADER = struct.Struct("<BQI")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class UserProfile:
    """Immutable bounded list of a user's recent interactions, newest (last arrived) last.

    Attributes
    ----------
    items
        ``(item_id, ts_ms, weight)`` tuples, at most one per item, in arrival order; a
        repeated item moves to the end.
    version
        Number of interactions ever added (also the user's activity count, which feeds
        :func:`~stream_knn.embeddings.sketch.activity_weight`).

    Examples
    --------
    >>> p = UserProfile().add("a", 1_000, 1.0, cap=2).add("b", 2_000, 1.0, cap=2)
    >>> p.add("c", 3_000, 1.0, cap=2).items
    (('b', 2000, 1.0), ('c', 3000, 1.0))
    """

    items: tuple[Interaction, ...] = ()
    version: int = 0

    def add(
        self,
        item_id: str,
        ts_ms: int,
        weight: float,
        cap: int,
        half_life_seconds: float | None = None,
    ) -> UserProfile:
        """A new profile with one more interaction.

        Parameters
        ----------
        item_id, ts_ms, weight
            The interaction.
        cap
            Maximum number of items kept (``model.profile_max_items``); the oldest go first.
        half_life_seconds
            If given, the weight already held for a repeated item is decayed to the newer of
            the two times before the new weight is added; otherwise weights simply add up.

        Returns
        -------
        UserProfile
            The new profile, ``version`` one higher. A repeated item moves to the end, keeps
            the newer timestamp and accumulates weight.
        """
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        kept: list[Interaction] = []
        new_ts, new_weight = int(ts_ms), float(weight)
        for old in self.items:
            if old[0] != item_id:
                kept.append(old)
                continue
            old_ts, old_weight = old[1], old[2]
            if half_life_seconds is not None:
                newest = max(old_ts, new_ts)
                old_weight *= _decay(newest - old_ts, half_life_seconds)
                new_weight *= _decay(newest - new_ts, half_life_seconds)
            new_ts = max(old_ts, new_ts)
            new_weight += old_weight
        kept.append((item_id, new_ts, new_weight))
        return UserProfile(tuple(kept[-cap:]), self.version + 1)

    def recent_items(self) -> frozenset[str]:
        """Ids of the items in the profile (to exclude from recommendations)."""
        return frozenset(item for item, _, _ in self.items)

    def query_vector(
        self,
        vectors: Callable[[str], Vector | None],
        now_ms: int,
        half_life_seconds: float,
        half_life_events: float = math.inf,
    ) -> Vector | None:
        """The user's query vector for an angular search.

        ``sum_i weight_i * 2 ** (-(now - ts_i) / half_life) * unit(vectors(i))`` over the
        profile's items; items without a vector are skipped, interactions "in the future"
        are not decayed. Ranking candidates by cosine with it ranks them like item-kNN's
        weighted sum of cosine similarities to the user's recent items.

        Parameters
        ----------
        vectors
            Item id -> current (blended) item vector, or ``None`` if the item has none.
        now_ms
            Time to decay to, epoch ms.
        half_life_seconds
            ``model.profile_half_life_seconds``.

        Returns
        -------
        numpy.ndarray or None
            float32 query vector, ``None`` if no item has a (non-zero) vector.
        """
        queries, usable = query_vectors(
            [self], vectors, now_ms, half_life_seconds, half_life_events=half_life_events
        )
        return queries[0] if usable[0] else None

    def query_weights(
        self, now_ms: int, half_life_seconds: float, half_life_events: float = math.inf
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """Item ids and their coefficients in :meth:`query_vector`.

        For callers holding unit item vectors in a matrix: ``coefficients @ rows`` is the
        query vector (vectorised, no per-item Python arithmetic).

        Returns
        -------
        tuple
            ``(ids, weight_i * 2 ** (-max(0, ref - ts_i) / half_life - rank_i / events))``
            in profile order (``rank_i``: newer items in the profile, ``events``:
            ``half_life_events``),
            with ``ref = min(now, newest ts)``: decaying to the newest interaction rather
            than to ``now`` keeps the relative weights (and so the ranking) the same while
            an old history does not underflow to a zero vector.
        """
        n = len(self.items)
        ids = [item for item, _, _ in self.items]
        ts = np.fromiter((t for _, t, _ in self.items), dtype=np.float64, count=n)
        weights = np.fromiter((w for _, _, w in self.items), dtype=np.float64, count=n)
        reference = min(float(now_ms), float(ts.max())) if n else float(now_ms)
        elapsed = np.maximum(0.0, reference - ts)
        rank = np.arange(n - 1, -1, -1, dtype=np.float64)
        return ids, weights * np.exp2(
            -elapsed / (half_life_seconds * 1000.0) - rank / half_life_events
        )

    def to_bytes(self) -> bytes:
        """Compact serialisation: header, int64 times, float64 weights, orjson id list.

        Returns
        -------
        bytes
            ``13 + 16 * n`` bytes plus the JSON list of ids.
        """
        n = len(self.items)
        header = _HEADER.pack(_FORMAT_VERSION, self.version, n)
        if not n:
            return header + b"[]"
        ids, ts, weights = zip(*self.items, strict=True)  # columns in one C pass
        return (
            header
            + np.array(ts, dtype="<i8").tobytes()
            + np.array(weights, dtype="<f8").tobytes()
            + orjson.dumps(ids)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UserProfile:
        """Read what :meth:`to_bytes` wrote.

        Raises
        ------
        DimensionError
            If the bytes are truncated, of an unknown format version or inconsistent.
        """
        try:
            version_byte, version, n = _HEADER.unpack_from(data)
            if version_byte != _FORMAT_VERSION:
                raise DimensionError(
                    f"stored profile has format version {version_byte}, this code reads "
                    f"{_FORMAT_VERSION}"
                )
            offset = _HEADER.size
            ts = np.frombuffer(data, dtype="<i8", count=n, offset=offset)
            offset += 8 * n
            weights = np.frombuffer(data, dtype="<f8", count=n, offset=offset)
            ids = orjson.loads(data[offset + 8 * n :])
        except (struct.error, ValueError) as exc:
            raise DimensionError(f"stored profile is corrupt or truncated: {exc}") from None
        if not isinstance(ids, list) or len(ids) != n or not set(map(type, ids)) <= {str}:
            raise DimensionError("stored profile is corrupt: id list does not match its header")
        # tolist() gives Python ints and floats; zip pairs them in C.
        return cls(tuple(zip(ids, ts.tolist(), weights.tolist(), strict=True)), int(version))


def query_vectors(
    profiles: Sequence[UserProfile | None],
    vectors: Callable[[str], Vector | None],
    now_ms: int | Sequence[int],
    half_life_seconds: float,
    dims: int | None = None,
    *,
    half_life_events: float = math.inf,
    max_items: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """:meth:`UserProfile.query_vector` of many profiles in one numpy pass.

    The item vectors of every profile are gathered into one matrix, scaled by their
    coefficients (:meth:`UserProfile.query_weights`) over their norms and summed per
    profile with ``np.add.reduceat``: no numpy call per profile. ``query_vector`` is this
    function on one profile, so the two agree exactly.

    Parameters
    ----------
    profiles
        The profiles; ``None`` (an unknown user) gets no query.
    vectors
        Item id -> current item vector, or ``None`` if the item has none.
    now_ms
        Time to decay to, epoch ms: one for all profiles or one per profile.
    half_life_seconds
        ``model.profile_half_life_seconds``.
    dims
        Width of the result when no profile has an item with a vector (else taken from
        the vectors).
    half_life_events
        ``model.profile_half_life_events``: an item's weight halves with every this many
        newer items in the profile (its rank from the newest, not its age: the same on a
        stream of any pace).
    max_items
        Only each profile's newest ``max_items`` items make its query (``None``: all).

    Returns
    -------
    tuple
        ``(queries, usable)``: float32 ``(len(profiles), dims)`` query rows and whether
        each row is a query (``False``: no item with a non-zero vector; the row is zero).

    Examples
    --------
    >>> unit = {"a": np.array([3, 4], np.float32), "b": np.array([0, 2], np.float32)}
    >>> p = UserProfile().add("a", 0, 1.0, cap=5).add("b", 0, 2.0, cap=5)
    >>> q, ok = query_vectors([p, None], unit.get, 0, 3600.0)
    >>> q.tolist(), ok.tolist()
    ([[0.6000000238418579, 2.799999952316284], [0.0, 0.0]], [True, False])
    """
    n = len(profiles)
    times = np.asarray(now_ms, dtype=np.float64)
    if times.ndim == 0:
        times = np.full(n, times)
    elif times.shape != (n,):
        raise ValueError(f"now_ms has {times.size} times for {n} profiles")
    cut = -max_items if max_items is not None and max_items > 0 else 0
    counts = np.fromiter((0 if p is None else len(p.items[cut:]) for p in profiles), np.intp, n)
    flat = [it for p in profiles if p is not None for it in p.items[cut:]]
    width = dims
    rows: list[Vector] = []
    kept: list[int] = []
    for pos, (item_id, _, _) in enumerate(flat):
        vector = vectors(item_id)
        if vector is not None:
            rows.append(vector)
            kept.append(pos)
    if rows:
        width = len(rows[0])
    out = np.zeros((n, width or 0), dtype=np.float32)
    usable = np.zeros(n, dtype=np.bool_)
    if not rows:
        return out, usable
    m = len(flat)
    ts = np.fromiter((t for _, t, _ in flat), dtype=np.float64, count=m)
    weights = np.fromiter((w for _, _, w in flat), dtype=np.float64, count=m)
    owners = np.repeat(np.arange(n), counts)
    present = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[present]
    # Decay to the newest interaction (or now, if earlier), as query_weights does.
    reference = np.full(n, np.nan)
    reference[present] = np.minimum(times[present], np.maximum.reduceat(ts, starts))
    elapsed = np.maximum(0.0, reference[owners] - ts)
    coefficients = weights * np.exp2(-elapsed / (half_life_seconds * 1000.0))
    if math.isfinite(half_life_events):
        # Rank from the owner's newest item (profiles are in arrival order).
        rank = (np.cumsum(counts) - 1)[owners] - np.arange(m)
        coefficients *= np.exp2(-rank / half_life_events)
    matrix = np.asarray(rows, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    ok = (norms > 0.0) & np.isfinite(norms)
    picked = np.asarray(kept, dtype=np.intp)[ok]
    if not len(picked):
        return out, usable
    scaled = (coefficients[picked] / norms[ok])[:, None] * matrix[ok]
    # Rows are grouped by owner in profile order: one segment sum per owner with rows.
    row_owner = owners[picked]
    first = np.flatnonzero(np.r_[True, row_owner[1:] != row_owner[:-1]])
    totals = np.add.reduceat(scaled, first, axis=0)
    who = row_owner[first]
    out[who] = totals
    usable[who] = np.any(totals != 0.0, axis=1)
    out[~usable] = 0.0
    return out, usable


def _decay(elapsed_ms: float, half_life_seconds: float) -> float:
    return float(2.0 ** (-elapsed_ms / (half_life_seconds * 1000.0)))
