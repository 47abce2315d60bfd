"""Sampled recall@k of served answers against exact search, scored off the serving thread.

A sample is taken where an answer is made (the event loop, for the worker) and costs
there only a copy of the live index's hidden-row mask: the exact search over every live
item (milliseconds for 100k items) and the exact index it needs per version (tens of
milliseconds) run in this module's own thread, so a sampled query or a new version never
pauses the answers being measured.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_knn.index.base import KnownIds, Metric, Neighbours
from stream_knn.index.exact import ExactIndex, neighbour_rows

__all__ = ["RecallSampler"]

#: Samples waiting to be scored; when full the oldest is dropped (a sample, not a duty).
_QUEUE = 256
#: Samples are gathered until this many wait or the first has waited this long, then
#: scored in one pass: a pass streams the live version's whole matrix (25 MB for 100k
#: items) through the cache, and a pass per sample (20 a second at 2,000 lists/s with
#: the default 1% rate) took 7% of a core and evicted what the searches had cached.
_GATHER_SAMPLES = 64
_GATHER_SECONDS = 1.0


@dataclass(frozen=True)
class _Sample:
    #: The live version searched (None before the first): its ids and matrix.
    known: KnownIds | None
    matrix: npt.NDArray[np.float32] | None
    #: Its rows skipped at the time of the query (changed or deleted items).
    hidden: npt.NDArray[np.bool_] | None
    query: npt.NDArray[np.float32]
    k: int
    exclude: Collection[str]
    #: The exact part of the answer: the best items of the delta, searched exactly.
    delta: Neighbours
    result: Neighbours


class RecallSampler:
    """Scores sampled answers in a daemon thread (started with the first sample)."""

    def __init__(self, dims: int, metric: Metric, window: int) -> None:
        self.dims = dims
        self.metric: Metric = metric
        self._cond = threading.Condition()
        self._jobs: deque[_Sample] = deque(maxlen=_QUEUE)
        self._recall: deque[float] = deque(maxlen=window)
        self._busy = False
        self._closed = False
        #: Callers of :meth:`settle` waiting: queued samples are scored at once.
        self._settling = 0
        self._thread: threading.Thread | None = None
        #: The exact index of the last live version sampled (keyed by its matrix).
        self._oracle: tuple[npt.NDArray[np.float32], ExactIndex] | None = None

    def submit(
        self,
        known: KnownIds | None,
        matrix: npt.NDArray[np.float32] | None,
        hidden: npt.NDArray[np.bool_] | None,
        query: npt.NDArray[np.float32],
        k: int,
        exclude: Collection[str],
        delta: Neighbours,
        result: Neighbours,
    ) -> None:
        """Queue one answer; ``hidden`` is copied here (it changes with every upsert)."""
        sample = _Sample(
            known,
            matrix,
            None if hidden is None else hidden.copy(),
            np.array(query, dtype=np.float32),
            k,
            tuple(exclude),
            list(delta),
            list(result),
        )
        with self._cond:
            if self._closed:
                return
            self._jobs.append(sample)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stream-knn-recall", daemon=True
                )
                self._thread.start()
            if len(self._jobs) in (1, _GATHER_SAMPLES):
                self._cond.notify_all()

    def mean(self) -> float | None:
        """Mean recall@k of the last scored samples, or ``None`` before the first."""
        samples = list(self._recall)
        return sum(samples) / len(samples) if samples else None

    def settle(self, timeout: float) -> bool:
        """Wait until every queued sample is scored; False if ``timeout`` passed first."""
        with self._cond:
            self._settling += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)
            finally:
                self._settling -= 1

    def reset(self) -> None:
        """Forget every sample, queued or scored."""
        with self._cond:
            self._jobs.clear()
            self._cond.wait_for(lambda: not self._busy)
            self._recall.clear()

    def close(self) -> None:
        """Stop the thread (queued samples are dropped); a later sample starts another."""
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._cond:
            self._closed = False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._jobs or self._closed)
                self._cond.wait_for(
                    lambda: (
                        self._closed or self._settling > 0 or len(self._jobs) >= _GATHER_SAMPLES
                    ),
                    _GATHER_SECONDS,
                )
                if self._closed:
                    return
                if not self._jobs:  # reset meanwhile
                    continue
                samples = list(self._jobs)
                self._jobs.clear()
                self._busy = True
            # Scored together: one exact search of all of them per live version (a row
            # costs a few microseconds there, a query alone tens).
            for recall in self._score_all(samples):
                if recall is not None:
                    self._recall.append(recall)

    def _score_all(self, samples: list[_Sample]) -> list[float | None]:
        found: list[Neighbours] = [[] for _ in samples]
        groups: dict[int, list[int]] = {}
        for i, sample in enumerate(samples):
            if sample.known is not None and sample.matrix is not None and len(sample.matrix):
                groups.setdefault(id(sample.matrix), []).append(i)
        for rows in groups.values():
            first = samples[rows[0]]
            assert first.known is not None and first.matrix is not None
            oracle = self._oracle_of(first.known, first.matrix)
            n = len(first.matrix)
            hidden = np.zeros((len(rows), n), dtype=np.bool_)
            for row, i in enumerate(rows):
                mask = samples[i].hidden
                if mask is not None:
                    hidden[row] = mask
            k = max(samples[i].k for i in rows)
            best, picked = oracle.top_many(
                np.stack([samples[i].query for i in rows]),
                k,
                [samples[i].exclude for i in rows],
                hidden_rows=hidden,
            )
            for i, row_found in zip(rows, neighbour_rows(oracle.ids, best, picked), strict=True):
                found[i] = row_found
        return [self._recall_of(s, f) for s, f in zip(samples, found, strict=True)]

    @staticmethod
    def _recall_of(sample: _Sample, live_exact: Neighbours) -> float | None:
        exact = sorted(live_exact + sample.delta, key=lambda pair: -pair[1])[: sample.k]
        if not exact:
            return None
        truth = {i for i, _ in exact}
        return len(truth & {i for i, _ in sample.result}) / len(truth)

    def _oracle_of(self, known: KnownIds, matrix: npt.NDArray[np.float32]) -> ExactIndex:
        if self._oracle is None or self._oracle[0] is not matrix:
            self._oracle = (matrix, ExactIndex.over(known, matrix, self.metric))
        return self._oracle[1]
