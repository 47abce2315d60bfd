"""A/B variants: stable assignment of users to named variants by a hash of the user id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from stream_knn.config import IndexConfig, ServingConfig, VariantConfig

__all__ = ["ResolvedVariant", "VariantAssigner", "bucket_of"]

_BUCKETS = 10_000


def bucket_of(user_id: str) -> float:
    """A stable position of ``user_id`` in [0, 1), the same in every process and run."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8, person=b"sknn-ab").digest()
    return (int.from_bytes(digest, "big") % _BUCKETS) / _BUCKETS


@dataclass(frozen=True)
class ResolvedVariant:
    """A variant with every setting filled in from the main configuration."""

    name: str
    share: float
    index: IndexConfig
    weight_function: str
    k: int

    @property
    def index_key(self) -> tuple[str, str, int, int]:
        """Variants with the same key share one index."""
        return (self.index.backend, self.index.metric, self.index.n_trees, self.index.search_k)


class VariantAssigner:
    """Assigns users to variants in proportion to their shares."""

    def __init__(self, serving: ServingConfig, index: IndexConfig) -> None:
        self.variants: tuple[ResolvedVariant, ...] = tuple(
            _resolve(v, serving, index) for v in serving.variants
        )
        total = sum(v.share for v in self.variants)
        bounds: list[float] = []
        acc = 0.0
        for variant in self.variants:
            acc += variant.share / total
            bounds.append(acc)
        bounds[-1] = 1.0
        self._bounds: Sequence[float] = bounds

    def assign(self, user_id: str) -> ResolvedVariant:
        if len(self.variants) == 1:
            return self.variants[0]  # no A/B test: no hash per event
        position = bucket_of(user_id)
        for variant, bound in zip(self.variants, self._bounds, strict=True):
            if position < bound:
                return variant
        return self.variants[-1]  # pragma: no cover - bounds end at 1.0

    def by_name(self, name: str) -> ResolvedVariant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)


def _resolve(v: VariantConfig, serving: ServingConfig, index: IndexConfig) -> ResolvedVariant:
    from dataclasses import replace

    index_cfg = replace(
        index,
        backend=v.backend or index.backend,
        metric=v.metric or index.metric,
        n_trees=v.n_trees if v.n_trees is not None else index.n_trees,
        search_k=v.search_k if v.search_k is not None else index.search_k,
    )
    return ResolvedVariant(
        name=v.name,
        share=v.share,
        index=index_cfg,
        weight_function=v.weight_function or serving.weight_function,
        k=v.k if v.k is not None else serving.k,
    )
