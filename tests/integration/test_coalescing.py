"""Coalescing under a burst: at most one list per user per interval, the last state wins."""

from __future__ import annotations

import time

import orjson
import pytest

pytestmark = pytest.mark.integration


def test_a_burst_from_one_user_gives_one_list_now_and_one_for_its_end(worker_env, run_worker):
    worker_env.extra["STREAM_KNN_SERVING__EMIT_INTERVAL_SECONDS"] = "3"
    run_worker()
    now = int(time.time() * 1000)
    burst = [
        {
            "user_id": "hot",
            "item_id": f"i{n % 7}",
            "event_type": "click",
            "ts": now + n,
            "event_id": f"burst-{n}",
        }
        for n in range(40)
    ]
    calm = [
        {
            "user_id": f"calm{n}",
            "item_id": f"i{n % 7}",
            "event_type": "view",
            "ts": now,
            "event_id": f"calm-{n}",
        }
        for n in range(10)
    ]
    worker_env.produce(
        "user_events", [(e["user_id"].encode(), orjson.dumps(e)) for e in burst + calm]
    )
    # 40 burst events become 2 lists (the first at once, the newest state after the
    # interval); each calm user's single event gives its own list.
    recs = worker_env.consume("recommendations", expected=12, timeout_s=60)
    hot = [body for key, body in recs if key == b"hot"]
    calm_lists = [body for key, body in recs if key != b"hot"]
    assert len(calm_lists) == 10
    assert len(hot) == 2, [b["event_id"] for b in hot]
    first, last = sorted(hot, key=lambda b: b["emitted_ts"])
    assert first["event_id"] == "burst-0"
    assert last["event_id"] == "burst-39"  # the newest trigger wins, nothing lost at the end
    assert last["emitted_ts"] - first["emitted_ts"] >= 3000 - 200
    # The final list reflects the whole burst: none of the user's items is recommended.
    assert not {item["item_id"] for item in last["items"]} & {f"i{n}" for n in range(7)}
