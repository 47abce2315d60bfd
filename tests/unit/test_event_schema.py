"""Parsing of user events, catalog records and requests: typed records or exact DLQ reasons."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from stream_knn.config import EventsConfig
from stream_knn.events.schema import (
    DLQ_REASONS,
    CatalogRecord,
    DlqRecord,
    Request,
    UserEvent,
    parse_catalog_record,
    parse_request,
    parse_user_event,
)

CFG = EventsConfig(max_id_length=8, max_payload_bytes=200)
BROKER_TS = 1_700_000_123_456


def _event(raw: bytes | None, config: EventsConfig = CFG) -> UserEvent | DlqRecord:
    return parse_user_event(
        raw,
        config=config,
        topic="ue",
        partition=3,
        offset=41,
        key=b"u1",
        broker_ts_ms=BROKER_TS,
    )


def _json(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def _ok(raw: bytes | None, config: EventsConfig = CFG) -> UserEvent:
    result = _event(raw, config)
    assert isinstance(result, UserEvent), result
    return result


# ---------------------------------------------------------------- user events: valid


def test_minimal_event_gets_defaults() -> None:
    e = _ok(_json(user_id="u1", item_id="i1", event_type="view"))
    assert e == UserEvent(
        user_id="u1",
        item_id="i1",
        event_type="view",
        ts_ms=BROKER_TS,
        weight=1.0,
        event_id="ue-3-41",
        rating=None,
        context=None,
    )


@pytest.mark.parametrize(
    ("event_type", "weight"),
    [("view", 1.0), ("click", 2.0), ("add_to_cart", 3.0), ("purchase", 5.0)],
)
def test_default_weight_by_type(event_type: str, weight: float) -> None:
    assert _ok(_json(user_id="u", item_id="i", event_type=event_type)).weight == weight


def test_weights_come_from_config() -> None:
    config = EventsConfig(click_weight=7.5, rating_weight_base=0.5, rating_weight_scale=2.0)
    assert _ok(_json(user_id="u", item_id="i", event_type="click"), config).weight == 7.5
    rated = _ok(_json(user_id="u", item_id="i", event_type="rating", rating=4), config)
    assert (rated.weight, rated.rating) == (8.5, 4.0)


def test_explicit_fields_win() -> None:
    e = _ok(
        _json(
            user_id="u",
            item_id="i",
            event_type="purchase",
            ts=1_700_000_000_001,
            weight=0.25,
            event_id="e-9",
            context={"page": "home"},
            extra="ignored",
        )
    )
    assert (e.ts_ms, e.weight, e.event_id, e.context) == (
        1_700_000_000_001,
        0.25,
        "e-9",
        {"page": "home"},
    )


@pytest.mark.parametrize(
    ("ts", "ts_ms"),
    [
        (1_700_000_000_000, 1_700_000_000_000),  # epoch ms
        (1_700_000_000, 1_700_000_000_000),  # epoch seconds (below 1e11)
        (1_700_000_000.5, 1_700_000_000_500),  # float seconds
        (1_700_000_000_000.9, 1_700_000_000_000),  # float ms, fraction dropped
        ("1700000000000", 1_700_000_000_000),  # numeric string
        ("1700000000.25", 1_700_000_000_250),
        (0, 0),
        (None, BROKER_TS),  # null = missing
    ],
)
def test_timestamp_rules(ts: Any, ts_ms: int) -> None:
    assert _ok(_json(user_id="u", item_id="i", event_type="view", ts=ts)).ts_ms == ts_ms


def test_integer_ids_become_text() -> None:
    e = _ok(_json(user_id=42, item_id=7, event_type="view", event_id=5))
    assert (e.user_id, e.item_id, e.event_id) == ("42", "7", "5")


def test_forget_needs_no_item() -> None:
    e = _ok(_json(user_id="u9", event_type="forget"))
    assert (e.user_id, e.item_id, e.event_type, e.weight) == ("u9", None, "forget", 0.0)
    assert _ok(_json(user_id="u9", item_id="i1", event_type="forget")).item_id is None


def test_rating_kept_on_other_types_without_changing_weight() -> None:
    e = _ok(_json(user_id="u", item_id="i", event_type="click", rating=3))
    assert (e.rating, e.weight) == (3.0, 2.0)


# ---------------------------------------------------------------- user events: DLQ reasons

BAD_EVENTS: list[tuple[str, bytes | None]] = [
    ("payload_too_large", _json(user_id="u", item_id="i", event_type="view", pad="x" * 300)),
    ("empty_payload", None),
    ("empty_payload", b""),
    ("not_utf8", b'{"user_id":"\xff\xfe","item_id":"i","event_type":"view"}'),
    ("non_finite_number", b'{"user_id":"u","item_id":"i","event_type":"view","weight":NaN}'),
    ("non_finite_number", b'{"user_id":"u","item_id":"i","event_type":"view","ts":Infinity}'),
    ("non_finite_number", b'{"user_id":"u","item_id":"i","event_type":"view","ts":-Infinity}'),
    ("non_finite_number", b'{"user_id":"u","item_id":"i","event_type":"view","weight":1e400}'),
    ("non_finite_number", _json(user_id="u", item_id="i", event_type="view", ts="nan")),
    ("not_json", b'{"user_id":"u",'),
    ("not_json", b"hello"),
    ("not_json", b'{"user_id":"NaNa"'),
    ("not_object", b'["u","i","view"]'),
    ("not_object", b'"u1"'),
    ("missing_field", _json(item_id="i", event_type="view")),
    ("missing_field", _json(user_id=None, item_id="i", event_type="view")),
    ("missing_field", _json(user_id="u", event_type="view")),
    ("missing_field", _json(user_id="u", item_id="i")),
    ("missing_field", _json(user_id="u", item_id="i", event_type="rating")),
    ("wrong_type", _json(user_id=["u"], item_id="i", event_type="view")),
    ("wrong_type", _json(user_id=True, item_id="i", event_type="view")),
    ("wrong_type", _json(user_id="u", item_id=1.5, event_type="view")),
    ("wrong_type", _json(user_id="u", item_id="i", event_type=3)),
    ("wrong_type", _json(user_id="u", item_id="i", event_type="view", ts=True)),
    ("wrong_type", _json(user_id="u", item_id="i", event_type="view", ts=[1])),
    ("wrong_type", _json(user_id="u", item_id="i", event_type="view", weight="2")),
    ("wrong_type", _json(user_id="u", item_id="i", event_type="rating", rating="5")),
    ("wrong_type", _json(user_id="u", item_id="i", event_type="view", context=[1])),
    ("empty_id", _json(user_id="", item_id="i", event_type="view")),
    ("empty_id", _json(user_id="u", item_id="", event_type="view")),
    ("empty_id", _json(user_id="u", item_id="i", event_type="view", event_id="")),
    ("id_too_long", _json(user_id="u123456789", item_id="i", event_type="view")),
    ("id_too_long", _json(user_id="u", item_id="i", event_type="view", event_id="e" * 9)),
    ("unknown_event_type", _json(user_id="u", item_id="i", event_type="like")),
    ("unknown_event_type", _json(user_id="u", item_id="i", event_type="VIEW")),
    ("bad_timestamp", _json(user_id="u", item_id="i", event_type="view", ts="yesterday")),
    ("bad_timestamp", _json(user_id="u", item_id="i", event_type="view", ts=-5)),
    ("bad_timestamp", _json(user_id="u", item_id="i", event_type="view", ts=10**16)),
    ("bad_weight", _json(user_id="u", item_id="i", event_type="view", weight=-1)),
    ("bad_rating", _json(user_id="u", item_id="i", event_type="rating", rating=11)),
    ("bad_rating", _json(user_id="u", item_id="i", event_type="rating", rating=-0.5)),
]


@pytest.mark.parametrize(("reason", "raw"), BAD_EVENTS)
def test_bad_event_reason(reason: str, raw: bytes | None) -> None:
    result = _event(raw)
    assert isinstance(result, DlqRecord)
    assert result.reason == reason, result.error
    assert (result.topic, result.partition, result.offset, result.raw, result.key) == (
        "ue",
        3,
        41,
        raw,
        b"u1",
    )
    assert result.error


def test_checks_run_in_documented_order() -> None:
    # Several faults at once: the first in the check order decides the reason.
    both = _json(user_id="", item_id="i", event_type="like", ts="soon")
    assert _event(both).reason == "empty_id"  # type: ignore[union-attr]
    big_and_broken = b"{" + b"x" * 300
    assert _event(big_and_broken).reason == "payload_too_large"  # type: ignore[union-attr]


def test_every_user_event_reason_is_declared() -> None:
    assert {reason for reason, _ in BAD_EVENTS} <= set(DLQ_REASONS)
    assert len(DLQ_REASONS) == len(set(DLQ_REASONS))


# ---------------------------------------------------------------- DLQ value


def test_dlq_value_utf8() -> None:
    record = DlqRecord("not_json", "value is not valid JSON", "ue", 1, 2, b"oops", b"u1")
    assert orjson.loads(record.to_value()) == {
        "error": "value is not valid JSON",
        "reason": "not_json",
        "topic": "ue",
        "partition": 1,
        "offset": 2,
        "raw": "oops",
        "key": "u1",
    }


def test_dlq_value_binary_is_base64() -> None:
    record = DlqRecord("not_utf8", "bad", "ue", 0, 5, b"\xff\x00", b"\xfe")
    value = orjson.loads(record.to_value())
    assert value["raw"] == base64.b64encode(b"\xff\x00").decode()
    assert value["raw_encoding"] == "base64"
    assert value["key"] == "/g=="
    assert value["key_encoding"] == "base64"
    empty = orjson.loads(DlqRecord("empty_payload", "e", "ue", 0, 5, None, None).to_value())
    assert (empty["raw"], empty["key"]) == (None, None)
    assert "raw_encoding" not in empty


def test_dlq_to_error_carries_coordinates() -> None:
    error = DlqRecord("bad_k", "k must be 1..5", "rq", 2, 9, b"{}", b"k").to_error()
    assert (error.reason, error.topic, error.partition, error.offset, error.key) == (
        "bad_k",
        "rq",
        2,
        9,
        b"k",
    )
    assert str(error) == "bad_k: k must be 1..5 (rq[2]@9 key=b'k')"


# ---------------------------------------------------------------- catalog


def _catalog(raw: bytes | None, key: bytes | None = b"i1", dims: int | None = 3) -> Any:
    return parse_catalog_record(
        raw, config=CFG, topic="cat", partition=0, offset=1, key=key, dims=dims
    )


def test_catalog_valid_records() -> None:
    assert _catalog(_json(item_id="i1", vector=[1, 2.5, -3])) == CatalogRecord(
        "i1", (1.0, 2.5, -3.0), None, False
    )
    assert _catalog(_json(item_id="i1", features={"price": 9.5, "age": None, "n": 2})) == (
        CatalogRecord("i1", None, {"price": 9.5, "age": None, "n": 2.0}, False)
    )
    assert _catalog(_json(item_id="i1", vector=[1, 2, 3, 4]), dims=None).vector == (
        1.0,
        2.0,
        3.0,
        4.0,
    )
    assert _catalog(_json(item_id="i1")) == CatalogRecord("i1", None, None, False)


def test_catalog_deletions() -> None:
    assert _catalog(None, key=b"i7") == CatalogRecord("i7", None, None, True)
    assert _catalog(_json(item_id="i2", deleted=True, vector="junk")) == CatalogRecord(
        "i2", None, None, True
    )


@pytest.mark.parametrize(
    ("reason", "raw", "key"),
    [
        ("empty_payload", None, None),
        ("not_utf8", None, b"\xff"),
        ("id_too_long", None, b"i123456789"),
        ("missing_field", _json(vector=[1, 2, 3]), b"i1"),
        ("wrong_type", _json(item_id="i1", deleted="yes"), b"i1"),
        ("bad_vector", _json(item_id="i1", vector=[1, 2]), b"i1"),
        ("bad_vector", _json(item_id="i1", vector=[]), b"i1"),
        ("bad_vector", _json(item_id="i1", vector=[1, "2", 3]), b"i1"),
        ("bad_vector", _json(item_id="i1", vector=[1, True, 3]), b"i1"),
        ("bad_vector", _json(item_id="i1", vector={"a": 1}), b"i1"),
        ("non_finite_number", b'{"item_id":"i1","vector":[1,NaN,3]}', b"i1"),
        ("non_finite_number", b'{"item_id":"i1","vector":[1,1e999,3]}', b"i1"),
        ("non_finite_number", b'{"item_id":"i1","features":{"p":-Infinity}}', b"i1"),
        ("bad_features", _json(item_id="i1", features={"colour": "red"}), b"i1"),
        ("bad_features", _json(item_id="i1", features=[1, 2]), b"i1"),
        ("bad_features", _json(item_id="i1", features={"flag": True}), b"i1"),
    ],
)
def test_catalog_bad_reason(reason: str, raw: bytes | None, key: bytes | None) -> None:
    result = _catalog(raw, key=key)
    assert isinstance(result, DlqRecord)
    assert result.reason == reason, result.error
    assert reason in DLQ_REASONS


def test_catalog_dims_mismatch_message_names_dims() -> None:
    result = _catalog(_json(item_id="i1", vector=[1.0] * 5))
    assert isinstance(result, DlqRecord)
    assert result.error == "vector has 5 numbers; expected model.dims = 3"


# ---------------------------------------------------------------- requests


def _request(raw: bytes | None, max_k: int = 50) -> Any:
    return parse_request(raw, config=CFG, topic="rq", partition=1, offset=8, key=None, max_k=max_k)


def test_request_valid() -> None:
    assert _request(_json(request_id="r1", user_id="u1", k=5)) == Request("r1", "u1", None, 5)
    assert _request(_json(item_id="i3")) == Request("rq-1-8", None, "i3", None)
    assert _request(_json(request_id="r", user_id="u", k=50)).k == 50


@pytest.mark.parametrize(
    ("reason", "raw"),
    [
        ("missing_field", _json(request_id="r1")),
        ("missing_field", _json(request_id="r1", user_id=None, item_id=None)),
        ("conflicting_fields", _json(request_id="r1", user_id="u", item_id="i")),
        ("bad_k", _json(user_id="u", k=0)),
        ("bad_k", _json(user_id="u", k=51)),
        ("bad_k", _json(user_id="u", k=2.0)),
        ("bad_k", _json(user_id="u", k="5")),
        ("bad_k", _json(user_id="u", k=True)),
        ("empty_id", _json(request_id="", user_id="u")),
        ("wrong_type", _json(user_id={"id": 1})),
        ("not_object", b"[]"),
        ("not_json", b"{"),
        ("empty_payload", None),
    ],
)
def test_request_bad_reason(reason: str, raw: bytes | None) -> None:
    result = _request(raw)
    assert isinstance(result, DlqRecord)
    assert result.reason == reason, result.error
    assert reason in DLQ_REASONS
