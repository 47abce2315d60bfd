"""On-demand serving of a running worker: seen-item exclusion, HTTP, Kafka requests, variants."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Any

import orjson
import pytest

from stream_knn.config import EventsConfig, load_config
from stream_knn.events.synthetic import SyntheticStream
from stream_knn.serving.variants import VariantAssigner

pytestmark = pytest.mark.integration

PROFILE_MAX_ITEMS = 50  # model.profile_max_items, the default the worker runs with
MAX_K = 200  # serving.max_k default


def _recent_ms() -> int:
    # Event times near the wall clock: profiles are decayed to "now" when asked on demand,
    # and a history years old underflows to no query at all (see test_batch.py's xfail).
    return int(time.time() * 1000) - 60_000


def _event_records(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes | None]]:
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def _histories(events: list[dict[str, Any]]) -> dict[str, set[str]]:
    """event_id -> the user's recent items right after that event (the profile's items)."""
    recent: dict[str, OrderedDict[str, None]] = {}
    out: dict[str, set[str]] = {}
    for e in events:
        items = recent.setdefault(e["user_id"], OrderedDict())
        items.pop(e["item_id"], None)
        items[e["item_id"]] = None
        while len(items) > PROFILE_MAX_ITEMS:
            items.popitem(last=False)
        out[e["event_id"]] = set(items)
    return out


def _wait_quiescent(env: Any, n_items: int, timeout_s: float = 45.0) -> int:
    """Wait until every index holds ``n_items`` with nothing pending and no new version
    comes for a while; return the primary index version."""
    deadline = time.monotonic() + timeout_s
    previous: list[Any] | None = None
    body: Any = None
    while time.monotonic() < deadline:
        status, body = env.get("/index")
        if status == 200:
            state = [(ix["version"], ix["items"], ix["pending_items"]) for ix in body["indexes"]]
            settled = all(v is not None and n == n_items and p == 0 for v, n, p in state)
            if settled and state == previous:
                return int(body["indexes"][0]["version"])
            previous = state if settled else None
        time.sleep(1.5)
    raise AssertionError(f"index not settled on {n_items} items after {timeout_s}s: {body}")


def _popularity(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Items by summed event weight, most popular first (decay is negligible here)."""
    weights = EventsConfig()
    counts: dict[str, float] = {}
    for e in events:
        counts[e["item_id"]] = counts.get(e["item_id"], 0.0) + weights.weight_of(e["event_type"])
    return sorted(counts.items(), key=lambda kv: -kv[1])


