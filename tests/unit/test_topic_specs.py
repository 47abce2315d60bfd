"""Topic specs: shipped ones pass, broken ones name file and field, schemas judge records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_knn.cli import main
from stream_knn.errors import TopicSpecError
from stream_knn.topics.spec import (
    SCHEMA_DIALECT,
    TopicSpec,
    default_topics_dir,
    load_spec,
    load_specs,
    resolve_topics_dir,
    schema_for,
    validator_for,
)

SHIPPED = default_topics_dir()
NAMES = ["events-dlq", "item-catalog", "recommendation-requests", "recommendations", "user-events"]

VALID: dict[str, Any] = {
    "name": "clicks",
    "description": "test topic",
    "partitions": 4,
    "replication_factor": 1,
    "cleanup_policy": "delete",
    "retention_ms": 3_600_000,
    "configs": {"min.insync.replicas": 1, "message.timestamp.type": "CreateTime"},
    "key": "user_id",
    "value_schema": {
        "$schema": SCHEMA_DIALECT,
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    },
}


def write(directory: Path, spec: dict[str, Any], file_name: str | None = None) -> Path:
    path = directory / (file_name or f"{spec['name']}.json")
    path.write_bytes(orjson.dumps(spec))
    return path


def test_shipped_specs_load_with_expected_settings() -> None:
    specs = load_specs(SHIPPED)
    assert [s.name for s in specs] == NAMES
    by_name = {s.name: s for s in specs}
    for name in ("user-events", "item-catalog", "recommendation-requests"):
        assert by_name[name].partitions == 12  # the unit of scale: up to 12 workers
    assert by_name["recommendations"].partitions == 4
    assert all(s.replication_factor == 1 for s in specs)
    assert by_name["item-catalog"].cleanup_policy == "compact"
    assert by_name["user-events"].topic_configs() == {
        "cleanup.policy": "delete",
        "retention.ms": "604800000",
    }


def test_topics_check_cli_prints_ok_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "check", "--dir", str(SHIPPED)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"OK {SHIPPED / f'{name}.json'}" for name in NAMES]


def test_topics_check_cli_fails_on_a_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, VALID)
    write(tmp_path, {**VALID, "name": "broken", "partitions": 0})
    assert main(["topics", "check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ERROR {tmp_path / 'broken.json'}: field 'partitions' = 0")
    assert out[1] == f"OK {tmp_path / 'clicks.json'}"


def test_valid_spec_round_trip(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert spec == TopicSpec(
        name="clicks",
        partitions=4,
        replication_factor=1,
        cleanup_policy="delete",
        retention_ms=3_600_000,
        key="user_id",
        value_schema=VALID["value_schema"],
        configs={"min.insync.replicas": "1", "message.timestamp.type": "CreateTime"},
        description="test topic",
    )
    assert spec.topic_configs() == {
        "cleanup.policy": "delete",
        "retention.ms": "3600000",
        "min.insync.replicas": "1",
        "message.timestamp.type": "CreateTime",
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"partitions": 0}, "'partitions'"),
        ({"partitions": "4"}, "'partitions'"),
        ({"partitions": True}, "'partitions'"),
        ({"replication_factor": 0}, "'replication_factor'"),
        ({"retention_ms": -2}, "'retention_ms'"),
        ({"cleanup_policy": "forever"}, "'cleanup_policy'"),
        ({"key": ""}, "'key'"),
        ({"configs": {"retention.ms": 5}}, "'configs.retention.ms'"),
        ({"configs": {"Bad Name": 1}}, "'configs.Bad Name'"),
        ({"configs": {"segment.ms": [1]}}, "'configs.segment.ms'"),
        ({"configs": []}, "'configs'"),
        ({"value_schema": {"type": "object"}}, "'value_schema.$schema'"),
        ({"value_schema": {"$schema": SCHEMA_DIALECT, "type": "nope"}}, "'value_schema'"),
        ({"value_schema": []}, "'value_schema'"),
        ({"retention": 5}, "'retention'"),
    ],
)
def test_broken_spec_names_file_and_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    spec = {**copy.deepcopy(VALID), **change}
    path = write(tmp_path, spec)
    with pytest.raises(TopicSpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert field in message


def test_missing_field_is_named(tmp_path: Path) -> None:
    spec = copy.deepcopy(VALID)
    del spec["retention_ms"]
    path = write(tmp_path, spec)
    with pytest.raises(TopicSpecError, match=r"field 'retention_ms' is missing"):
        load_spec(path)


def test_bad_schema_message_points_into_the_schema(tmp_path: Path) -> None:
    schema = {"$schema": SCHEMA_DIALECT, "properties": {"n": {"type": "int"}}}
    path = write(tmp_path, {**VALID, "value_schema": schema})
    with pytest.raises(TopicSpecError, match=r"not a valid JSON Schema at properties/n/type"):
        load_spec(path)


def test_name_must_match_file_and_be_a_topic_name(tmp_path: Path) -> None:
    with pytest.raises(TopicSpecError, match=r"must match the file name \(clicks\.json\)"):
        load_spec(write(tmp_path, VALID, "other.json"))
    with pytest.raises(TopicSpecError, match=r"field 'name' = 'a b' is not a Kafka topic name"):
        load_spec(write(tmp_path, {**VALID, "name": "a b"}))


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "clicks.json"
    path.write_text('{"name": "clicks",')
    with pytest.raises(TopicSpecError, match=r"clicks\.json: not valid JSON"):
        load_spec(path)


def test_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TopicSpecError, match=r"no topic specs \(\*\.json\) in"):
        load_specs(tmp_path)
    with pytest.raises(TopicSpecError, match=r"topic spec directory .*nowhere not found"):
        load_specs(tmp_path / "nowhere")


def test_relative_topics_dir_falls_back_to_the_source_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_topics_dir(Path("topics")) == SHIPPED
    (tmp_path / "topics").mkdir()
    assert resolve_topics_dir(Path("topics")) == Path("topics")
    assert resolve_topics_dir(tmp_path / "absent") == tmp_path / "absent"


def test_schema_for_unknown_topic_lists_the_declared_ones() -> None:
    with pytest.raises(TopicSpecError, match=r"no topic spec declares 'nope'; declared: events-"):
        schema_for("nope")
    assert schema_for("user-events")["$schema"] == SCHEMA_DIALECT


@pytest.mark.parametrize(
    ("record", "valid"),
    [
        ({"user_id": "u1", "item_id": "i1", "event_type": "view"}, True),
        ({"user_id": "u1", "item_id": 7, "event_type": "click", "ts": 1_700_000_000_000}, True),
        ({"user_id": "u1", "item_id": "i1", "event_type": "purchase", "ts": "1700000000"}, True),
        ({"user_id": "u1", "event_type": "forget"}, True),
        ({"user_id": "u1", "item_id": "i1", "event_type": "rating", "rating": 4.5}, True),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "context": {"p": "x"}}, True),
        ({"user_id": "u1", "event_type": "view"}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "teleport"}, False),
        ({"user_id": "", "item_id": "i1", "event_type": "view"}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "rating"}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "rating", "rating": 11}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "weight": -1}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "ts": -5}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "ts": "soon"}, False),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "context": "x"}, False),
    ],
)
def test_user_events_schema(record: dict[str, Any], valid: bool) -> None:
    assert validator_for("user-events").is_valid(record) is valid


def test_other_topic_schemas() -> None:
    catalog = validator_for("item-catalog")
    assert catalog.is_valid({"item_id": "i1", "vector": [0.1, 2], "features": {"a": 1, "b": None}})
    assert catalog.is_valid({"item_id": "i1", "deleted": True})
    assert not catalog.is_valid({"item_id": "i1", "vector": []})
    assert not catalog.is_valid({"item_id": "i1", "features": {"a": "x"}})
    assert not catalog.is_valid({"vector": [1.0]})

    recs = validator_for("recommendations")
    emitted = {
        "user_id": "u1",
        "items": [{"item_id": "i2", "score": 0.9}],
        "k": 10,
        "index_version": None,
        "variant": "control",
        "trigger": "event",
        "event_id": "user-events-0-7",
        "event_ts": 1_700_000_000_000,
        "emitted_ts": 1_700_000_000_005,
        "fallback": "popular",
    }
    assert recs.is_valid(emitted)
    assert recs.is_valid({**emitted, "trigger": "request", "request_id": "r1"})
    assert not recs.is_valid({**emitted, "trigger": "cron"})
    assert not recs.is_valid({**emitted, "items": [{"item_id": "i2"}]})
    assert not recs.is_valid({k: v for k, v in emitted.items() if k != "emitted_ts"})

    requests = validator_for("recommendation-requests")
    assert requests.is_valid({"request_id": "r1", "user_id": "u1", "k": 5})
    assert requests.is_valid({"request_id": "r1", "item_id": "i1"})
    assert not requests.is_valid({"request_id": "r1", "user_id": "u1", "item_id": "i1"})
    assert not requests.is_valid({"request_id": "r1"})
    assert not requests.is_valid({"request_id": "r1", "user_id": "u1", "k": 0})

    dlq = validator_for("events-dlq")
    dead = {
        "error": "value is not valid JSON",
        "reason": "not_json",
        "topic": "user-events",
        "partition": 2,
        "offset": 41,
        "raw": "not json",
        "key": "u1",
    }
    assert dlq.is_valid(dead)
    assert dlq.is_valid({**dead, "raw": "AAE=", "raw_encoding": "base64", "key": None})
    assert not dlq.is_valid({k: v for k, v in dead.items() if k != "reason"})
    assert not dlq.is_valid({**dead, "offset": -1})


def test_topics_check_cli_fails_on_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["topics", "check", "--dir", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().out.startswith(
        f"ERROR topic spec directory {tmp_path / 'absent'} not found"
    )
