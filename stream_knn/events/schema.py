"""Parse raw Kafka values into typed records, or into a DLQ record that says why not.

Bad input is a value, never a crash: every ``parse_*`` function returns either the typed
record or a :class:`DlqRecord` whose ``reason`` is one of :data:`DLQ_REASONS` (a bounded
set, safe as a metric label). Checks run in a fixed order: payload size, then JSON, then the
fields in the order they are listed below; the first failure decides the reason.

User events (topic ``user-events``), a JSON object:

- ``user_id`` (required) and ``item_id`` (required except for ``forget``): strings of at
  most ``events.max_id_length`` characters, not empty nor only whitespace (``empty_id``),
  without control characters (U+0000-U+001F, U+007F-U+009F: ``bad_id``; they would reach
  log lines, terminals and HTTP paths); JSON integers are accepted and become their
  decimal text, so ``42`` and ``"42"`` are the same id.
- ``event_type`` (required): one of :data:`EVENT_TYPES`. ``forget`` is the user-forget record:
  it deletes the user's profile and needs no ``item_id`` (one given is ignored).
- ``ts`` (optional): epoch time as a number or a numeric string. Values below
  :data:`SECONDS_BELOW` (1e11, i.e. 1973 in milliseconds or year 5138 in seconds) are read
  as epoch *seconds* and multiplied by 1000, larger ones as epoch *milliseconds*; fractions
  of a millisecond are dropped. Missing or ``null``: the broker timestamp of the record.
- ``weight`` (optional): a finite number in ``0..``:data:`MAX_WEIGHT` (1e6). Missing:
  ``rating_weight_base + rating_weight_scale * rating`` for ``rating`` events,
  ``events.weight_of(type)`` for the other types, ``0.0`` for ``forget``.
- ``rating``: required for ``rating`` events, optional otherwise; a finite number in
  ``0..``:data:`MAX_RATING` (10, which covers 5-star and 10-point scales).
- ``event_id`` (optional): an id as above; missing: ``"{topic}-{partition}-{offset}"``, which
  is unique and stable across redeliveries of the same record.
- ``context`` (optional): a JSON object, passed through untouched.

Unknown fields are ignored so producers can add fields before consumers know them. A key
given twice in one object counts with its last value (as JavaScript's ``JSON.parse``).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from stream_knn.config import EventsConfig
from stream_knn.errors import EventError

__all__ = [
    "DLQ_REASONS",
    "DLQ_TRUNCATED_BYTES",
    "EVENT_TYPES",
    "MAX_FEATURES",
    "MAX_RATING",
    "MAX_WEIGHT",
    "SECONDS_BELOW",
    "CatalogRecord",
    "DlqRecord",
    "Request",
    "UserEvent",
    "id_problem",
    "parse_catalog_record",
    "parse_request",
    "parse_user_event",
]

#: Event types of the ``user-events`` topic; ``forget`` deletes the user's profile.
EVENT_TYPES: frozenset[str] = frozenset(
    {"view", "click", "add_to_cart", "purchase", "rating", "forget"}
)
#: Numeric timestamps below this are epoch seconds, at or above it epoch milliseconds.
SECONDS_BELOW = 100_000_000_000
#: Largest accepted ``rating``.
MAX_RATING = 10.0
#: Largest accepted ``weight``: a million times a purchase is a unit mistake, and weights
#: near float32's range would turn item vectors into infinities.
MAX_WEIGHT = 1e6
#: Most feature names in one catalog record.
MAX_FEATURES = 256
#: Bytes of a bad value a dead letter keeps with ``events.dlq_raw = "truncated"``.
DLQ_TRUNCATED_BYTES = 256
# Year 10000 in epoch milliseconds: anything later is a unit mistake, not a real time.
_MAX_TS_MS = 253_402_300_800_000

#: Every reason a record can be sent to the DLQ for (the ``reason`` metric label).
DLQ_REASONS: tuple[str, ...] = (
    "payload_too_large",  # value longer than events.max_payload_bytes
    "empty_payload",  # value missing (null/tombstone where one is not allowed) or zero bytes
    "not_utf8",  # value (or a tombstone key) is not valid UTF-8
    "non_finite_number",  # NaN / Infinity literal, a number that overflows (1e400), "nan"
    "not_json",  # any other JSON syntax error
    "not_object",  # valid JSON but not an object
    "missing_field",  # a required field is missing or null
    "wrong_type",  # a field has the wrong JSON type
    "empty_id",  # an id is the empty string
    "id_too_long",  # an id is longer than events.max_id_length
    "bad_id",  # an id holds a control character
    "unknown_event_type",  # event_type not in EVENT_TYPES
    "bad_timestamp",  # ts negative, after year 9999, or a string that is not a number
    "bad_weight",  # weight negative or above MAX_WEIGHT
    "bad_rating",  # rating outside 0..MAX_RATING
    "bad_vector",  # catalog vector empty, not all numbers, or of the wrong length
    "bad_features",  # catalog features not an object of numbers or nulls, too many names
    "bad_k",  # request k not an integer in 1..max_k
    "conflicting_fields",  # a request names both user_id and item_id
)

# orjson rejects these literals with a generic syntax error; we name them precisely.
_NON_FINITE_TOKEN = re.compile(rb"(?<![\w\"])-?(?:NaN|Infinity)(?![\w\"])")
#: C0 controls, DEL and C1 controls: no id may hold one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class UserEvent:
    """A validated user event; ``item_id`` is ``None`` only for ``forget``.

    ``user_id`` is the id state is kept under: the pseudonym of the id the producer sent
    when ``privacy.pseudonymise_user_ids`` is on, and then ``sent_user_id`` holds the id
    as sent (lists go out under :attr:`output_user_id`); otherwise ``sent_user_id`` is
    None.
    """

    user_id: str
    item_id: str | None
    event_type: str
    ts_ms: int
    weight: float
    event_id: str
    rating: float | None
    context: dict[str, Any] | None
    sent_user_id: str | None = None

    @property
    def output_user_id(self) -> str:
        """The user id as the producer sent it."""
        return self.user_id if self.sent_user_id is None else self.sent_user_id


@dataclass(frozen=True, slots=True)
class CatalogRecord:
    """A validated item-catalog record; ``deleted`` records carry no vector or features."""

    item_id: str
    vector: tuple[float, ...] | None
    features: dict[str, float | None] | None
    deleted: bool


@dataclass(frozen=True, slots=True)
class Request:
    """An on-demand recommendation request for exactly one of a user or an item."""

    request_id: str
    user_id: str | None
    item_id: str | None
    k: int | None


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """A record that could not be used, with where it came from and why."""

    reason: str
    error: str
    topic: str
    partition: int
    offset: int
    raw: bytes | None
    key: bytes | None

    def to_value(self, raw: str = "full") -> bytes:
        """The DLQ topic value: ``{error, reason, topic, partition, offset, raw, key}``.

        ``raw`` and ``key`` are UTF-8 text when they decode, otherwise base64 with
        ``raw_encoding`` / ``key_encoding`` set to ``"base64"``. The ``raw`` argument is
        ``events.dlq_raw``: ``"truncated"`` keeps the value's first
        :data:`DLQ_TRUNCATED_BYTES` bytes (at a character boundary) and ``"none"``
        nothing; both add ``raw_bytes``, the value's length, and ``raw_truncated``. A
        ``payload_too_large`` value is always truncated: whole, the dead letter could
        exceed what the DLQ topic takes, and the worker would retry it forever.
        """
        value: dict[str, Any] = {
            "error": self.error,
            "reason": self.reason,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }
        kept = self.raw
        if self.reason == "payload_too_large" and raw == "full":
            raw = "truncated"  # refused for its size: whole, it may not fit the DLQ topic
        if raw != "full" and kept is not None:
            value["raw_bytes"] = len(kept)
            kept = None if raw == "none" else _truncated(kept, DLQ_TRUNCATED_BYTES)
            value["raw_truncated"] = kept is None or len(kept) < len(self.raw or b"")
        _put_bytes(value, "raw", kept)
        _put_bytes(value, "key", self.key)
        return orjson.dumps(value)

    def to_error(self) -> EventError:
        """The same facts as an exception, for callers that must stop on bad input."""
        return EventError(
            self.reason,
            self.error,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
        )


def _truncated(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of ``data``, less a UTF-8 character cut in two."""
    if len(data) <= limit:
        return data
    head = data[:limit]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= limit - 3 and exc.reason == "unexpected end of data":
            return head[: exc.start]
    return head


