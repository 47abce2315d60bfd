"""Producer and tail against a real broker: every event acknowledged, read back exactly."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from stream_knn.events.producer import produce_events
from stream_knn.events.synthetic import SyntheticStream
from stream_knn.events.tail import consume

pytestmark = pytest.mark.integration


@pytest.fixture
def _bootstrap(kafka_bootstrap: str) -> str:
    return kafka_bootstrap


@pytest.fixture
def make_topic(_bootstrap: str) -> Iterator[Callable[..., str]]:
    admin = AdminClient({"bootstrap.servers": _bootstrap})
    created: list[str] = []

    def make(partitions: int, **config: str) -> str:
        name = f"test-produce-{uuid.uuid4().hex[:10]}"
        futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
        futures[name].result(timeout=30)
        created.append(name)
        return name

    yield make
    if created:
        for future in admin.delete_topics(created).values():
            future.result(timeout=30)


def _cli(*args: str, bootstrap: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KNN_")}
    env["STREAM_KNN_BOOTSTRAP_SERVERS"] = bootstrap
    return subprocess.run(
        [sys.executable, "-m", "stream_knn.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_produce_then_consume_exactly_n(_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic(3)
    stream = SyntheticStream(n_users=50, n_items=100, seed=11)
    events = list(stream.events(3000))
    report = produce_events(_bootstrap, topic, iter(events), limit=2500)
    assert (report.sent, report.acked, report.failed, report.ok) == (2500, 2500, 0, True)

    records = consume(_bootstrap, topic, limit=None, timeout_s=3.0)
    assert len(records) == 2500
    sent = events[:2500]
    assert Counter(key for key, _ in records) == Counter(e["user_id"].encode() for e in sent)
    values = [orjson.loads(value) for _, value in records if value is not None]
    assert all(orjson.loads(v or b"")["user_id"].encode() == k for k, v in records)
    # One user's events share a partition, so each user's order is the order sent.
    got: dict[str, list[str]] = defaultdict(list)
    want: dict[str, list[str]] = defaultdict(list)
    for value in values:
        got[value["user_id"]].append(value["event_id"])
    for event in sent:
        want[event["user_id"]].append(event["event_id"])
    assert got == want


def test_consume_stops_at_limit(_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic(1)
    events = list(SyntheticStream(n_users=5, n_items=10, n_clusters=5, seed=2).events(40))
    assert produce_events(_bootstrap, topic, events, rate=2000.0).ok
    records = consume(_bootstrap, topic, limit=7, timeout_s=30.0)
    assert [orjson.loads(v or b"") for _, v in records] == events[:7]


def test_undeliverable_events_are_counted_as_failed(
    _bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1, **{"max.message.bytes": "200"})
    # Random ids do not compress, so every batch is over the topic's size limit.
    events = [
        {"user_id": secrets.token_hex(400), "item_id": "i1", "event_type": "view"} for _ in range(5)
    ]
    report = produce_events(_bootstrap, topic, events)
    assert (report.sent, report.acked, report.failed, report.ok) == (5, 0, 5, False)
    assert report.errors


def test_cli_produce_file_then_tail(
    _bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(1)
    rows = [(u, 100 + u, 1 + u % 5, 1_000_000 - 10 * u) for u in range(12)]  # reverse time
    data = tmp_path / "u.data"
    data.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows), encoding="utf-8")

    produced = _cli("produce", "--file", str(data), "--topic", topic, bootstrap=_bootstrap)
    assert produced.returncode == 0, produced.stderr
    assert "sent 12, acked 12, failed 0 in" in produced.stdout
    assert produced.stdout.rstrip().endswith(f"to topic {topic}")

    tailed = _cli(
        "tail",
        topic,
        "--from-beginning",
        "--limit",
        "12",
        "--timeout",
        "30",
        bootstrap=_bootstrap,
    )
    assert tailed.returncode == 0, tailed.stderr
    lines = tailed.stdout.splitlines()
    expected = [
        f'{u}\t{{"user_id":"{u}","item_id":"{i}","event_type":"rating","ts":{t * 1000},'
        f'"rating":{float(r)}}}'
        for u, i, r, t in sorted(rows, key=lambda row: row[3])
    ]
    assert lines == expected


def test_cli_produce_fails_when_not_acknowledged(
    _bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(1, **{"max.message.bytes": "200"})
    data = tmp_path / "big.csv"
    data.write_text(
        "user_id,item_id\n" + "".join(f"u{n},{secrets.token_hex(400)}\n" for n in range(3)),
        encoding="utf-8",
    )
    produced = _cli("produce", "--file", str(data), "--topic", topic, bootstrap=_bootstrap)
    assert produced.returncode == 1
    assert "sent 3, acked 0, failed 3" in produced.stdout
    assert "3 of 3 events were not acknowledged" in produced.stderr


def test_cli_rejects_bad_file_with_line(_bootstrap: str, tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text("1\t2\t3\t4\n1\t2\t3\n", encoding="utf-8")
    produced = _cli("produce", "--file", str(data), "--topic", "unused", bootstrap=_bootstrap)
    assert produced.returncode == 2
    assert f"{data}:2: expected 4 fields" in produced.stderr
