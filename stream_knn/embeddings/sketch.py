"""Random-indexing sketch: online item vectors whose cosines approximate item-kNN cosines.

Each user has a fixed pseudo-random unit vector ``r_u`` derived from a stable hash of the
user id (blake2b, never Python's salted ``hash``), so every process and every restart
agrees on it without storing it. An event ``(user, item, weight, ts)`` adds
``weight * r_u`` to the item's vector, after decaying the vector to ``ts``. Item vectors
are then sketches (random projections) of the decayed, weighted columns of the user-item
matrix: ``v_i . v_j`` approximates the decayed co-occurrence ``sum_u w_ui w_uj`` and the
cosine of two item vectors approximates the cosine item-kNN similarity. The error of the
cross-user terms is about ``1/sqrt(dims)`` of the product of the vector norms (Johnson-
Lindenstrauss); user vectors are normalised to exactly unit length so the same-user terms
carry no error at all.

Semantics worth knowing:

* **Order-independent.** The state after a set of events does not depend on their arrival
  order: every contribution ends up decayed by ``2 ** (-(T - ts) / half_life)`` where ``T``
  is the newest timestamp seen, and an out-of-order event never makes a vector grow.
* **At-least-once.** Applying the same event twice adds it twice. Replays after a crash
  therefore over-weight the replayed events slightly; deduplicate upstream (event ids) if
  that matters.
* **Lazy decay.** Decay is applied only when an item is updated. Cosine is scale-invariant,
  so vectors of items last updated at different times still compare correctly.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_knn.errors import DimensionError

__all__ = ["ItemState", "RandomIndexing", "activity_weight"]

Vector = npt.NDArray[np.float32]

#: Recently used user vectors kept per sketch; bounded so memory does not grow with users.
DEFAULT_CACHE_SIZE = 65_536

# Header of a stored item state: format version, last event time (ms), event count, decayed
# total weight (the item's recent popularity). Little-endian, no padding.
_HEADER = struct.Struct("<BqQd")
_FORMAT_VERSION = 1


def activity_weight(n_user_events: int) -> float:
    """Down-weight of an event by the activity of the user who made it.

    Item-kNN works better when very active users count less (each of their events says less
    about taste), and in the sketch heavy users also add most of the random cross-user
    noise. The factor is ``1 / log2(1 + n)`` for a user with ``n`` events so far (including
    this one), 1.0 for a user's first event.

    Parameters
    ----------
    n_user_events
        Number of events of this user so far, this one included (``UserProfile.version``).

    Returns
    -------
    float
        Factor in ``(0, 1]``.

    Examples
    --------
    >>> activity_weight(1), activity_weight(3)
    (1.0, 0.5)
    """
    return 1.0 / math.log2(1.0 + max(1, n_user_events))


@dataclass(frozen=True)
class ItemState:
    """Learned state of one item: its sketch vector, decayed to ``last_ts_ms``.

    Attributes
    ----------
    vector
        float32 array of shape ``(dims,)``; its norm is meaningless, its direction is the
        item's embedding.
    last_ts_ms
        Event time (epoch ms) the vector is decayed to: the newest event time applied.
    count
        Number of events applied (not decayed).
    popularity
        Sum of event weights decayed to ``last_ts_ms`` (the item's recent popularity).
    """

    vector: Vector
    last_ts_ms: int
    count: int
    popularity: float = 0.0

    def to_bytes(self) -> bytes:
        """Serialise as a 25-byte header and the float32 little-endian vector.

        Returns
        -------
        bytes
            ``25 + 4 * dims`` bytes.
        """
        header = _HEADER.pack(_FORMAT_VERSION, self.last_ts_ms, self.count, self.popularity)
        return header + np.asarray(self.vector, dtype="<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dims: int) -> ItemState:
        """Read what :meth:`to_bytes` wrote.

        Parameters
        ----------
        data
            Serialised state.
        dims
            Expected dimension.

        Raises
        ------
        DimensionError
            If the payload does not hold ``dims`` finite float32 values or the format
            version is unknown.
        """
        expected = _HEADER.size + 4 * dims
        if len(data) != expected:
            raise DimensionError(
                f"stored item state has {len(data)} bytes, expected {expected} for "
                f"dims={dims}; was it written with another model.sketch_dims?"
            )
        version, last_ts_ms, count, popularity = _HEADER.unpack_from(data)
        if version != _FORMAT_VERSION:
            raise DimensionError(
                f"stored item state has format version {version}, this code reads "
                f"{_FORMAT_VERSION}; rebuild the item table"
            )
        vector = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
        if not np.isfinite(vector).all():
            raise DimensionError("stored item vector holds NaN or inf; the record is corrupt")
        return cls(vector, int(last_ts_ms), int(count), float(popularity))


class RandomIndexing:
    """Online item vectors from a random-indexing sketch with lazy exponential decay.

    Parameters
    ----------
    dims
        Vector dimension.
    seed
        Seed mixed into every user vector; all processes of a deployment must agree on it.
    half_life_seconds
        Half-life of an event's contribution, in seconds of event time.
    cache_size
        Number of recently used user vectors kept in memory.

    Examples
    --------
    >>> ri = RandomIndexing(dims=8, seed=0, half_life_seconds=10.0)
    >>> s = ri.update(None, "alice", 1.0, ts_ms=0)
    >>> s = ri.update(s, "alice", 1.0, ts_ms=10_000)  # one half-life later: 0.5 + 1
    >>> bool(np.allclose(s.vector, 1.5 * ri.user_vector("alice")))
    True
    """

    def __init__(
        self,
        dims: int,
        seed: int,
        half_life_seconds: float,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if dims < 1:
            raise DimensionError(f"dims must be >= 1, got {dims}")
        if not half_life_seconds > 0:
            raise ValueError(f"half_life_seconds must be > 0, got {half_life_seconds}")
        self.dims = dims
        self.seed = seed
        self.half_life_seconds = float(half_life_seconds)
        self._half_life_ms = self.half_life_seconds * 1000.0
        self._cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._key = seed.to_bytes(16, "little", signed=True)

    def user_vector(self, user_id: str) -> Vector:
        """The fixed pseudo-random unit vector of ``user_id`` (read-only array).

        Derived as blake2b(user id, key=seed) -> 64-bit seed -> numpy PCG64 Gaussian,
        normalised to unit length; identical in every process and numpy release that keeps
        the PCG64 stream stable.
        """
        cached = self._cache.get(user_id)
        if cached is not None:
            self._cache.move_to_end(user_id)
            return cached
        digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8, key=self._key).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
        gaussian = rng.standard_normal(self.dims)
        vector = (gaussian / np.linalg.norm(gaussian)).astype(np.float32)
        vector.flags.writeable = False
        if self._cache_size:
            self._cache[user_id] = vector
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vector

    def decay_factor(self, elapsed_ms: float) -> float:
        """``2 ** (-elapsed / half_life)`` for an elapsed event time in ms (>= 0)."""
        return float(2.0 ** (-elapsed_ms / self._half_life_ms))

    def update(self, state: ItemState | None, user_id: str, weight: float, ts_ms: int) -> ItemState:
        """Apply one event to an item's state and return the new state.

        Parameters
        ----------
        state
            Current state of the item, ``None`` for an item never seen.
        user_id
            Who acted.
        weight
            Event weight (already scaled, e.g. by :func:`activity_weight`).
        ts_ms
            Event time, epoch ms. A time older than ``state.last_ts_ms`` decays the
            contribution instead of the stored vector (never grows the past).

        Returns
        -------
        ItemState
            A new state; ``state`` is not modified.
        """
        user = self.user_vector(user_id)
        if state is None:
            return ItemState((weight * user).astype(np.float32), int(ts_ms), 1, float(weight))
        self._check_dims(state)
        if ts_ms >= state.last_ts_ms:
            old = self.decay_factor(ts_ms - state.last_ts_ms)
            vector = state.vector * np.float32(old) + np.float32(weight) * user
            return ItemState(
                vector.astype(np.float32, copy=False),
                int(ts_ms),
                state.count + 1,
                state.popularity * old + weight,
            )
        new = weight * self.decay_factor(state.last_ts_ms - ts_ms)
        vector = state.vector + np.float32(new) * user
        return ItemState(
            vector.astype(np.float32, copy=False),
            state.last_ts_ms,
            state.count + 1,
            state.popularity + new,
        )

    def update_many(
        self,
        state: ItemState | None,
        user_ids: Sequence[str],
        weights: Sequence[float] | npt.NDArray[np.floating],
        ts_ms: Sequence[int] | npt.NDArray[np.integer],
    ) -> ItemState:
        """Apply a batch of events of one item at once.

        Equal (up to float rounding) to calling :meth:`update` for each event in any order:
        each contribution is decayed to the newest time ``T`` of the batch and the stored
        state, and the stored vector by ``T - last_ts_ms``.

        Parameters
        ----------
        state
            Current state of the item, ``None`` for a new item.
        user_ids, weights, ts_ms
            The events, in parallel sequences of equal length.

        Returns
        -------
        ItemState
            The new state (``state`` itself if the batch is empty).
        """
        n = len(user_ids)
        if not (n == len(weights) == len(ts_ms)):
            raise ValueError(
                f"user_ids, weights and ts_ms must have equal lengths, got "
                f"{n}, {len(weights)}, {len(ts_ms)}"
            )
        if n == 0:
            if state is None:
                raise ValueError("update_many of an empty batch needs an existing state")
            return state
        times = np.asarray(ts_ms, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        newest = int(times.max())
        if state is not None:
            self._check_dims(state)
            newest = max(newest, state.last_ts_ms)
        factors = w * np.exp2(-(newest - times) / self._half_life_ms)
        users = np.stack([self.user_vector(u) for u in user_ids])
        vector = (factors @ users).astype(np.float32)
        popularity = float(factors.sum())
        count = n
        if state is not None:
            old = self.decay_factor(newest - state.last_ts_ms)
            vector = vector + state.vector * np.float32(old)
            popularity += state.popularity * old
            count += state.count
        return ItemState(vector.astype(np.float32, copy=False), newest, count, popularity)

    def _check_dims(self, state: ItemState) -> None:
        if state.vector.shape != (self.dims,):
            raise DimensionError(
                f"item state has shape {state.vector.shape}, this sketch has dims={self.dims}"
            )
