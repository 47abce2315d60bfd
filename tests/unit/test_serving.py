"""Serving core: variant assignment, the query cache, popularity and weight functions."""

from __future__ import annotations

import math

import pytest

from stream_knn.config import Config, VariantConfig
from stream_knn.serving.cache import QueryCache
from stream_knn.serving.popularity import Popularity
from stream_knn.serving.recommender import apply_weight_function
from stream_knn.serving.variants import VariantAssigner, bucket_of


def test_bucket_is_stable_and_uniform():
    # A fixed value pins the hash across processes and releases.
    assert bucket_of("u1") == bucket_of("u1")
    assert bucket_of("user-42") == pytest.approx(bucket_of("user-42"))
    buckets = [bucket_of(f"u{i}") for i in range(20_000)]
    assert 0.49 < sum(b < 0.5 for b in buckets) / len(buckets) < 0.51


def test_variants_follow_configured_shares():
    config = Config().replace(
        serving__variants=(
            VariantConfig(name="a", share=0.8),
            VariantConfig(name="b", share=0.2, k=5, backend="exact"),
        )
    )
    assigner = VariantAssigner(config.serving, config.index)
    names = [assigner.assign(f"user{i}").name for i in range(10_000)]
    share_b = names.count("b") / len(names)
    assert 0.18 < share_b < 0.22
    b = assigner.by_name("b")
    assert (b.k, b.index.backend, b.index.metric) == (5, "exact", "angular")
    assert assigner.assign("user7").name == names[7]


def test_cache_is_bounded_lru_and_counts():
    cache: QueryCache[int] = QueryCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert (cache.hits, cache.misses) == (3, 1)
    assert cache.hit_ratio == 0.75
    cache.invalidate()
    assert len(cache) == 0


def test_popularity_decays_with_half_life():
    pop = Popularity(half_life_seconds=10.0)
    pop.observe("old", 1.0, 0)
    pop.observe("new", 1.0, 10_000)  # one half-life later: worth twice "old"
    assert pop.score("new") == 1.0
    assert pop.score("old") == pytest.approx(0.5)
    assert pop.top(1) == [("new", 1.0)]
    assert pop.top(5, exclude={"new"}) == [("old", pytest.approx(0.5))]


def test_weight_functions():
    found = [("a", 0.9), ("b", 0.5)]
    assert apply_weight_function(found, "similarity", "angular") == found
    rescored = apply_weight_function(found, "distance", "angular")
    assert rescored[0] == ("a", pytest.approx(1 / (1 + math.sqrt(2 - 1.8))))
    pop = Popularity(10.0)
    pop.observe("b", 10.0, 0)
    pop.observe("a", 1.0, 0)
    blended = apply_weight_function(found, "popularity_blend", "angular", pop, 0.9)
    assert [item for item, _ in blended] == ["b", "a"]
    assert blended[0][1] == pytest.approx(0.9)


def test_popularity_ranking_sees_new_items_at_once_and_drops_deleted_ones():
    pop = Popularity(half_life_seconds=10.0, refresh_seconds=60.0)
    pop.observe("a", 1.0, 0)
    assert [item for item, _ in pop.top(5)] == ["a"]
    pop.observe("b", 2.0, 0)  # a new item: the cached ranking no longer covers the catalog
    assert [item for item, _ in pop.top(5)] == ["b", "a"]
    pop.remove("b")
    assert [item for item, _ in pop.top(5)] == ["a"]
