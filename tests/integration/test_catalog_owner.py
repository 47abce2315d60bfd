"""Catalog content vectors in one basis across workers and restarts: the owner of the
ordered catalog topic is killed with ``kill -9`` after the PCA fit, another worker takes
over from the saved statistics, and every item's content vector equals the one a single
uninterrupted process computes from the ordered records."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer

from stream_knn.config import load_config
from stream_knn.embeddings.catalog import CatalogFeatures
from stream_knn.embeddings.codec import decode_vector
from stream_knn.events.schema import CatalogRecord, parse_catalog_record
from stream_knn.worker.catalog_owner import read_forwarded
from tests.integration.conftest import WorkerEnv, WorkerProcess, free_port

pytestmark = pytest.mark.integration

_ITEMS = 120
_WARMUP = 40  # the PCA is fitted in the first owner's half


def _read_all(env: WorkerEnv, topic: str, wanted) -> list[tuple[bytes, bytes | None]]:
    """Every record of ``topic`` in offset order per partition, once ``wanted`` holds."""
    deadline = time.monotonic() + 120
    while True:
        consumer = Consumer(
            {
                "bootstrap.servers": env.bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        consumer.subscribe([topic])
        records: list[tuple[bytes, bytes | None]] = []
        eof: set[int] = set()
        try:
            while time.monotonic() < deadline:
                for msg in consumer.consume(500, timeout=0.5):
                    if msg.error():
                        eof.add(msg.partition())
                        continue
                    records.append((msg.key(), msg.value()))
                partitions = consumer.assignment()
                if partitions and {p.partition for p in partitions} <= eof:
                    break
        finally:
            consumer.close()
        if wanted(records):
            return records
        assert time.monotonic() < deadline, f"{topic}: {len(records)} records"
        time.sleep(0.5)


def test_content_vectors_survive_a_killed_owner_in_one_basis(
    worker_env: WorkerEnv, tmp_path: Path
) -> None:
    worker_env.extra.update(
        {
            "STREAM_KNN_MODEL__PCA_WARMUP_ITEMS": str(_WARMUP),
            "STREAM_KNN_WORKER__SESSION_TIMEOUT_SECONDS": "6",
            "STREAM_KNN_WORKER__HEARTBEAT_INTERVAL_SECONDS": "0.5",
        }
    )
    rng = np.random.default_rng(11)
    catalog = [
        (
            f"item-{n}".encode(),
            orjson.dumps(
                {
                    "item_id": f"item-{n}",
                    "features": {
                        "price": float(rng.lognormal()),
                        "rating": float(rng.uniform(0, 5)),
                        "size": None if n % 7 == 0 else float(rng.normal()),
                    },
                }
            ),
        )
        for n in range(_ITEMS)
    ]
    contents = f"{worker_env.app_id}-item-contents-changelog"
    ordered = f"{worker_env.app_id}-catalog-ordered"
    first = WorkerProcess(worker_env, tmp_path / "worker-0.log").start()
    second_env = dataclasses.replace(
        worker_env, web_port=free_port(), data_dir=tmp_path / "state-1"
    )
    second = WorkerProcess(second_env, tmp_path / "worker-1.log")
    try:
        worker_env.produce("item_catalog", catalog[: _ITEMS // 2])
        _read_all(worker_env, contents, lambda r: len({k for k, _ in r}) >= _ITEMS // 2 - 1)
        first.stop(kill=True)
        second.start()
        worker_env.produce("item_catalog", catalog[_ITEMS // 2 :])
        _read_all(worker_env, contents, lambda r: len({k for k, _ in r}) >= _ITEMS - 1)

        # One process, the ordered records in order: the vectors every owner must agree on.
        config = load_config(environ=worker_env.env())
        m = config.model
        replay = CatalogFeatures(m.dims, m.pca, m.pca_warmup_items, m.seed)
        expected: dict[bytes, np.ndarray | None] = {}
        for key, value in _read_all(worker_env, ordered, lambda r: len(r) >= _ITEMS):
            assert value is not None
            _partition, raw = read_forwarded(value)
            record = parse_catalog_record(
                raw,
                config=config.events,
                dims=m.dims,
                topic=ordered,
                partition=0,
                offset=0,
                key=key,
            )
            assert isinstance(record, CatalogRecord)
            expected[key] = replay.content_vector(record.vector, record.features)
        assert replay.pca_version == 1

        latest: dict[bytes, bytes | None] = dict(
            _read_all(worker_env, contents, lambda r: len({k for k, _ in r}) >= _ITEMS - 1)
        )
        compared = 0
        for key, want in expected.items():
            if want is None:  # the first record: no spread yet, no vector
                assert key not in latest
                continue
            have = latest[key]
            assert have is not None
            np.testing.assert_array_equal(decode_vector(have, m.dims), want)
            compared += 1
        assert compared >= _ITEMS - 1
    finally:
        first.stop()
        second.stop()
