"""User profiles: a bounded list of recent interactions and the query vector built from it.

Forgetting a user (a privacy request) is deleting the profile: the worker deletes the
table key, :class:`~stream_knn.embeddings.model.StreamingModel` drops the entry. The user's
past contributions to item vectors cannot be traced back (users enter item vectors only
through an anonymous pseudo-random vector) and fade with the item half-life.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from stream_knn.errors import DimensionError

__all__ = ["Interaction", "UserProfile"]

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
        ids, coefficients = self.query_weights(now_ms, half_life_seconds)
        rows: list[Vector] = []
        kept: list[int] = []
        for pos, item_id in enumerate(ids):
            vector = vectors(item_id)
            if vector is not None:
                rows.append(vector)
                kept.append(pos)
        if not rows:
            return None
        # One matrix product instead of a Python loop per item (this runs per event).
        matrix = np.asarray(rows, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
        usable = (norms > 0.0) & np.isfinite(norms)
        if not usable.all():
            matrix, norms = matrix[usable], norms[usable]
            kept = [p for p, ok in zip(kept, usable.tolist(), strict=True) if ok]
        if not kept:
            return None
        total: npt.NDArray[np.float64] = (coefficients[kept] / norms) @ matrix
        if not np.any(total):
            return None
        return total.astype(np.float32)

    def query_weights(
        self, now_ms: int, half_life_seconds: float
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """Item ids and their coefficients in :meth:`query_vector`.

        For callers holding unit item vectors in a matrix: ``coefficients @ rows`` is the
        query vector (vectorised, no per-item Python arithmetic).

        Returns
        -------
        tuple
            ``(ids, weight_i * 2 ** (-max(0, ref - ts_i) / half_life))``, in profile order,
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
        return ids, weights * np.exp2(-elapsed / (half_life_seconds * 1000.0))

    def to_bytes(self) -> bytes:
        """Compact serialisation: header, int64 times, float64 weights, orjson id list.

        Returns
        -------
        bytes
            ``13 + 16 * n`` bytes plus the JSON list of ids.
        """
        n = len(self.items)
        ts = np.fromiter((t for _, t, _ in self.items), dtype="<i8", count=n)
        weights = np.fromiter((w for _, _, w in self.items), dtype="<f8", count=n)
        ids = orjson.dumps([i for i, _, _ in self.items])
        header = _HEADER.pack(_FORMAT_VERSION, self.version, n)
        return header + ts.tobytes() + weights.tobytes() + ids

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
        if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids):
            raise DimensionError("stored profile is corrupt: id list does not match its header")
        items = tuple(
            (item, int(t), float(w))
            for item, t, w in zip(ids, ts.tolist(), weights.tolist(), strict=True)
        )
        return cls(items, int(version))


def _decay(elapsed_ms: float, half_life_seconds: float) -> float:
    return float(2.0 ** (-elapsed_ms / (half_life_seconds * 1000.0)))
