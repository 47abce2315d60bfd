"""/health and /ready of a real ``stream-knn worker`` whose broker goes away and comes back.

The test runs its own single-node broker (``LocalBroker`` on free ports), never the shared
one, because it stops it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_knn.broker.local import LocalBroker
from stream_knn.config import BrokerConfig

pytestmark = pytest.mark.integration

#: This module starts and stops its own broker: no session broker for it.
OWN_BROKER = True

_BROKER_TIMEOUT_SECONDS = 3.0
#: Bound on waiting for /health to turn: the timeout, plus one broker check (every 2 s,
#: each ping waiting up to 5 s for an answer), plus slack for a busy machine.
_TURN_WAIT_SECONDS = 45.0
_READY_REASONS = {"table recovery in progress", "item vectors not yet replicated"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    controller_port = _free_port()
    port = _free_port()
    while port == controller_port:
        port = _free_port()
    broker = LocalBroker(
        BrokerConfig(
            port=port,
            controller_port=controller_port,
            data_dir=tmp_path / "broker",
            heap="512m",
            start_timeout_seconds=120.0,
        ),
        stop_with_parent=True,
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(own_broker: LocalBroker) -> str:
    """The integration fixtures (``worker_env``, ``run_worker``) use this test's broker."""
    return own_broker.bootstrap


def _poll(env: Any, path: str, status: int, timeout_s: float) -> tuple[int, Any, float]:
    """GET ``path`` every 0.25 s until it answers ``status``.

    Returns the last status and body, and the monotonic time the last request was sent.
    """
    deadline = time.monotonic() + timeout_s
    last: tuple[int, Any] = (0, None)
    sent = time.monotonic()
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            last = env.get(path)
        except OSError as exc:  # the web server is busy or restarting
            last = (0, repr(exc))
        if last[0] == status:
            break
        time.sleep(0.25)
    return last[0], last[1], sent


def test_health_fails_while_the_broker_is_unreachable(
    own_broker: LocalBroker, worker_env: Any, run_worker: Any
) -> None:
    env = worker_env
    env.extra["STREAM_KNN_WORKER__BROKER_TIMEOUT_SECONDS"] = str(_BROKER_TIMEOUT_SECONDS)
    worker = run_worker(wait_ready=False)
    try:
        # Before the worker is ready, /ready says why not; afterwards it serves.
        not_ready: list[Any] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
            try:
                status, body = env.get("/ready")
            except OSError:
                time.sleep(0.25)
                continue
            if status == 200:
                break
            assert status == 503, (status, body)
            not_ready.append(body)
            time.sleep(0.25)
        else:
            raise AssertionError(f"worker not ready after 120 s:\n{worker.log_tail()}")
        assert body == {"ready": True, "reason": "serving popularity fallback"}
        for seen in not_ready:
            assert seen["ready"] is False and seen["reason"] in _READY_REASONS, seen

        # The broker clock starts when the app is built and the first check runs only once
        # the replica consumer is up, so a slow start-up can show 503 for a moment; a
        # reachable broker must turn it 200 within a few checks.
        status, body, _ = _poll(env, "/health", 200, _TURN_WAIT_SECONDS)
        assert status == 200, f"/health {status} {body} with a live broker:\n{worker.log_tail()}"
        assert body["status"] == "ok"
        assert body["broker_timeout_seconds"] == _BROKER_TIMEOUT_SECONDS
        assert 0.0 <= body["broker_unreachable_seconds"] <= _BROKER_TIMEOUT_SECONDS

        own_broker.stop()
        stopped_at = time.monotonic()
        status, body, sent = _poll(env, "/health", 503, _TURN_WAIT_SECONDS)
        assert status == 503, f"/health still {status} {body}:\n{worker.log_tail()}"
        assert body["status"] == "failing"
        assert body["broker_timeout_seconds"] == _BROKER_TIMEOUT_SECONDS
        assert body["broker_unreachable_seconds"] > _BROKER_TIMEOUT_SECONDS
        # The silence counts from the last successful check, which came before the stop.
        assert body["broker_unreachable_seconds"] >= sent - stopped_at - 0.01
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()

        # The broker comes back on the same ports and data: /health recovers by itself.
        own_broker.start()
        status, body, _ = _poll(env, "/health", 200, _TURN_WAIT_SECONDS)
        assert status == 200, f"/health still {status} {body}:\n{worker.log_tail()}"
        assert body["status"] == "ok"
        assert body["broker_unreachable_seconds"] <= _BROKER_TIMEOUT_SECONDS
    finally:
        worker.stop(timeout_s=15.0)