def _put_bytes(value: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None:
        value[name] = None
        return
    try:
        value[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        value[name] = base64.b64encode(data).decode("ascii")
        value[f"{name}_encoding"] = "base64"


class _Reject(Exception):  # noqa: N818 - internal control flow, never escapes this module
    """Raised by the field checks; turned into a DlqRecord by the parse functions."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def _load(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Size, then JSON, then object: the first checks every topic shares."""
    if raw is None or not raw:
        raise _Reject("empty_payload", "the record has no value")
    if len(raw) > max_bytes:
        raise _Reject(
            "payload_too_large",
            f"value is {len(raw)} bytes; the limit is events.max_payload_bytes = {max_bytes}",
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" in exc.msg or _NON_FINITE_TOKEN.search(raw):
            raise _Reject(
                "non_finite_number", f"JSON holds NaN, Infinity or an overflowing number: {exc}"
            ) from None
        if "UTF-8" in exc.msg:
            raise _Reject("not_utf8", f"value is not valid UTF-8: {exc}") from None
        raise _Reject("not_json", f"value is not valid JSON: {exc}") from None
    if type(data) is not dict:
        raise _Reject("not_object", f"value must be a JSON object, got {type(data).__name__}")
    return data


def id_problem(value: str, name: str, max_length: int) -> tuple[str, str] | None:
    """Why ``value`` cannot be an id (``(reason, message)``), or None when it can: the one
    rule for ids in records and in HTTP paths.

    Examples
    --------
    >>> id_problem("u1", "user_id", 256) is None
    True
    >>> id_problem("   ", "item_id", 256)
    ('empty_id', 'item_id is blank')
    >>> id_problem("a\x1b[2J", "user_id", 256)
    ('bad_id', 'user_id holds a control character (U+001B at 1)')
    """
    if not value:
        return "empty_id", f"{name} is empty"
    if len(value) > max_length:
        return (
            "id_too_long",
            f"{name} has {len(value)} characters; the limit is events.max_id_length = {max_length}",
        )
    if value.isspace():
        return "empty_id", f"{name} is blank"
    if value.isascii() and value.isprintable():
        return None  # the common case, C loops only
    found = _CONTROL.search(value)
    if found is not None:
        return (
            "bad_id",
            f"{name} holds a control character (U+{ord(found.group()):04X} at {found.start()})",
        )
    return None


def _id(value: Any, name: str, max_length: int) -> str:
    if type(value) is str:
        problem = id_problem(value, name, max_length)
        if problem is not None:
            raise _Reject(*problem)
        return value
    if value is None:
        raise _Reject("missing_field", f"{name} is missing")
    if type(value) is int:
        return _id(str(value), name, max_length)
    raise _Reject("wrong_type", f"{name} must be a string, got {type(value).__name__}")


def _number(value: Any, name: str) -> float:
    if type(value) is float:
        # orjson never yields inf/nan from JSON, but callers may pass Python objects.
        if not math.isfinite(value):
            raise _Reject("non_finite_number", f"{name} is {value}")
        return value
    if type(value) is int:
        return float(value)
    raise _Reject("wrong_type", f"{name} must be a number, got {type(value).__name__}")


def _timestamp(value: Any) -> int:
    if type(value) is str:
        try:
            number: float = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise _Reject("bad_timestamp", f"ts {value!r} is not a number") from None
        if not math.isfinite(number):
            raise _Reject("non_finite_number", f"ts is {value!r}")
    elif type(value) is int or type(value) is float:
        number = value
        if not math.isfinite(number):
            raise _Reject("non_finite_number", f"ts is {value}")
    else:
        raise _Reject(
            "wrong_type", f"ts must be epoch milliseconds (a number), got {type(value).__name__}"
        )
    if number < 0:
        raise _Reject("bad_timestamp", f"ts {value!r} is negative")
    ts_ms = int(number * 1000) if number < SECONDS_BELOW else int(number)
    if ts_ms >= _MAX_TS_MS:
        raise _Reject("bad_timestamp", f"ts {value!r} is after the year 9999")
    return ts_ms


def _rating(value: Any) -> float:
    rating = _number(value, "rating")
    if not 0.0 <= rating <= MAX_RATING:
        raise _Reject("bad_rating", f"rating {rating} is outside 0..{MAX_RATING:g}")
    return rating


def parse_user_event(
    raw: bytes | None,
    *,
    config: EventsConfig,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    broker_ts_ms: int,
    pseudonym: Callable[[str], str] | None = None,
) -> UserEvent | DlqRecord:
    """Parse one ``user-events`` value (the rules are in the module docstring).

    Parameters
    ----------
    raw : bytes or None
        The Kafka record value.
    config : EventsConfig
        Limits and default weights.
    topic, partition, offset, key : str, int, int, bytes or None
        The record's coordinates, for the default ``event_id`` and the DLQ record.
    broker_ts_ms : int
        The record's broker timestamp, used when the event has no ``ts``.
    pseudonym : callable or None
        Maps the user id to the id state is kept under (``privacy.pseudonymise_user_ids``);
        the event then carries both (:attr:`UserEvent.sent_user_id`).

    Returns
    -------
    UserEvent or DlqRecord
        The event, or the reason it cannot be used.

    Examples
    --------
    >>> e = parse_user_event(b'{"user_id":"u1","item_id":"i9","event_type":"click"}',
    ...     config=EventsConfig(), topic="user-events", partition=0, offset=7, key=b"u1",
    ...     broker_ts_ms=1_700_000_000_000)
    >>> (e.weight, e.ts_ms, e.event_id)
    (2.0, 1700000000000, 'user-events-0-7')
    """
    try:
        data = _load(raw, config.max_payload_bytes)
        max_length = config.max_id_length
        user_id = _id(data.get("user_id"), "user_id", max_length)
        event_type = data.get("event_type")
        if type(event_type) is not str:
            if event_type is None:
                raise _Reject("missing_field", "event_type is missing")
            raise _Reject(
                "wrong_type", f"event_type must be a string, got {type(event_type).__name__}"
            )
        if event_type not in EVENT_TYPES:
            raise _Reject(
                "unknown_event_type",
                f"event_type {event_type[:64]!r} is not one of {', '.join(sorted(EVENT_TYPES))}",
            )
        forget = event_type == "forget"
        item_id = None if forget else _id(data.get("item_id"), "item_id", max_length)
        value = data.get("ts")
        ts_ms = broker_ts_ms if value is None else _timestamp(value)
        value = data.get("rating")
        rating = None if value is None else _rating(value)
        if event_type == "rating" and rating is None:
            raise _Reject("missing_field", "rating is missing; rating events need one")
        value = data.get("weight")
        if value is not None:
            weight = _number(value, "weight")
            if not 0.0 <= weight <= MAX_WEIGHT:
                raise _Reject("bad_weight", f"weight {weight} is outside 0..{MAX_WEIGHT:g}")
        elif forget:
            weight = 0.0
        elif rating is not None and event_type == "rating":
            weight = config.rating_weight_base + config.rating_weight_scale * rating
        else:
            weight = config.weight_of(event_type)
        value = data.get("event_id")
        event_id = (
            f"{topic}-{partition}-{offset}" if value is None else _id(value, "event_id", max_length)
        )
        context = data.get("context")
        if context is not None and type(context) is not dict:
            raise _Reject(
                "wrong_type", f"context must be a JSON object, got {type(context).__name__}"
            )
    except _Reject as exc:
        return DlqRecord(exc.reason, exc.error, topic, partition, offset, raw, key)
    if pseudonym is not None:
        return UserEvent(
            pseudonym(user_id),
            item_id,
            event_type,
            ts_ms,
            weight,
            event_id,
            rating,
            context,
            user_id,
        )
    return UserEvent(user_id, item_id, event_type, ts_ms, weight, event_id, rating, context)


def parse_catalog_record(
    raw: bytes | None,
    *,
    config: EventsConfig,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    dims: int | None,
) -> CatalogRecord | DlqRecord:
    """Parse one ``item-catalog`` value: ``{item_id, vector?, features?, deleted?}``.

    A tombstone (value ``None``) with a key deletes the item named by the key, as does
    ``"deleted": true`` (its vector and features are then ignored). ``vector`` must be a
    non-empty list of finite numbers of length ``dims`` (any length when ``dims`` is
    ``None``); ``features`` an object mapping at most :data:`MAX_FEATURES` names (each of
    1..``events.max_id_length`` characters) to finite numbers or ``null`` (missing).

    Returns
    -------
    CatalogRecord or DlqRecord
        The record, or the reason it cannot be used.
    """
    try:
        if raw is None and key:
            try:
                item_id = _id(key.decode("utf-8"), "key", config.max_id_length)
            except UnicodeDecodeError:
                raise _Reject("not_utf8", "tombstone key is not valid UTF-8") from None
            return CatalogRecord(item_id, None, None, True)
        data = _load(raw, config.max_payload_bytes)
        item_id = _id(data.get("item_id"), "item_id", config.max_id_length)
        deleted = data.get("deleted", False)
        if deleted is None:
            deleted = False
        if type(deleted) is not bool:
            raise _Reject("wrong_type", f"deleted must be true or false, got {deleted!r:.40}")
        if deleted:
            return CatalogRecord(item_id, None, None, True)
        vector = _vector(data.get("vector"), dims)
        features = _features(data.get("features"), config.max_id_length)
    except _Reject as exc:
        return DlqRecord(exc.reason, exc.error, topic, partition, offset, raw, key)
    return CatalogRecord(item_id, vector, features, False)


def _vector(value: Any, dims: int | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    if type(value) is not list:
        raise _Reject("bad_vector", f"vector must be a list of numbers, got {type(value).__name__}")
    if not value:
        raise _Reject("bad_vector", "vector is empty")
    if dims is not None and len(value) != dims:
        raise _Reject(
            "bad_vector", f"vector has {len(value)} numbers; expected model.dims = {dims}"
        )
    out: list[float] = []
    for i, x in enumerate(value):
        kind = type(x)
        if kind is float:
            if not math.isfinite(x):
                raise _Reject("non_finite_number", f"vector[{i}] is {x}")
            out.append(x)
        elif kind is int:
            out.append(float(x))
        else:
            raise _Reject("bad_vector", f"vector[{i}] is not a number: {x!r:.40}")
    return tuple(out)


def _features(value: Any, max_name_length: int) -> dict[str, float | None] | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise _Reject(
            "bad_features", f"features must be an object of numbers, got {type(value).__name__}"
        )
    if len(value) > MAX_FEATURES:
        raise _Reject(
            "bad_features", f"features has {len(value)} names; the limit is {MAX_FEATURES}"
        )
    out: dict[str, float | None] = {}
    for name, x in value.items():
        if not name or len(name) > max_name_length:
            raise _Reject(
                "bad_features",
                f"feature name {name!r:.40} is empty or longer than events.max_id_length "
                f"= {max_name_length}",
            )
        kind = type(x)
        if x is None:
            out[name] = None
        elif kind is float:
            if not math.isfinite(x):
                raise _Reject("non_finite_number", f"features[{name!r:.40}] is {x}")
            out[name] = x
        elif kind is int:
            out[name] = float(x)
        else:
            raise _Reject(
                "bad_features", f"features[{name!r:.40}] is not a number or null: {x!r:.40}"
            )
    return out


def parse_request(
    raw: bytes | None,
    *,
    config: EventsConfig,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    max_k: int,
) -> Request | DlqRecord:
    """Parse one ``recommendation-requests`` value: ``{request_id?, user_id?, item_id?, k?}``.

    Exactly one of ``user_id`` and ``item_id``; ``k`` an integer in ``1..max_k`` (missing:
    the serving default, decided by the caller); a missing ``request_id`` becomes
    ``"{topic}-{partition}-{offset}"``.

    Returns
    -------
    Request or DlqRecord
        The request, or the reason it cannot be answered.
    """
    try:
        data = _load(raw, config.max_payload_bytes)
        max_length = config.max_id_length
        value = data.get("request_id")
        request_id = (
            f"{topic}-{partition}-{offset}"
            if value is None
            else _id(value, "request_id", max_length)
        )
        user_value, item_value = data.get("user_id"), data.get("item_id")
        if user_value is not None and item_value is not None:
            raise _Reject("conflicting_fields", "give user_id or item_id, not both")
        if user_value is None and item_value is None:
            raise _Reject("missing_field", "user_id or item_id is missing; give exactly one")
        user_id = None if user_value is None else _id(user_value, "user_id", max_length)
        item_id = None if item_value is None else _id(item_value, "item_id", max_length)
        k = data.get("k")
        if k is not None and (type(k) is not int or not 1 <= k <= max_k):
            raise _Reject("bad_k", f"k must be an integer in 1..{max_k}, got {k!r:.40}")
    except _Reject as exc:
        return DlqRecord(exc.reason, exc.error, topic, partition, offset, raw, key)
    return Request(request_id, user_id, item_id, k)
