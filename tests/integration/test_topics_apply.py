"""``topics apply`` against a real broker: creates, then no changes, then reconciles edits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # type: ignore[attr-defined,unused-ignore]

from stream_knn.cli import main
from stream_knn.errors import TopicSpecError
from stream_knn.topics.admin import Change, apply_topics, list_topics, plan_topics
from stream_knn.topics.spec import default_topics_dir, load_specs

pytestmark = pytest.mark.integration


@pytest.fixture
def spec_dir(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Path]:
    """Copies of two shipped specs under unique names; their topics are deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    directory = tmp_path / "topics"
    directory.mkdir()
    names = []
    for shipped in ("user-events", "item-catalog"):
        spec = orjson.loads((default_topics_dir() / f"{shipped}.json").read_bytes())
        spec["name"] = f"{shipped}-{suffix}"
        names.append(spec["name"])
        write(directory, spec)
    yield directory
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result(timeout=30)


def write(directory: Path, spec: dict[str, Any]) -> None:
    (directory / f"{spec['name']}.json").write_bytes(orjson.dumps(spec))


def edit(directory: Path, name: str, **changes: Any) -> None:
    spec = orjson.loads((directory / f"{name}.json").read_bytes())
    spec.update(changes)
    write(directory, spec)


def topic_config(bootstrap: str, topic: str, name: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return str(entries[name].value)


def test_apply_creates_then_changes_nothing_then_reconciles(
    kafka_bootstrap: str, spec_dir: Path
) -> None:
    specs = load_specs(spec_dir)
    catalog, events = (s.name for s in specs)

    first = apply_topics(kafka_bootstrap, specs)
    assert [(c.kind, c.topic) for c in first] == [("create", catalog), ("create", events)]
    assert apply_topics(kafka_bootstrap, specs) == []
    states = {s.spec.name: s for s in list_topics(kafka_bootstrap, specs)}
    assert (states[events].exists, states[events].partitions, states[events].in_sync) == (
        True,
        12,
        True,
    )
    assert states[catalog].configs == {
        "cleanup.policy": "compact",
        "retention.ms": "-1",
        "delete.retention.ms": "86400000",
    }

    # A changed retention and an extra config are set; a grown partition count is added.
    edit(
        spec_dir,
        events,
        retention_ms=3_600_000,
        partitions=16,
        configs={"max.message.bytes": 200_000},
    )
    changed = apply_topics(kafka_bootstrap, load_specs(spec_dir))
    assert changed == [
        Change(events, "add_partitions", old="12", new="16"),
        Change(events, "set_config", name="retention.ms", old="604800000", new="3600000"),
        Change(events, "set_config", name="max.message.bytes", old="1048588", new="200000"),
    ]
    assert topic_config(kafka_bootstrap, events, "retention.ms") == "3600000"
    assert apply_topics(kafka_bootstrap, load_specs(spec_dir)) == []

    # A config dropped from the spec goes back to the broker default.
    edit(spec_dir, events, configs={})
    assert apply_topics(kafka_bootstrap, load_specs(spec_dir)) == [
        Change(events, "delete_config", name="max.message.bytes", old="200000"),
    ]
    assert topic_config(kafka_bootstrap, events, "max.message.bytes") == "1048588"

    # Fewer partitions cannot be applied, and nothing else is changed meanwhile.
    edit(spec_dir, events, partitions=2, retention_ms=60_000)
    with pytest.raises(TopicSpecError, match=rf"topic {events} has 16 partitions but its spec"):
        apply_topics(kafka_bootstrap, load_specs(spec_dir))
    assert topic_config(kafka_bootstrap, events, "retention.ms") == "3600000"
    with pytest.raises(TopicSpecError, match="Kafka cannot remove partitions"):
        plan_topics(kafka_bootstrap, load_specs(spec_dir))


def test_cli_apply_and_list(
    kafka_bootstrap: str,
    spec_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog, events = (s.name for s in load_specs(spec_dir))
    assert main(["topics", "apply", "--dry-run", "--dir", str(spec_dir)]) == 0
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        f"would create {catalog}",
        f"would create {events}",
    ]
    assert main(["topics", "apply", "--dir", str(spec_dir)]) == 0
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        f"create {catalog}",
        f"create {events}",
    ]
    assert main(["topics", "apply", "--dir", str(spec_dir)]) == 0
    expected = f"no changes (2 topics match their specs at {kafka_bootstrap})\n"
    assert capsys.readouterr().out == expected
    assert main(["topics", "list", "--dir", str(spec_dir)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["TOPIC", "EXISTS", "PARTITIONS", "CLEANUP", "RETENTION_MS", "STATE"],
        [catalog, "yes", "12/12", "compact", "-1", "ok"],
        [events, "yes", "12/12", "delete", "604800000", "ok"],
    ]

    # Growing the keyed input the worker keeps state for says what it does to that state.
    monkeypatch.setenv("STREAM_KNN_KAFKA__USER_EVENTS_TOPIC", events)
    edit(spec_dir, events, partitions=24)
    assert main(["topics", "apply", "--dir", str(spec_dir)]) == 0
    grown, note = capsys.readouterr().out.splitlines()
    assert grown == f"grow {events} partitions: 12 -> 24"
    assert note.startswith(f"  note: {events} is keyed (user_id as UTF-8 text")
    assert "50% of keys change partition" in note
