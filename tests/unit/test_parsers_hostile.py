"""Property tests of the input parsers over hostile input (hypothesis): arbitrary bytes,
arbitrary JSON (NaN and Infinity literals, integers past 64 bits, deep nesting, duplicate
keys, lone surrogates, control characters), and almost-valid records with one field
wrong. A parser never raises: it returns a record that keeps every rule, or a dead letter
with a known reason that serialises in every ``events.dlq_raw`` mode."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream_knn.config import EventsConfig
from stream_knn.events.pseudonym import Pseudonymiser
from stream_knn.events.schema import (
    DLQ_REASONS,
    DLQ_TRUNCATED_BYTES,
    EVENT_TYPES,
    MAX_FEATURES,
    MAX_RATING,
    MAX_WEIGHT,
    CatalogRecord,
    DlqRecord,
    Request,
    UserEvent,
    id_problem,
    parse_catalog_record,
    parse_request,
    parse_user_event,
)

CFG = EventsConfig(max_id_length=16, max_payload_bytes=4096)
MAX_K = 50
FIELDS = (
    "user_id",
    "item_id",
    "event_type",
    "ts",
    "weight",
    "rating",
    "event_id",
    "context",
    "vector",
    "features",
    "deleted",
    "request_id",
    "k",
)
PROFILE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # past 64 bits too: json writes them, orjson reads them as floats
    | st.floats(allow_nan=True, allow_infinity=True)  # json writes NaN / Infinity literals
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.text(min_size=0, max_size=20) | st.integers(min_value=-(2**70), max_value=2**70)
event_types = st.sampled_from(sorted(EVENT_TYPES)) | st.text(max_size=12)
numbers = st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)


def _any(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually ``strategy``, sometimes any JSON value (a wrong type)."""
    return st.one_of(strategy, strategy, json_values)


#: Objects that are close to valid records: right field names, values mostly of the right
#: kind, any of them missing or replaced by any JSON value.
records = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _any(ids),
        "item_id": _any(ids),
        "event_type": _any(event_types),
        "ts": _any(numbers),
        "weight": _any(numbers),
        "rating": _any(numbers),
        "event_id": _any(ids),
        "context": json_values,
        "vector": _any(st.lists(numbers, max_size=6)),
        "features": _any(st.dictionaries(st.text(max_size=20), numbers | st.none(), max_size=5)),
        "deleted": _any(st.booleans()),
        "request_id": _any(ids),
        "k": _any(numbers),
    },
)