def test_event_lists_exclude_seen_items_and_http_endpoints_answer(worker_env, run_worker):
    stream = SyntheticStream(
        n_users=30, n_items=60, n_clusters=4, clusters_per_user=1, seed=11, start_ms=_recent_ms()
    )
    events = list(stream.events(400))
    run_worker()
    worker_env.produce("user_events", _event_records(events))

    recs = worker_env.consume("recommendations", expected=len(events), timeout_s=45)
    assert Counter(body["event_id"] for _, body in recs) == Counter(e["event_id"] for e in events)
    history = _histories(events)
    touched = {e["event_id"]: e["item_id"] for e in events}
    for _, body in recs:
        listed = {entry["item_id"] for entry in body["items"]}
        assert touched[body["event_id"]] not in listed, body
        assert not listed & history[body["event_id"]], (body, history[body["event_id"]])
    # The exclusion is not vacuous: nearly every list is full.
    assert sum(len(body["items"]) == 10 for _, body in recs) >= 0.9 * len(recs)

    n_items = len({e["item_id"] for e in events})
    version = _wait_quiescent(worker_env, n_items)
    users = Counter(e["user_id"] for e in events)
    heavy = users.most_common(1)[0][0]
    seen = {e["item_id"] for e in events if e["user_id"] == heavy}

    status, body = worker_env.get(f"/recommendations/{heavy}?k=3")
    assert status == 200, body
    assert (body["user_id"], body["k"], body["variant"]) == (heavy, 3, "control")
    assert body["trigger"] == "http" and body["index_version"] == version
    assert "cold_start" not in body and "fallback" not in body
    assert len(body["items"]) == 3
    assert not {entry["item_id"] for entry in body["items"]} & seen

    status, body = worker_env.get("/recommendations/nobody-at-all?k=3")
    assert status == 200, body
    assert body["cold_start"] is True and body["fallback"] == "popular"
    # The three most popular items by event weight, scores relative to the top one.
    counts = _popularity(events)
    top = counts[0][1]
    assert [round(entry["score"], 4) for entry in body["items"]] == [
        round(c / top, 4) for _, c in counts[:3]
    ]
    # Ties may come in any order, but every listed item has the count of its rank.
    assert [dict(counts)[entry["item_id"]] for entry in body["items"]] == [c for _, c in counts[:3]]

    item = events[0]["item_id"]
    status, body = worker_env.get(f"/similar/{item}?k=4")
    assert status == 200, body
    assert (body["item_id"], body["k"], body["index_version"]) == (item, 4, version)
    assert len(body["items"]) == 4 and item not in {entry["item_id"] for entry in body["items"]}
    # Synthetic clusters are learned: the nearest items share the item's cluster.
    clusters = [stream.cluster_of(entry["item_id"]) for entry in body["items"]]
    assert clusters.count(stream.cluster_of(item)) >= 3, clusters

    status, body = worker_env.get("/similar/no-such-item?k=4")
    assert status == 404
    assert body == {"error": "unknown item 'no-such-item'", "item_id": "no-such-item"}

    for path, shown in [
        (f"/recommendations/{heavy}?k=abc", "'abc'"),
        (f"/recommendations/{heavy}?k=0", "0"),
        (f"/recommendations/{heavy}?k={MAX_K + 1}", str(MAX_K + 1)),
        (f"/similar/{item}?k=-2", "-2"),
        (f"/similar/{item}?k={MAX_K + 1}", str(MAX_K + 1)),
    ]:
        status, body = worker_env.get(path)
        assert status == 400, (path, body)
        assert body == {"error": f"k must be an integer between 1 and {MAX_K}, got {shown}"}


def test_requests_topic_answers_on_recommendations_and_bad_requests_go_to_dlq(
    worker_env, run_worker
):
    stream = SyntheticStream(n_users=20, n_items=40, n_clusters=4, seed=5, start_ms=_recent_ms())
    events = list(stream.events(160))
    run_worker()
    worker_env.produce("user_events", _event_records(events))
    version = _wait_quiescent(worker_env, len({e["item_id"] for e in events}))

    user = Counter(e["user_id"] for e in events).most_common(1)[0][0]
    seen = {e["item_id"] for e in events if e["user_id"] == user}
    item = events[0]["item_id"]
    good = {
        "r-user": (user, {"request_id": "r-user", "user_id": user, "k": 4}),
        "r-item": (item, {"request_id": "r-item", "item_id": item, "k": 2}),
        "r-cold": ("ghost", {"request_id": "r-cold", "user_id": "ghost"}),
        "r-nothing": ("gone", {"request_id": "r-nothing", "item_id": "gone", "k": 3}),
    }
    bad = [
        (b"u1", b"{not json", "not_json"),
        (
            b"u1",
            orjson.dumps({"request_id": "b1", "user_id": "u1", "item_id": "i1"}),
            "conflicting_fields",
        ),
        (b"u1", orjson.dumps({"request_id": "b2", "user_id": "u1", "k": 0}), "bad_k"),
        (b"u1", orjson.dumps({"request_id": "b3", "user_id": "u1", "k": MAX_K + 1}), "bad_k"),
        (b"u1", orjson.dumps({"request_id": "b4"}), "missing_field"),
    ]
    records = [(key.encode(), orjson.dumps(value)) for key, value in good.values()]
    records += [(key, value) for key, value, _ in bad]
    worker_env.produce("requests", records)

    out = worker_env.consume("recommendations", expected=len(events) + len(good), timeout_s=45)
    answers = {body["request_id"]: (key, body) for key, body in out if "request_id" in body}
    assert set(answers) == set(good)
    for request_id, (key, body) in answers.items():
        assert key == good[request_id][0].encode(), (request_id, key)
        # The unknown-item answer carries no trigger (worker nit, reported).
        assert body.get("trigger", "request") == "request"

    body = answers["r-user"][1]
    assert (body["user_id"], body["k"], body["index_version"]) == (user, 4, version)
    assert len(body["items"]) == 4 and not {e["item_id"] for e in body["items"]} & seen
    status, http = worker_env.get(f"/recommendations/{user}?k=4")
    assert status == 200 and http["items"] == body["items"]

    body = answers["r-item"][1]
    assert (body["item_id"], body["k"]) == (item, 2) and len(body["items"]) == 2
    status, http = worker_env.get(f"/similar/{item}?k=2")
    assert status == 200 and http["items"] == body["items"]

    body = answers["r-cold"][1]
    assert body["cold_start"] is True and body["fallback"] == "popular"
    assert body["k"] == 10 and len(body["items"]) == 10

    body = answers["r-nothing"][1]
    assert (body["item_id"], body["items"], body["error"]) == ("gone", [], "unknown item 'gone'")

    dlq = worker_env.consume("dlq", expected=len(bad), timeout_s=30)
    assert sorted(body["reason"] for _, body in dlq) == sorted(reason for *_, reason in bad)
    for key, body in dlq:
        assert key == b"u1"
        assert body["topic"] == worker_env.topics["requests"]
        assert body["error"] and body["raw"]


