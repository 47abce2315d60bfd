"""The recall sampler scores queued samples together, not one pass per sample."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stream_knn.index import recall
from stream_knn.index.base import KnownIds
from stream_knn.index.exact import ExactIndex


def _live(n: int = 200, dims: int = 8) -> tuple[KnownIds, np.ndarray]:
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(n, dims)).astype(np.float32)
    return KnownIds.of([f"i{j}" for j in range(n)]), matrix


def _exact_answer(known: KnownIds, matrix: np.ndarray, query: np.ndarray, k: int) -> list:
    return ExactIndex.over(known, matrix, "angular").search(query, k)


def _count_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    passes: list[int] = []
    top_many = ExactIndex.top_many

    def counted(self, queries, *args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(len(queries))
        return top_many(self, queries, *args, **kwargs)

    monkeypatch.setattr(ExactIndex, "top_many", counted)
    return passes


def test_samples_are_scored_in_one_pass_when_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = _count_passes(monkeypatch)
    known, matrix = _live()
    sampler = recall.RecallSampler(8, "angular", window=100)
    hidden = np.zeros(len(matrix), dtype=np.bool_)
    rng = np.random.default_rng(4)
    try:
        for _ in range(10):
            query = rng.normal(size=8).astype(np.float32)
            answer = _exact_answer(known, matrix, query, 5)
            sampler.submit(known, matrix, hidden, query, 5, (), [], answer)
        assert sampler.settle(30.0)
        assert passes == [10]
        assert sampler.mean() == 1.0
    finally:
        sampler.close()


def test_a_full_gather_is_scored_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = _count_passes(monkeypatch)
    monkeypatch.setattr(recall, "_GATHER_SECONDS", 3600.0)
    known, matrix = _live()
    sampler = recall.RecallSampler(8, "angular", window=1000)
    hidden = np.zeros(len(matrix), dtype=np.bool_)
    query = np.ones(8, dtype=np.float32)
    wrong = [("nothing", 1.0)]
    try:
        for _ in range(recall._GATHER_SAMPLES):
            sampler.submit(known, matrix, hidden, query, 5, (), [], wrong)
        # No settle: a full gather goes at once, though the hour has not passed.
        deadline = time.monotonic() + 60.0
        while sampler.mean() is None:
            assert time.monotonic() < deadline, "a full gather was not scored"
            time.sleep(0.05)
        assert sampler.mean() == 0.0
        assert sum(passes) == recall._GATHER_SAMPLES
    finally:
        sampler.close()
