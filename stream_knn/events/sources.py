"""Read user events from files in time order, for ``stream-knn produce --file`` and evaluation.

Formats (``detect_format`` guesses from the first line):

- ``movielens``: MovieLens 100K ``u.data``, ``user item rating timestamp`` separated by
  tabs (or spaces), no header; timestamps in epoch seconds.
- ``ratings-csv``: MovieLens ``ratings.csv``, header ``userId,movieId,rating,timestamp``
  (seconds).
- ``csv``: a header with ``user_id,item_id`` and optionally ``event_type`` (default
  ``view``, or ``rating`` when the row has a rating), ``ts``, ``weight``, ``rating``;
  empty cells mean missing.
- ``jsonl``: one user-event object per line, validated by the same rules as the topic
  (:func:`stream_knn.events.schema.parse_user_event`).

``ts`` follows the topic rule (numbers below 1e11 are epoch seconds, else milliseconds);
without a ``ts`` an event's time is its 0-based row number in milliseconds, which keeps
file order. Ratings become ``rating`` events with ``rating`` set and no explicit weight.
``forget`` records are not accepted in files (they have no item to replay).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from stream_knn.config import EventsConfig
from stream_knn.errors import DataFormatError
from stream_knn.events.schema import (
    EVENT_TYPES,
    MAX_RATING,
    SECONDS_BELOW,
    DlqRecord,
    parse_user_event,
)

__all__ = ["FORMATS", "FileFormat", "RawEvent", "detect_format", "read_events", "to_event_dict"]

FileFormat = Literal["movielens", "ratings-csv", "csv", "jsonl"]
#: Accepted values of ``--format``.
FORMATS: tuple[str, ...] = get_args(FileFormat)

_CSV_OPTIONAL = ("event_type", "ts", "weight", "rating")


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One event read from a file: ids as text, time in epoch milliseconds."""

    user_id: str
    item_id: str
    event_type: str
    ts_ms: int
    weight: float | None = None
    rating: float | None = None


def detect_format(path: str | Path) -> FileFormat:
    """Guess the format of an event file from its first non-empty line.

    Raises
    ------
    DataFormatError
        The file is missing, empty, or looks like none of :data:`FORMATS`.
    """
    path = Path(path)
    first = ""
    for line in _lines(path):
        if line[1].strip():
            first = line[1].strip()
            break
    if not first:
        raise DataFormatError(f"{path}: the file is empty; expected events")
    if first.startswith("{"):
        return "jsonl"
    header = {name.strip() for name in first.split(",")}
    if {"userId", "movieId", "rating", "timestamp"} <= header:
        return "ratings-csv"
    if {"user_id", "item_id"} <= header:
        return "csv"
    fields = first.split()
    if len(fields) == 4 and all(_is_number(f) for f in fields):
        return "movielens"
    raise DataFormatError(
        f"{path}:1: cannot tell the file format from the first line {first[:80]!r}; "
        f"pass --format, one of: {', '.join(FORMATS)}"
    )


def read_events(path: str | Path, fmt: FileFormat | None = None) -> list[RawEvent]:
    """Read every event of ``path``, sorted by time (ties keep file order).

    Parameters
    ----------
    path : str or Path
        The event file.
    fmt : {"movielens", "ratings-csv", "csv", "jsonl"} or None
        The format; ``None`` detects it with :func:`detect_format`.

    Returns
    -------
    list of RawEvent
        Stably sorted by ``ts_ms``.

    Raises
    ------
    DataFormatError
        Unknown format, missing columns, a bad value (the message names file and line),
        or a file without events.
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    if fmt == "movielens":
        events = list(_read_movielens(path))
    elif fmt == "ratings-csv":
        events = list(_read_ratings_csv(path))
    elif fmt == "csv":
        events = list(_read_csv(path))
    elif fmt == "jsonl":
        events = list(_read_jsonl(path))
    else:
        raise DataFormatError(
            f"{path}: unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}"
        )
    if not events:
        raise DataFormatError(f"{path}: the file holds no events")
    events.sort(key=_ts)  # list.sort is stable: equal times keep file order
    return events


def to_event_dict(event: RawEvent) -> dict[str, Any]:
    """The ``user-events`` JSON object for ``event`` (``weight``/``rating`` only when set)."""
    value: dict[str, Any] = {
        "user_id": event.user_id,
        "item_id": event.item_id,
        "event_type": event.event_type,
        "ts": event.ts_ms,
    }
    if event.weight is not None:
        value["weight"] = event.weight
    if event.rating is not None:
        value["rating"] = event.rating
    return value


def _ts(event: RawEvent) -> int:
    return event.ts_ms


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) with file errors turned into DataFormatError."""
    try:
        # Binary, decoded line by line, so a decoding error names its own line.
        with path.open("rb") as fh:
            for number, data in enumerate(fh, start=1):
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataFormatError(f"{path}:{number}: not valid UTF-8 text") from None
                yield number, text.rstrip("\r\n") + "\n" if data.endswith(b"\n") else text
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: is a directory, expected an event file") from None