VARIANTS = '[{"name":"a","share":0.7},{"name":"b","share":0.3,"k":5}]'
N_VARIANT_USERS = 300


def test_variant_assignment_matches_shares_and_survives_a_restart(worker_env, run_worker):
    worker_env.extra["STREAM_KNN_SERVING__VARIANTS"] = VARIANTS
    config = load_config(environ=worker_env.env())
    assigner = VariantAssigner(config.serving, config.index)
    users = [f"v{n}" for n in range(N_VARIANT_USERS)]
    start = _recent_ms()
    first = [
        {
            "user_id": u,
            "item_id": f"i{n % 40}",
            "event_type": "view",
            "ts": start + n,
            "event_id": f"first-{n}",
        }
        for n, u in enumerate(users)
    ]
    worker = run_worker()
    worker_env.produce("user_events", _event_records(first))
    recs = worker_env.consume("recommendations", expected=len(first), timeout_s=45)
    variant_of = {body["user_id"]: body["variant"] for _, body in recs}
    assert set(variant_of) == set(users)
    for _, body in recs:
        expected = assigner.assign(body["user_id"])
        assert body["variant"] == expected.name
        assert body["k"] == (5 if expected.name == "b" else 10)
        assert len(body["items"]) <= body["k"]
    shares = Counter(variant_of.values())
    assert abs(shares["a"] / len(users) - 0.7) <= 0.06, shares
    assert abs(shares["b"] / len(users) - 0.3) <= 0.06, shares

    worker.stop()
    run_worker()
    again = [
        {
            "user_id": u,
            "item_id": f"i{(n + 7) % 40}",
            "event_type": "click",
            "ts": start + 1000 + n,
            "event_id": f"again-{n}",
        }
        for n, u in enumerate(users[:100])
    ]
    worker_env.produce("user_events", _event_records(again))
    recs = worker_env.consume("recommendations", expected=len(first) + len(again), timeout_s=45)
    later = [body for _, body in recs if body["event_id"].startswith("again-")]
    assert len(later) == len(again)
    assert all(body["variant"] == variant_of[body["user_id"]] for body in later)
    for user in users[:20]:
        status, body = worker_env.get(f"/recommendations/{user}")
        assert status == 200 and body["variant"] == variant_of[user], body


def test_http_default_k_is_the_variant_k_like_kafka_requests(worker_env, run_worker):
    worker_env.extra["STREAM_KNN_SERVING__VARIANTS"] = VARIANTS
    config = load_config(environ=worker_env.env())
    assigner = VariantAssigner(config.serving, config.index)
    user = next(f"w{n}" for n in range(1000) if assigner.assign(f"w{n}").name == "b")
    run_worker()
    status, body = worker_env.get(f"/recommendations/{user}")
    assert status == 200 and body["variant"] == "b"
    assert body["k"] == 5
