"""Lists answered per batch (``recommend_many``) equal the lists answered one at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from stream_knn.config import Config, IndexConfig, VariantConfig
from stream_knn.embeddings.profile import UserProfile, query_vectors
from stream_knn.index.manager import IndexManager
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.service import ListRequest, RecommendationService

DIMS = 16
NOW = 1_700_000_000_000
HALF_LIFE = 3600.0


def _clustered(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    centres = rng.normal(size=(40, DIMS))
    return (centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, DIMS))).astype(np.float32)


def _profile(rng: np.random.Generator, ids: list[str]) -> UserProfile:
    profile = UserProfile()
    for _ in range(int(rng.integers(1, 21))):
        item = ids[int(rng.integers(0, len(ids)))]
        ts = NOW - int(rng.integers(0, 10 * 3_600_000))
        profile = profile.add(item, ts, float(rng.integers(1, 6)), cap=20)
    return profile


@pytest.fixture
def service(tmp_path: Path) -> RecommendationService:
    """Two variants over two indexes (Annoy; exact through ``auto``), each with a live
    version, a non-empty delta of changed and new items and deleted items."""
    config = Config().replace(
        model__dims=DIMS,
        model__profile_half_life_seconds=HALF_LIFE,
        index__recall_sample_rate=0.5,
        serving__variants=(
            VariantConfig(name="annoy", share=0.5, backend="annoy", k=10),
            VariantConfig(
                name="exact", share=0.5, backend="auto", k=5, weight_function="popularity_blend"
            ),
        ),
    )
    service = RecommendationService(config, tmp_path / "index", Metrics(CollectorRegistry()))
    rng = np.random.default_rng(5)
    vectors = _clustered(rng, 2_000)
    for n, vector in enumerate(vectors):
        service.upsert(f"i{n}", vector)
    for manager in service.managers.values():
        manager.rebuild_now(wait=True)
    changed = _clustered(rng, 300)
    for vector in changed[:250]:  # moved items
        service.upsert(f"i{int(rng.integers(0, 2_000))}", vector)
    for n, vector in enumerate(changed[250:]):  # new items, only in the delta
        service.upsert(f"new{n}", vector)
    for n in rng.choice(2_000, size=40, replace=False).tolist():
        service.delete(f"i{n}")
    service.delete("new3")
    for n in range(300):
        item = f"i{int(rng.zipf(1.5)) % 2_000}"
        service.popularity.observe(item, 1.0, NOW - n * 1_000)
    return service


def test_batch_lists_equal_one_at_a_time_lists(service: RecommendationService) -> None:
    rng = np.random.default_rng(11)
    ids = [f"i{n}" for n in range(2_000)] + [f"new{n}" for n in range(50)] + ["unknown"]
    requests: list[ListRequest] = []
    for n in range(400):
        user = f"u{n}"
        kind = n % 10
        if kind == 0:
            profile = None  # a cold-start user: popularity
        elif kind == 1:
            profile = UserProfile().add("unknown", NOW, 1.0, cap=5)  # no usable vector
        else:
            profile = _profile(rng, ids)
        exclude = {ids[int(i)] for i in rng.integers(0, len(ids), int(rng.integers(0, 4)))}
        now = None if n % 3 else NOW - int(rng.integers(0, 3_600_000))
        requests.append(ListRequest(user, profile, frozenset(exclude), now_ms=now))

    for manager in service.managers.values():
        manager._recall.reset()  # the drift probe of the build searched already
    batch = service.recommend_many(requests, NOW)
    # Recall sampling keeps working on the batch path, for every index.
    assert all(m.sampled_recall(settle_seconds=30.0) is not None for m in service.managers.values())

    variants = {service.assigner.assign(r.user_id).name for r in requests}
    assert variants == {"annoy", "exact"}
    fallbacks = 0
    for request, got in zip(requests, batch, strict=True):
        variant = service.assigner.assign(request.user_id)
        one = service.recommend(
            request.user_id,
            request.profile,
            variant.k,
            request.now_ms if request.now_ms is not None else NOW,
            exclude=request.exclude,
            variant=variant,
        )
        assert [i for i, _ in got.items] == [i for i, _ in one.items], request.user_id
        assert [s for _, s in got.items] == pytest.approx([s for _, s in one.items], abs=1e-5)
        assert (got.index_version, got.fallback) == (one.index_version, one.fallback)
        assert len(got.items) == variant.k
        fallbacks += got.fallback == "popular"
        seen = set(request.exclude) | (
            set() if request.profile is None else set(request.profile.recent_items())
        )
        assert not seen & {i for i, _ in got.items}
    assert fallbacks == 80  # the cold-start and unusable profiles, none other


def test_requests_set_their_own_k_and_the_caller_may_pass_variants(
    service: RecommendationService,
) -> None:
    profile = UserProfile().add("i1", NOW, 1.0, cap=5).add("new1", NOW, 2.0, cap=5)
    requests = [ListRequest("u1", profile, k=3), ListRequest("u2", profile, ("i7",))]
    variant = service.assigner.by_name("annoy")
    got = service.recommend_many(requests, NOW, variants=[variant, variant])
    assert [len(r.items) for r in got] == [3, 10]
    assert got[0].items == service.recommend("u1", profile, 3, NOW, variant=variant).items
    assert service.recommend_many([], NOW) == []
    with pytest.raises(ValueError, match="1 variants for 2 requests"):
        service.recommend_many(requests, NOW, variants=[variant])


def test_search_pool_ends_on_stop(service: RecommendationService) -> None:
    pool = service._search_pool
    assert pool is not None
    asyncio.run(service.on_stop())
    assert service._search_pool is None
    profile = UserProfile().add("i1", NOW, 1.0, cap=5)
    # Still answers after stop, from the calling thread alone.
    assert service.recommend_many([ListRequest("u1", profile)], NOW)[0].items


def test_query_vectors_equal_each_profiles_query_vector() -> None:
    rng = np.random.default_rng(3)
    vectors: dict[str, npt.NDArray[np.float32]] = {
        f"i{n}": v for n, v in enumerate(_clustered(rng, 200))
    }
    vectors["zero"] = np.zeros(DIMS, dtype=np.float32)
    ids = [*vectors, "missing"]
    profiles: list[UserProfile | None] = [_profile(rng, ids) for _ in range(300)]
    profiles[5] = None
    profiles[6] = UserProfile().add("zero", NOW, 1.0, cap=3).add("missing", NOW, 1.0, cap=3)
    profiles[7] = UserProfile()
    times = [NOW - 1_000 * n for n in range(300)]
    queries, usable = query_vectors(profiles, vectors.get, times, HALF_LIFE)
    assert queries.shape == (300, DIMS) and queries.dtype == np.float32
    for row, (profile, now) in enumerate(zip(profiles, times, strict=True)):
        one = None if profile is None else profile.query_vector(vectors.get, now, HALF_LIFE)
        assert usable[row] == (one is not None)
        if one is None:
            assert not queries[row].any()
        else:
            # Also the same as the per-item formula with query_weights' coefficients.
            assert profile is not None
            item_ids, coefficients = profile.query_weights(now, HALF_LIFE)
            rows = [vectors.get(i) for i in item_ids]
            expected = sum(
                (c * r.astype(np.float64) / np.linalg.norm(r.astype(np.float64)))
                for c, r in zip(coefficients, rows, strict=True)
                if r is not None and r.any()
            )
            np.testing.assert_array_equal(queries[row], one)
            np.testing.assert_allclose(queries[row], expected, rtol=1e-6, atol=1e-6)
    assert not usable[[5, 6, 7]].any()
    empty, none_usable = query_vectors([None, UserProfile()], vectors.get, NOW, HALF_LIFE, DIMS)
    assert empty.shape == (2, DIMS) and not none_usable.any()


def test_manager_search_many_equals_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    manager = IndexManager(IndexConfig(backend="annoy"), tmp_path, DIMS)
    assert manager.search_many(np.zeros((2, DIMS), np.float32), 5, [(), ()]) == [[], []]
    for n, vector in enumerate(_clustered(rng, 500)):
        manager.upsert(f"i{n}", vector)
    manager.rebuild_now(wait=True)
    for n, vector in enumerate(_clustered(rng, 40)):
        manager.upsert(f"i{n * 7}", vector)
    manager.delete("i3")
    queries = _clustered(rng, 50)
    excludes = [{f"i{int(i)}" for i in rng.integers(0, 500, 5)} for _ in range(50)]
    many = manager.search_many(queries, 10, excludes)
    for query, exclude, got in zip(queries, excludes, many, strict=True):
        one = manager.search(query, 10, exclude)
        assert [i for i, _ in got] == [i for i, _ in one]
        assert [s for _, s in got] == pytest.approx([s for _, s in one], abs=1e-5)
    with pytest.raises(ValueError, match="1 exclusion sets for 50 queries"):
        manager.search_many(queries, 10, [()])


def test_every_self_tuning_candidate_gives_the_same_lists_served_or_shadowed(
    service: RecommendationService,
) -> None:
    # A candidate scored in the shadow (recommend_many with its setting) must answer what
    # it will answer once served, on the batch path and one list at a time (HTTP).
    assert service.tuner is not None
    rng = np.random.default_rng(12)
    ids = [f"i{n}" for n in range(2_000)]
    requests = [ListRequest(f"u{n}", _profile(rng, ids), now_ms=NOW) for n in range(60)]
    shadow = {
        name: service.recommend_many(requests, NOW, setting=setting)
        for name, setting in service.tuner.candidates.items()
    }
    assert (
        len({tuple(tuple(i for i, _ in r.items) for r in lists) for lists in shadow.values()}) > 3
    )
    for name, setting in service.tuner.candidates.items():
        service._serve_setting(setting)
        served = service.recommend_many(requests, NOW)
        for request, got, ahead in zip(requests, served, shadow[name], strict=True):
            variant = service.assigner.assign(request.user_id)
            one = service.recommend(request.user_id, request.profile, variant.k, NOW)
            assert [i for i, _ in got.items] == [i for i, _ in ahead.items], name
            assert [i for i, _ in got.items] == [i for i, _ in one.items], name
        if setting.popularity:
            assert all(r.fallback == "popular" for r in served)
