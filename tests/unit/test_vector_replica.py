"""The worker's vector replica: wide item states, their projection, and basis refits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from stream_knn.config import Config
from stream_knn.embeddings.catalog import blend
from stream_knn.embeddings.codec import encode_vector
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


def _mixed_records(replica: VectorReplica) -> list[tuple[str, bytes | None, bytes | None]]:
    """Behaviour and content records, updates of one item, tombstones, a zero state and
    an unreadable record: everything the changelogs can hold."""
    states = _states()
    rng = np.random.default_rng(5)
    behaviour, content = replica.behaviour_topic, replica.content_topic
    records: list[tuple[str, bytes | None, bytes | None]] = [
        (behaviour, item_id.encode(), state.to_bytes()) for item_id, state in states.items()
    ]
    for item_id in ("a0", "b1", "c0", "c1", "c2"):  # a0, b1 both kinds; c* content only
        records.append((content, item_id.encode(), encode_vector(rng.normal(size=DIMS))))
    later = ItemState(states["a2"].vector * 2 + 0.5, 2_000, 2, 3.0)
    records += [
        (behaviour, b"a2", later.to_bytes()),  # the later state wins
        (behaviour, b"b5", None),  # gone: deleted
        (content, b"c1", None),  # gone: deleted
        (behaviour, b"b1", None),  # content left: served from it alone
        (behaviour, b"z", ItemState(np.zeros(SKETCH, np.float32), 0, 1, 1.0).to_bytes()),
        (behaviour, b"x", ItemState(np.ones(DIMS, np.float32), 0, 1, 1.0).to_bytes()),
        (behaviour, None, b"no key"),
        (content, b"c2", encode_vector(np.zeros(DIMS))),  # a zero vector: nothing to serve
    ]
    return records


def test_a_batch_apply_serves_what_applying_each_record_serves(tmp_path: Path) -> None:
    one, one_service = _replica(tmp_path / "one")
    whole, whole_service = _replica(tmp_path / "whole")
    chunked, chunked_service = _replica(tmp_path / "chunked")
    records = _mixed_records(one)
    for topic, key, value in records:
        one.apply(topic, key, value)
    whole.apply_many(records)
    for start in range(0, len(records), 4):
        chunked.apply_many(iter(records[start : start + 4]))
    expected = one_service.primary.vectors_snapshot()
    assert set(expected) == {f"a{n}" for n in range(6)} | {"b0", "b1", "b2", "b3", "b4", "c0"}
    for replica, service in ((whole, whole_service), (chunked, chunked_service)):
        assert (replica.records, replica.skipped) == (one.records, one.skipped) == (24, 1)
        assert replica.known_items() == one.known_items()
        served = service.primary.vectors_snapshot()
        assert set(served) == set(expected)
        for item_id, vector in expected.items():
            np.testing.assert_allclose(served[item_id], vector, rtol=1e-6, atol=1e-7)
        for item_id in ("a2", "b1", "b5", "c0", "z"):
            assert service.popularity.score(item_id) == one_service.popularity.score(item_id)
    # What is served is the documented blend of each item's two vectors.
    weight = one.config.model.catalog_weight
    for item_id, vector in expected.items():
        blended = blend(one.projector.project(item_id), one.content.get(item_id), weight)
        assert blended is not None
        np.testing.assert_allclose(vector, blended, rtol=1e-6, atol=1e-7)


def test_projecting_many_items_equals_projecting_each(tmp_path: Path) -> None:
    replica, _ = _replica(tmp_path)
    for item_id, state in _states().items():
        replica.apply(replica.behaviour_topic, item_id.encode(), state.to_bytes())
    replica.refit_now()
    projector = replica.projector
    ids = ["b2", "unknown", "a0", "a5"]
    matrix, known = projector.project_many(ids)
    assert known.tolist() == [True, False, True, True]
    assert matrix.shape == (4, DIMS) and not matrix[1].any()
    for row, item_id in enumerate(ids):
        single = projector.project(item_id)
        if single is not None:
            np.testing.assert_allclose(matrix[row], single, rtol=1e-6, atol=1e-7)
