"""The worker's vector replica: wide item states, their projection, and basis refits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from stream_knn.config import Config
from stream_knn.embeddings.sketch import ItemState
from stream_knn.index.manager import BASIS_FILE
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.service import RecommendationService
from stream_knn.worker.replica import VectorReplica

SKETCH, DIMS = 16, 4


def _config(tmp_path: Path) -> Config:
    return Config().replace(
        model__dims=DIMS,
        model__sketch_dims=SKETCH,
        model__projection_refit_updates=10,
        index__backend="exact",
        index__recall_sample_rate=0.0,
        worker__data_dir=tmp_path / "state",
    )


def _states() -> dict[str, ItemState]:
    """a0..a5 live on sketch axes 8..11, b0..b5 on axes 12..15: the first DIMS axes (what
    the untrained truncation keeps) hold only a little noise."""
    rng = np.random.default_rng(3)
    states = {}
    for group, axes in (("a", slice(8, 12)), ("b", slice(12, 16))):
        centre = np.zeros(SKETCH, dtype=np.float32)
        centre[axes] = rng.uniform(1.0, 2.0, 4)
        for n in range(6):
            vector = centre + rng.normal(0.0, 0.05, SKETCH).astype(np.float32)
            states[f"{group}{n}"] = ItemState(vector.astype(np.float32), 1_000, 1, 1.0)
    return states


def _replica(tmp_path: Path) -> tuple[VectorReplica, RecommendationService]:
    config = _config(tmp_path)
    service = RecommendationService(
        config, tmp_path / "state" / "index", Metrics(CollectorRegistry())
    )
    replica = VectorReplica(config, service)
    return replica, service


def test_refit_serves_every_item_in_the_fitted_basis_and_saves_it(tmp_path: Path) -> None:
    replica, service = _replica(tmp_path)
    for item_id, state in _states().items():
        replica.apply(replica.behaviour_topic, item_id.encode(), state.to_bytes())
    assert replica.projector.projection.version == 0 and replica.projector.refit_due
    assert replica.refit_now()
    primary = service.primary
    assert replica.projector.projection.version == 1
    assert (primary.version, primary.item_count, primary.pending_items) == (1, 12, 0)
    basis = primary.store.read_extra(1, BASIS_FILE)
    assert basis == replica.projector.projection.to_bytes() == primary.basis
    # In the fitted basis the clusters separate (the truncation saw only noise).
    found = primary.similar("a0", 5)
    assert found is not None and {i for i, _ in found} == {"a1", "a2", "a3", "a4", "a5"}
    # Every vector served is the projection of its state (blending keeps the direction).
    expected = replica.projector.project("b3")
    served = primary.vector("b3")
    assert expected is not None and served is not None
    np.testing.assert_allclose(
        served / np.linalg.norm(served), expected / np.linalg.norm(expected), rtol=1e-5
    )


def test_a_restarted_replica_projects_with_the_saved_basis(tmp_path: Path) -> None:
    replica, _ = _replica(tmp_path)
    for item_id, state in _states().items():
        replica.apply(replica.behaviour_topic, item_id.encode(), state.to_bytes())
    replica.refit_now()
    saved = replica.projector.projection.to_bytes()

    again, service2 = _replica(tmp_path)
    service2.primary.start()
    try:
        assert service2.primary.version == 1
        assert again.adopt_basis(service2.primary.basis)
        assert again.projector.projection.to_bytes() == saved
        # Replayed states land on the vectors the warm-started version holds: no change.
        for item_id, state in _states().items():
            again.apply(again.behaviour_topic, item_id.encode(), state.to_bytes())
        assert service2.primary.pending_items == 0
    finally:
        service2.primary.stop()


def test_a_basis_for_other_dimensions_is_ignored(tmp_path: Path) -> None:
    replica, _ = _replica(tmp_path)
    other = VectorReplica(
        Config().replace(model__dims=2, model__sketch_dims=8), replica.service
    ).projector.projection.to_bytes()
    assert not replica.adopt_basis(other)
    assert not replica.adopt_basis(b"garbage")
    assert not replica.adopt_basis(None)
    assert replica.projector.projection.version == 0


def test_a_state_of_the_wrong_width_is_skipped(tmp_path: Path) -> None:
    replica, service = _replica(tmp_path)
    narrow = ItemState(np.ones(DIMS, dtype=np.float32), 0, 1, 1.0)
    replica.apply(replica.behaviour_topic, b"x", narrow.to_bytes())
    assert "x" not in replica.known_items() and service.primary.item_count == 0


def test_many_unreadable_records_are_skipped_and_counted(tmp_path: Path) -> None:
    replica, service = _replica(tmp_path)
    narrow = ItemState(np.ones(DIMS, dtype=np.float32), 0, 1, 1.0).to_bytes()
    for n in range(30):
        replica.apply(replica.behaviour_topic, f"old{n}".encode(), narrow)
    state = _states()["a0"]
    replica.apply(replica.behaviour_topic, b"a0", state.to_bytes())
    assert replica.skipped == 30
    assert replica.known_items() == {"a0"} and service.primary.item_count == 1
