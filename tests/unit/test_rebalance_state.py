"""Per-user process state under rebalances: which users are dropped, which lists are flushed,
and when a batch that deferred lists is acknowledged."""

from __future__ import annotations

import asyncio
from typing import Any

from stream_knn.serving.coalesce import EmitGate
from stream_knn.worker.app import _BatchLoop
from stream_knn.worker.ownership import UserPartitions


def test_users_of_partitions_kept_stay_the_others_are_dropped() -> None:
    users = UserPartitions(has_state=lambda user: True)
    users.note({"a": 0, "b": 1, "c": 2})
    users.note({"a": 3})  # a user's newest partition wins (the topic grew)
    assert sorted(users.drop_except({1, 3})) == ["c"]
    assert users.partition("a") == 3
    assert users.partition("b") == 1
    assert users.partition("c") is None
    assert sorted(users.drop_except(set())) == ["a", "b"]
    assert len(users) == 0


def test_compaction_forgets_users_without_state_only() -> None:
    live = {"u0", "u1"}
    users = UserPartitions(has_state=lambda user: user in live, min_compact=4)
    users.note({f"u{i}": i % 2 for i in range(5)})  # 5 > 4: compacted to the live two
    assert len(users) == 2
    assert users.partition("u1") == 1
    users.note({f"v{i}": 0 for i in range(2)})  # 4 users, limit max(4, 2 * 2)
    assert len(users) == 4


def test_due_all_flushes_pending_users_before_their_interval() -> None:
    gate: EmitGate[str] = EmitGate(10.0)
    assert gate.offer("u1", "e1", now=0.0)
    assert not gate.offer("u1", "e2", now=1.0)
    assert gate.offer("u2", "x", now=1.0)  # first event of u2: emitted at once
    assert gate.due(now=2.0) == []
    assert gate.due_all(now=2.0) == [("u1", "e2")]
    assert gate.due_all(now=2.0) == []
    assert gate.holds("u1") and gate.holds("u2") and not gate.holds("u3")
    gate.drop("u1")
    assert not gate.holds("u1")


class _Event:
    def __init__(self, name: str, acked: list[str]) -> None:
        self.message = name
        self._acked = acked

    def ack(self) -> None:
        self._acked.append(self.message)


class _Stream:
    """Faust's stream as the batch loop reads it, fed by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Event | None] = asyncio.Queue()

    def noack(self) -> _Stream:
        return self

    async def events(self) -> Any:
        while (event := await self.queue.get()) is not None:
            yield event


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_batches_are_acknowledged_in_order_once_their_deferred_lists_leave() -> None:
    async def scenario() -> None:
        acked: list[str] = []
        handled: list[list[str]] = []
        futures: dict[str, asyncio.Future[None]] = {}

        async def handle(messages: list[str]) -> asyncio.Future[None] | None:
            handled.append(messages)
            if messages[0].startswith("defer"):
                futures[messages[0]] = asyncio.get_running_loop().create_future()
                return futures[messages[0]]
            return None

        loop = _BatchLoop(handle)
        stream = _Stream()
        runner = asyncio.ensure_future(loop.run(stream))
        for name in ("defer-1", "plain-2"):
            await stream.queue.put(_Event(name, acked))
            await _until(lambda n=name: [n] in handled)
        assert acked == []  # plain-2 waits behind defer-1: the commit never passes it
        futures["defer-1"].set_result(None)
        await _until(lambda: len(acked) == 2)
        assert acked == ["defer-1", "plain-2"]
        await stream.queue.put(None)
        await runner

    asyncio.run(scenario())


def test_a_paused_loop_leaves_new_batches_unacknowledged_and_unhandled() -> None:
    async def scenario() -> None:
        acked: list[str] = []
        handled: list[str] = []

        async def handle(messages: list[str]) -> None:
            handled.extend(messages)

        loop = _BatchLoop(handle)
        stream = _Stream()
        runner = asyncio.ensure_future(loop.run(stream))
        await stream.queue.put(_Event("before", acked))
        await _until(lambda: acked == ["before"])
        await loop.pause()
        await stream.queue.put(_Event("during", acked))
        await _until(stream.queue.empty)
        loop.resume()
        await stream.queue.put(_Event("after", acked))
        await _until(lambda: acked == ["before", "after"])
        assert handled == ["before", "after"]
        await stream.queue.put(None)
        await runner

    asyncio.run(scenario())


def test_catalog_statistics_resumed_from_a_save_give_the_vectors_of_one_process() -> None:
    import numpy as np
    import orjson

    from stream_knn.embeddings.catalog import CatalogFeatures
    from stream_knn.worker.catalog_owner import state_record

    rng = np.random.default_rng(7)
    records = [
        {"price": float(rng.normal()), "size": float(rng.normal()), "age": None} for _ in range(40)
    ]
    whole = CatalogFeatures(dims=4, pca=True, warmup_items=16, seed=3)
    expected = [whole.content_vector(features=r) for r in records]

    first = CatalogFeatures(dims=4, pca=True, warmup_items=16, seed=3)
    got = [first.content_vector(features=r) for r in records[:10]]
    saved = orjson.loads(state_record(9, first))
    assert saved["offset"] == 9
    second = CatalogFeatures.from_state(saved["state"])  # the next owner
    got += [second.content_vector(features=r) for r in records[10:]]
    assert second.pca_version == whole.pca_version == 1
    for want, have in zip(expected, got, strict=True):
        if want is None:
            assert have is None
        else:
            assert have is not None
            np.testing.assert_array_equal(want, have)