def _encode(value: Any, style: int) -> bytes:
    """JSON text of ``value`` in one of a few styles, NaN/Infinity literals included."""
    if style == 0:
        return json.dumps(value, allow_nan=True).encode()
    if style == 1:
        return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "replace")
    text = json.dumps(value, allow_nan=True)
    if style == 2 and text.startswith("{") and len(text) > 2:
        # A key given twice: the first copy of the first field, then everything again.
        return ("{" + text[1:-1].split(", ", 1)[0] + ", " + text[1:]).encode()
    return text[: max(1, len(text) // 2)].encode()  # truncated JSON


def _check_dead_letter(result: DlqRecord, raw: bytes | None) -> None:
    assert result.reason in DLQ_REASONS
    assert result.error
    assert result.raw == raw
    for mode in ("full", "truncated", "none"):
        value = orjson.loads(result.to_value(mode))
        assert value["reason"] == result.reason
        if mode == "none" and raw is not None:
            assert value["raw"] is None
            assert value["raw_bytes"] == len(raw)
        if mode == "truncated" and value["raw"] is not None:
            assert len(value["raw"].encode()) <= DLQ_TRUNCATED_BYTES * 2  # base64 grows 4/3


def _check_id(value: str | None, name: str) -> None:
    assert value is not None
    assert id_problem(value, name, CFG.max_id_length) is None


def _user_event(raw: bytes | None) -> UserEvent | DlqRecord:
    result = parse_user_event(
        raw, config=CFG, topic="ue", partition=0, offset=7, key=b"k", broker_ts_ms=1_700_000
    )
    if isinstance(result, DlqRecord):
        _check_dead_letter(result, raw)
        return result
    assert isinstance(result, UserEvent)
    _check_id(result.user_id, "user_id")
    _check_id(result.event_id, "event_id")
    assert result.event_type in EVENT_TYPES
    if result.event_type == "forget":
        assert result.item_id is None
    else:
        _check_id(result.item_id, "item_id")
    assert 0 <= result.ts_ms < 253_402_300_800_000
    assert math.isfinite(result.weight) and 0.0 <= result.weight <= MAX_WEIGHT
    assert result.rating is None or 0.0 <= result.rating <= MAX_RATING
    assert result.context is None or isinstance(result.context, dict)
    return result


def _catalog(raw: bytes | None, key: bytes | None = b"i1") -> CatalogRecord | DlqRecord:
    result = parse_catalog_record(
        raw, config=CFG, topic="ic", partition=1, offset=9, key=key, dims=4
    )
    if isinstance(result, DlqRecord):
        _check_dead_letter(result, raw)
        return result
    assert isinstance(result, CatalogRecord)
    _check_id(result.item_id, "item_id")
    if result.deleted:
        assert result.vector is None and result.features is None
    if result.vector is not None:
        assert len(result.vector) == 4 and all(math.isfinite(x) for x in result.vector)
    if result.features is not None:
        assert len(result.features) <= MAX_FEATURES
        for name, x in result.features.items():
            assert 1 <= len(name) <= CFG.max_id_length
            assert x is None or math.isfinite(x)
    return result


def _request(raw: bytes | None) -> Request | DlqRecord:
    result = parse_request(
        raw, config=CFG, topic="rq", partition=2, offset=3, key=None, max_k=MAX_K
    )
    if isinstance(result, DlqRecord):
        _check_dead_letter(result, raw)
        return result
    assert isinstance(result, Request)
    _check_id(result.request_id, "request_id")
    assert (result.user_id is None) != (result.item_id is None)
    _check_id(result.user_id or result.item_id, "id")
    assert result.k is None or 1 <= result.k <= MAX_K
    return result


@PROFILE
@given(st.binary(max_size=300))
@example(b"\xff\xfe\x00")
@example(b'{"user_id": "u", "item_id": "i", "event_type": "view", "ts": 1e400}')
@example(b'{"user_id": "u", "item_id": "i", "event_type": "view", "weight": NaN}')
@example(b'{"user_id": "u", "item_id": "i", "event_type": "view", "weight": -Infinity}')
@example(b'{"user_id": "u\\ud800", "item_id": "i", "event_type": "view"}')
@example(b"[" * 5000 + b"]" * 5000)
@example(b'{"context": ' + b"[" * 5000 + b"]" * 5000 + b"}")
def test_arbitrary_bytes(raw: bytes) -> None:
    _user_event(raw)
    _catalog(raw)
    _request(raw)


@PROFILE
@given(json_values, st.integers(0, 3))
def test_arbitrary_json(value: Any, style: int) -> None:
    raw = _encode(value, style)
    _user_event(raw)
    _catalog(raw)
    _request(raw)


@PROFILE
@given(records, st.integers(0, 3))
@example({"user_id": "   ", "item_id": "i", "event_type": "view"}, 0)
@example({"user_id": "u", "item_id": " \t ", "event_type": "view"}, 0)
@example({"user_id": "u\x1b[31m", "item_id": "i", "event_type": "view"}, 0)
@example({"user_id": "u", "item_id": "i", "event_type": "view", "ts": 2**80}, 0)
@example({"user_id": "u", "item_id": "i", "event_type": "view", "weight": 1e300}, 0)
@example({"item_id": "i", "features": {str(n): n for n in range(MAX_FEATURES + 1)}}, 0)
def test_almost_valid_records(value: dict[str, Any], style: int) -> None:
    raw = _encode(value, style)
    _user_event(raw)
    _catalog(raw)
    _request(raw)


@pytest.mark.parametrize("blank", ["   ", "\t", " \n ", "\u3000"])
def test_blank_ids_are_empty_ones(blank: str) -> None:
    """An id of only whitespace is refused like an empty one, in every parser."""
    event = _user_event(orjson.dumps({"user_id": "u", "item_id": blank, "event_type": "view"}))
    catalog = _catalog(orjson.dumps({"item_id": blank, "vector": [1, 2, 3, 4]}))
    request = _request(orjson.dumps({"user_id": blank}))
    for result in (event, catalog, request):
        assert isinstance(result, DlqRecord) and result.reason == "empty_id", result


@PROFILE
@given(st.none() | st.binary(max_size=64), st.binary(max_size=40) | st.none())
def test_catalog_tombstones_with_any_key(raw: bytes | None, key: bytes | None) -> None:
    _catalog(raw, key)


@PROFILE
@given(records)
def test_pseudonymised_events_keep_the_id_as_sent(value: dict[str, Any]) -> None:
    """With pseudonyms the event is the same but for ``user_id``: its pseudonym, and the
    id as sent in ``sent_user_id`` (what lists go out under)."""
    pseudonymiser = Pseudonymiser(b"k" * 32)
    raw = json.dumps(value).encode()
    plain = parse_user_event(
        raw, config=CFG, topic="ue", partition=0, offset=7, key=None, broker_ts_ms=1
    )
    hidden = parse_user_event(
        raw,
        config=CFG,
        topic="ue",
        partition=0,
        offset=7,
        key=None,
        broker_ts_ms=1,
        pseudonym=pseudonymiser.pseudonym,
    )
    if isinstance(plain, DlqRecord):
        assert hidden == plain
        return
    assert isinstance(hidden, UserEvent)
    assert hidden.sent_user_id == plain.user_id == hidden.output_user_id
    assert hidden.user_id == pseudonymiser.of_bytes(plain.user_id.encode())
    assert hidden.user_id.startswith("p-") and len(hidden.user_id) == 34
    assert plain.sent_user_id is None and plain.output_user_id == plain.user_id
