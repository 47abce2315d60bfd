"""Index backends on clustered data: build time, recall@10 against exact search, queries/s."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_knn.index.annoy_index import AnnoyIndex
from stream_knn.index.base import Index
from stream_knn.index.exact import ExactIndex, exact_scores

__all__ = ["bench_indexes", "clustered", "ground_truth", "query_rate"]

Matrix = npt.NDArray[np.float32]
K = 10
#: hnswlib is skipped at sizes whose estimated build time exceeds this many seconds.
HNSW_MAX_SECONDS = 300.0


def clustered(
    n: int, dims: int, n_queries: int, seed: int = 0, n_clusters: int = 1000
) -> tuple[Matrix, Matrix]:
    """``n`` item vectors and ``n_queries`` query vectors drawn around shared cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dims)).astype(np.float32)

    def draw(count: int) -> Matrix:
        out = np.empty((count, dims), dtype=np.float32)
        for start in range(0, count, 100_000):
            size = min(100_000, count - start)
            which = rng.integers(0, n_clusters, size=size)
            noise = rng.standard_normal((size, dims)).astype(np.float32)
            out[start : start + size] = centres[which] + 1.0 * noise
        return out

    return draw(n), draw(n_queries)


def ground_truth(items: Matrix, queries: Matrix, k: int = K) -> list[set[int]]:
    """Positions of the exact angular top-``k`` of each query (batched BLAS products)."""
    truth: list[set[int]] = []
    for start in range(0, len(queries), 64):
        scores = exact_scores(items, queries[start : start + 64], "angular")
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        truth.extend(set(row.tolist()) for row in top)
    return truth


def query_rate(
    search: Callable[[Matrix], Sequence[tuple[str, float]]], queries: Matrix, seconds: float
) -> tuple[float, list[list[str]]]:
    """Single-thread queries/s of ``search`` over ``queries`` (cycled up to ``seconds``)."""
    answers: list[list[str]] = []
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        q = queries[done % len(queries)]
        found = search(q)
        if done < len(queries):
            answers.append([item for item, _ in found])
        done += 1
        if done >= len(queries) and time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - started), answers


def _recall(answers: list[list[str]], truth: list[set[int]]) -> float:
    hits = sum(len({int(a) for a in ans} & t) for ans, t in zip(answers, truth, strict=False))
    return hits / (K * len(answers))


def _build(index: Index, ids: list[str], items: Matrix) -> float:
    started = time.perf_counter()
    index.build(ids, items)
    return time.perf_counter() - started


def _annoy_file_bytes(index: AnnoyIndex) -> int:
    directory = Path(tempfile.mkdtemp(prefix="sknn-bench-annoy-"))
    try:
        index.save(directory)
        return (directory / "index.ann").stat().st_size
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_indexes(
    n: int,
    dims: int,
    *,
    n_queries: int,
    seconds: float,
    search_ks: Sequence[int],
    trees: Sequence[int] = (10, 50),
    hnsw_build_estimate: float | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every backend on ``n`` clustered ``dims``-d items: build s, recall@10, queries/s."""
    say(f"index: {n:,} x {dims} clustered items, {n_queries} queries")
    items, queries = clustered(n, dims, n_queries, seed=n)
    ids = [str(i) for i in range(n)]
    started = time.perf_counter()
    truth = ground_truth(items, queries)
    rows: list[dict[str, Any]] = []
    say(f"  ground truth in {time.perf_counter() - started:.1f} s")

    exact = ExactIndex(dims, "angular")
    build_s = _build(exact, ids, items)
    exact_queries = queries[: max(20, min(n_queries, int(2e8 / n)))]
    qps, answers = query_rate(lambda q: exact.search(q, K), exact_queries, seconds)
    rows.append(
        {
            "backend": "exact",
            "params": "",
            "build_seconds": round(build_s, 3),
            "recall_at_10": round(_recall(answers, truth), 4),
            "queries_per_second": round(qps),
        }
    )
    say(f"  exact: {qps:,.0f} q/s")

    for n_trees in trees:
        annoy = AnnoyIndex(dims, "angular", n_trees=n_trees)
        build_s = _build(annoy, ids, items)
        file_bytes = _annoy_file_bytes(annoy)

        def annoy_search(q: Matrix, a: AnnoyIndex = annoy) -> Sequence[tuple[str, float]]:
            return a.search(q, K)

        for search_k in search_ks:
            annoy.search_k = search_k
            qps, answers = query_rate(annoy_search, queries, seconds)
            label = "default" if search_k == -1 else str(search_k)
            recall = _recall(answers, truth)
            rows.append(
                {
                    "backend": "annoy",
                    "params": f"n_trees={n_trees} search_k={label}",
                    "build_seconds": round(build_s, 3),
                    "recall_at_10": round(recall, 4),
                    "queries_per_second": round(qps),
                    "file_bytes_per_item": round(file_bytes / n, 1),
                }
            )
            say(
                f"  annoy n_trees={n_trees} search_k={label}: build {build_s:.2f} s, "
                f"recall {recall:.3f}, {qps:,.0f} q/s"
            )
        del annoy

    hnsw_row: dict[str, Any] = {"backend": "hnsw", "params": "m=16 ef_c=200 ef=64"}
    if hnsw_build_estimate is not None and hnsw_build_estimate > HNSW_MAX_SECONDS:
        hnsw_row["skipped"] = (
            f"estimated build {hnsw_build_estimate:.0f} s > {HNSW_MAX_SECONDS:.0f} s "
            "(extrapolated from the smaller size)"
        )
        say(f"  hnsw: skipped ({hnsw_row['skipped']})")
    else:
        from stream_knn.index.hnsw import HnswIndex

        hnsw = HnswIndex(dims, "angular")
        build_s = _build(hnsw, ids, items)
        qps, answers = query_rate(lambda q: hnsw.search(q, K), queries, seconds)
        recall = _recall(answers, truth)
        hnsw_row.update(
            {
                "build_seconds": round(build_s, 3),
                "recall_at_10": round(recall, 4),
                "queries_per_second": round(qps),
            }
        )
        say(f"  hnsw: build {build_s:.2f} s, recall {recall:.3f}, {qps:,.0f} q/s")
    rows.append(hnsw_row)
    return {"n_items": n, "dims": dims, "n_queries": n_queries, "rows": rows}