def _number(path: Path, line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(
            f"{path}:{line}: {name} {text.strip()[:40]!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataFormatError(f"{path}:{line}: {name} {text.strip()!r} is not a finite number")
    return value


def _time_ms(path: Path, line: int, text: str, *, seconds: bool) -> int:
    value = _number(path, line, "timestamp", text)
    if value < 0:
        raise DataFormatError(f"{path}:{line}: timestamp {text.strip()!r} is negative")
    if seconds or value < SECONDS_BELOW:
        return int(value * 1000)
    return int(value)


def _rating(path: Path, line: int, text: str) -> float:
    value = _number(path, line, "rating", text)
    if not 0.0 <= value <= MAX_RATING:
        raise DataFormatError(f"{path}:{line}: rating {value:g} is outside 0..{MAX_RATING:g}")
    return value


def _id(path: Path, line: int, name: str, text: str) -> str:
    value = text.strip()
    if not value:
        raise DataFormatError(f"{path}:{line}: {name} is empty")
    return value


def _read_movielens(path: Path) -> Iterator[RawEvent]:
    for line, text in _lines(path):
        if not text.strip():
            continue
        fields = text.split()
        if len(fields) != 4:
            raise DataFormatError(
                f"{path}:{line}: expected 4 fields 'user item rating timestamp', got {len(fields)}"
            )
        yield RawEvent(
            fields[0],
            fields[1],
            "rating",
            _time_ms(path, line, fields[3], seconds=True),
            None,
            _rating(path, line, fields[2]),
        )


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header, as (line number, {column: text})."""
    lines = _lines(path)
    reader = csv.reader(text for _, text in lines)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise DataFormatError(f"{path}: the file is empty; expected a header line") from None
    missing = [name for name in required if name not in header]
    if missing:
        raise DataFormatError(
            f"{path}:1: header lacks column(s) {', '.join(missing)}; it has {', '.join(header)}"
        )
    for row in reader:
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(
                f"{path}:{line}: {len(row)} fields, but the header has {len(header)}"
            )
        yield line, dict(zip(header, row, strict=True))


def _read_ratings_csv(path: Path) -> Iterator[RawEvent]:
    for line, row in _csv_rows(path, ("userId", "movieId", "rating", "timestamp")):
        yield RawEvent(
            _id(path, line, "userId", row["userId"]),
            _id(path, line, "movieId", row["movieId"]),
            "rating",
            _time_ms(path, line, row["timestamp"], seconds=True),
            None,
            _rating(path, line, row["rating"]),
        )


def _read_csv(path: Path) -> Iterator[RawEvent]:
    for index, (line, row) in enumerate(_csv_rows(path, ("user_id", "item_id"))):
        cells = {name: (row.get(name) or "").strip() for name in _CSV_OPTIONAL}
        rating = _rating(path, line, cells["rating"]) if cells["rating"] else None
        event_type = cells["event_type"] or ("rating" if rating is not None else "view")
        if event_type not in EVENT_TYPES or event_type == "forget":
            raise DataFormatError(
                f"{path}:{line}: event_type {event_type[:40]!r} is not one of "
                f"{', '.join(sorted(EVENT_TYPES - {'forget'}))}"
            )
        if event_type == "rating" and rating is None:
            raise DataFormatError(f"{path}:{line}: rating events need a rating")
        weight = _number(path, line, "weight", cells["weight"]) if cells["weight"] else None
        if weight is not None and weight < 0:
            raise DataFormatError(f"{path}:{line}: weight {weight:g} is negative")
        ts_ms = _time_ms(path, line, cells["ts"], seconds=False) if cells["ts"] else index
        yield RawEvent(
            _id(path, line, "user_id", row["user_id"]),
            _id(path, line, "item_id", row["item_id"]),
            event_type,
            ts_ms,
            weight,
            rating,
        )


def _read_jsonl(path: Path) -> Iterator[RawEvent]:
    index = 0
    for line, text in _lines(path):
        raw = text.strip().encode("utf-8")
        if not raw:
            continue
        # The topic's own parser, so a file is valid exactly when its records would be;
        # the payload limit is the topic's concern, not the file's.
        parsed = parse_user_event(
            raw,
            config=EventsConfig(max_payload_bytes=max(len(raw), 64)),
            topic=str(path),
            partition=0,
            offset=line,
            key=None,
            broker_ts_ms=index,
        )
        index += 1
        if isinstance(parsed, DlqRecord):
            raise DataFormatError(f"{path}:{line}: {parsed.reason}: {parsed.error}")
        if parsed.item_id is None:
            raise DataFormatError(f"{path}:{line}: forget records cannot be replayed from files")
        explicit_weight = orjson.loads(raw).get("weight") is not None
        yield RawEvent(
            parsed.user_id,
            parsed.item_id,
            parsed.event_type,
            parsed.ts_ms,
            parsed.weight if explicit_weight else None,
            parsed.rating,
        )
