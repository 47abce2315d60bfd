"""Thousands of malformed records of many kinds, interleaved with good ones, on all three
input topics of a running worker: it never stops or stalls, every bad record is in the
dead-letter topic with its reason (matched by topic, partition and offset), every good
one is applied (a list per event, an answer per request, an upsert per catalog record)."""

from __future__ import annotations

import random
import time
import urllib.request
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from tests.integration.conftest import WorkerEnv

pytestmark = pytest.mark.integration

DIMS = 64  # model.dims, the worker's default
#: Copies of each bad kind (the 1 MB ones: a few).
COPIES = 70
BIG_COPIES = 3
ONE_MB = 1_000_000
GOOD_EVENTS, GOOD_ITEMS, GOOD_REQUESTS = 400, 100, 100

#: A record: its key, its value, and the DLQ reason it must get (None: it is good).
Record = tuple[bytes | None, bytes | None, str | None]


def _deep(inner: bytes, depth: int = 3000) -> bytes:
    return b"[" * depth + inner + b"]" * depth


def _big(prefix: bytes) -> bytes:
    return prefix + b'"pad": "' + b"x" * (ONE_MB - len(prefix) - 12) + b'"}'


def _user_event_kinds(n: int) -> list[Record]:
    """Bad user events of many kinds (copy ``n``), each with its reason."""
    u, i = f"bad-user-{n}", f"item-{n % 7}"
    good = orjson.dumps({"user_id": u, "item_id": i, "event_type": "view"})
    text = f'"user_id": "{u}", "item_id": "{i}", "event_type": "view"'.encode()
    key = u.encode()

    def ev(**fields: Any) -> bytes:
        return orjson.dumps({"user_id": u, "item_id": i, "event_type": "view", **fields})

    kinds: list[tuple[bytes | None, str]] = [
        (b"\xff\xfe" + good, "not_utf8"),
        (b'{"user_id": "u\xc3\x28", "item_id": "i", "event_type": "view"}', "not_utf8"),
        (good[: len(good) // 2 + n % 5], "not_json"),
        (b"{" + text + b', "context": ' + _deep(b"1") + b"}", "not_json"),
        (_deep(b"{}"), "not_json"),
        (b"{" + text + b', "ts": 1e400}', "non_finite_number"),
        (b"{" + text + b', "ts": 123456789012345678901234567890}', "bad_timestamp"),
        (b"{" + text + b', "weight": 1e300}', "bad_weight"),
        (b"{" + text + b', "weight": NaN}', "non_finite_number"),
        (b"{" + text + b', "ts": -Infinity}', "non_finite_number"),
        (
            b'{"user_id": "' + key + b'", "user_id": "", "item_id": "i", "event_type": "view"}',
            "empty_id",
        ),
        (ev(user_id=f"u\x07{n}"), "bad_id"),
        (ev(item_id="\x1b[2J"), "bad_id"),
        (ev(item_id="   "), "empty_id"),
        (ev(user_id="\t \n"), "empty_id"),
        (ev(user_id=[u]), "wrong_type"),
        (ev(item_id={"id": i}), "wrong_type"),
        (ev(event_type=5), "wrong_type"),
        (ev(ts={"ms": 1}), "wrong_type"),
        (ev(weight="heavy"), "wrong_type"),
        (ev(event_type="rating", rating=[5]), "wrong_type"),
        (ev(event_id=1.5), "wrong_type"),
        (ev(context="x"), "wrong_type"),
        (ev(user_id=True), "wrong_type"),
        (b"", "empty_payload"),
        (None, "empty_payload"),
        (b"[1, 2]", "not_object"),
        (b'"just a string"', "not_object"),
        (orjson.dumps({"user_id": u, "item_id": i}), "missing_field"),
        (ev(event_type="teleport"), "unknown_event_type"),
        (ev(weight=-1), "bad_weight"),
        (ev(event_type="rating", rating=11), "bad_rating"),
        (ev(ts="soon"), "bad_timestamp"),
        (ev(user_id="u" * 300), "id_too_long"),
    ]
    if n < BIG_COPIES:
        kinds.append((_big(b"{" + text + b", "), "payload_too_large"))
    return [(key, value, reason) for value, reason in kinds]


def _catalog_kinds(n: int) -> list[Record]:
    item = f"bad-item-{n}"
    key = item.encode()
    vector = [float((n + d) % 5) for d in range(DIMS)]

    def cat(**fields: Any) -> bytes:
        return orjson.dumps({"item_id": item, **fields})

    kinds: list[tuple[bytes | None, str]] = [
        (b"\xff" + cat(vector=vector), "not_utf8"),
        (cat(vector=vector)[:40], "not_json"),
        (_deep(b"1"), "not_json"),
        (cat(vector=vector[:-1]), "bad_vector"),
        (cat(vector=["x", *vector[1:]]), "bad_vector"),
        (cat(vector=[]), "bad_vector"),
        (
            b'{"item_id": "' + key + b'", "vector": [NaN' + b", 1" * (DIMS - 1) + b"]}",
            "non_finite_number",
        ),
        (cat(features={"price": "cheap"}), "bad_features"),
        (cat(features={f"f{j}": j for j in range(300)}), "bad_features"),
        (cat(features=[1, 2]), "bad_features"),
        (cat(deleted="yes"), "wrong_type"),
        (cat(item_id="  "), "empty_id"),
        (cat(item_id="a\x00b"), "bad_id"),
        (cat(item_id=[item]), "wrong_type"),
        (b'{"item_id": "' + key + b'", "item_id": "", "vector": []}', "empty_id"),
        (b"", "empty_payload"),
    ]
    if n < BIG_COPIES:
        kinds.append((_big(b'{"item_id": "' + key + b'", '), "payload_too_large"))
    records: list[Record] = [(key, value, reason) for value, reason in kinds]
    records.append((b"\xff\xfe", None, "not_utf8"))  # a tombstone whose key is not text
    records.append((None, None, "empty_payload"))  # a tombstone with no key
    return records


def _request_kinds(n: int) -> list[Record]:
    user = f"bad-asker-{n}"
    key = user.encode()

    def req(**fields: Any) -> bytes:
        return orjson.dumps({"request_id": f"bad-q-{n}", **fields})

    kinds: list[tuple[bytes | None, str]] = [
        (req(user_id=user, item_id="i"), "conflicting_fields"),
        (req(), "missing_field"),
        (req(user_id=user, k=0), "bad_k"),
        (req(user_id=user, k="3"), "bad_k"),
        (b'{"user_id": "' + key + b'", "k": 123456789012345678901234567890}', "bad_k"),
        (b'{"user_id": "' + key + b'", "k": 1e400}', "non_finite_number"),
        (req(request_id=""), "empty_id"),
        (req(request_id="q\x1f", user_id=user), "bad_id"),
        (req(user_id="   "), "empty_id"),
        (b"\xc0\xaf" + req(user_id=user), "not_utf8"),
        (req(user_id=user)[:-3], "not_json"),
        (b"", "empty_payload"),
    ]
    if n < BIG_COPIES:
        kinds.append((_big(b'{"user_id": "' + key + b'", '), "payload_too_large"))
    return [(key, value, reason) for value, reason in kinds]


def _good_user_events(now_ms: int) -> list[Record]:
    out: list[Record] = []
    for n in range(GOOD_EVENTS):
        user = f"good-user-{n % 40}"
        event = {
            "user_id": user,
            "item_id": f"item-{(n * 7) % 60}",
            "event_type": ("view", "click", "purchase")[n % 3],
            "ts": now_ms + n,
            "event_id": f"good-{n}",
        }
        value = orjson.dumps(event)
        if n % 50 == 0:
            # A key given twice counts with its last value: this one is good.
            value = b'{"user_id": "", ' + value[1:]
        out.append((user.encode(), value, None))
    return out


def _good_catalog() -> list[Record]:
    out: list[Record] = []
    for n in range(GOOD_ITEMS):
        item = f"cat-item-{n}"
        vector = [float(((n * 31 + d) % 11) - 5) for d in range(DIMS)]
        out.append((item.encode(), orjson.dumps({"item_id": item, "vector": vector}), None))
    return out


def _good_requests() -> list[Record]:
    return [
        (
            f"good-user-{n % 40}".encode(),
            orjson.dumps({"request_id": f"good-q-{n}", "user_id": f"good-user-{n % 40}", "k": 3}),
            None,
        )
        for n in range(GOOD_REQUESTS)
    ]


def _mixed(good: list[Record], kinds: Any, seed: int) -> list[Record]:
    bad: list[Record] = []
    for n in range(COPIES):
        bad.extend(kinds(n))
    records = good + bad
    random.Random(seed).shuffle(records)
    return records


def _produce(env: WorkerEnv, role: str, records: list[Record]) -> dict[tuple[int, int], str | None]:
    """Produce ``records`` in order; ``{(partition, offset): reason}`` of each."""
    producer = Producer(
        env.settings(
            partitioner="murmur2_random", **{"linger.ms": 5, "message.max.bytes": 2 * ONE_MB}
        )
    )
    where: dict[tuple[int, int], str | None] = {}
    errors: list[Any] = []

    def delivered(reason: str | None) -> Any:
        def callback(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                where[(msg.partition(), msg.offset())] = reason

        return callback

    for key, value, reason in records:
        while True:
            try:
                producer.produce(
                    env.topics[role], value=value, key=key, on_delivery=delivered(reason)
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not errors, errors[:3]
    assert len(where) == len(records)
    return where


def _metric(env: WorkerEnv, series: str) -> float:
    with urllib.request.urlopen(env.url("/metrics"), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{series} not exported")


def test_hostile_records_on_every_input_topic(worker_env: WorkerEnv, run_worker: Any) -> None:
    worker = run_worker()
    # Exported at 0 from the start: a dashboard sees a healthy worker's zero.
    assert _metric(worker_env, 'stream_knn_dlq_total{reason="bad_id"}') == 0.0

    now_ms = int(time.time() * 1000)
    for kinds in (_user_event_kinds, _catalog_kinds, _request_kinds):
        # Every kind of every topic has a reason of its own here: none is "good".
        assert all(reason is not None for _, _, reason in kinds(0))
    sent = {
        "user_events": _mixed(_good_user_events(now_ms), _user_event_kinds, 1),
        "item_catalog": _mixed(_good_catalog(), _catalog_kinds, 2),
        "requests": _mixed(_good_requests(), _request_kinds, 3),
    }
    expected: dict[tuple[str, int, int], str] = {}
    for role, records in sent.items():
        for (partition, offset), reason in _produce(worker_env, role, records).items():
            if reason is not None:
                expected[(worker_env.topics[role], partition, offset)] = reason
    assert len(expected) > 4000

    letters = worker_env.consume("dlq", expected=len(expected), timeout_s=240)
    found = {}
    for _key, letter in letters:
        where = (letter["topic"], letter["partition"], letter["offset"])
        assert where not in found, f"dead-lettered twice: {where}"
        found[where] = letter["reason"]
    missing = {w: r for w, r in expected.items() if w not in found}
    assert not missing, (
        f"{len(missing)} bad records not dead-lettered, e.g. {list(missing.items())[:5]}"
    )
    wrong = {w: (r, found[w]) for w, r in expected.items() if found[w] != r}
    assert not wrong, (
        f"{len(wrong)} with another reason (expected, got): {list(wrong.values())[:10]}"
    )
    assert len(found) == len(expected), "good records were dead-lettered"
    big = [v for _, v in letters if v["reason"] == "payload_too_large"]
    assert big and all(v["raw_truncated"] and v["raw_bytes"] >= ONE_MB - 100 for v in big)

    # Every good record applied: a list per event, an answer per request ...
    lists = worker_env.consume(
        "recommendations", expected=GOOD_EVENTS + GOOD_REQUESTS, timeout_s=120
    )
    event_ids = {v["event_id"] for _, v in lists if v.get("trigger") == "event"}
    request_ids = {v["request_id"] for _, v in lists if v.get("trigger") == "request"}
    assert event_ids == {f"good-{n}" for n in range(GOOD_EVENTS)}
    assert request_ids == {f"good-q-{n}" for n in range(GOOD_REQUESTS)}
    # ... and an upsert per catalog record; the worker still serving.
    assert _metric(worker_env, 'stream_knn_catalog_records_total{outcome="upsert"}') == GOOD_ITEMS
    bad_events = sum(1 for r in sent["user_events"] if r[2] is not None)
    assert (
        _metric(worker_env, 'stream_knn_events_total{event_type="invalid",outcome="dlq"}')
        == bad_events
    )
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker_env.get("/ready")[0] == 200
