"""Event files: each format read in time order, and errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_knn.errors import DataFormatError
from stream_knn.events.sources import RawEvent, detect_format, read_events, to_event_dict


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- movielens u.data


def test_movielens_sorted_by_time_ties_in_file_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", "3\t30\t4\t200\n1\t10\t5\t100\n2\t20\t3\t200\n\n")
    assert detect_format(path) == "movielens"
    assert read_events(path) == [
        RawEvent("1", "10", "rating", 100_000, None, 5.0),
        RawEvent("3", "30", "rating", 200_000, None, 4.0),
        RawEvent("2", "20", "rating", 200_000, None, 3.0),
    ]


def test_movielens_errors_name_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", "1\t10\t5\t100\n1\t11\t5\n")
    with pytest.raises(DataFormatError, match=r"u\.data:2: expected 4 fields"):
        read_events(path, "movielens")
    path = _write(tmp_path, "u.data", "1\t10\t5\t100\n1\t11\t5\t100\n1\t12\t5\tnoon\n")
    with pytest.raises(DataFormatError, match=r"u\.data:3: timestamp 'noon' is not a number"):
        read_events(path, "movielens")
    path = _write(tmp_path, "u.data", "1\t10\t50\t100\n")
    with pytest.raises(DataFormatError, match=r"u\.data:1: rating 50 is outside 0\.\.10"):
        read_events(path, "movielens")


# ---------------------------------------------------------------- MovieLens ratings.csv


def test_ratings_csv(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n7,99,3.5,1500000001\n8,98,4.0,1500000000\n",
    )
    assert detect_format(path) == "ratings-csv"
    assert read_events(path) == [
        RawEvent("8", "98", "rating", 1_500_000_000_000, None, 4.0),
        RawEvent("7", "99", "rating", 1_500_000_001_000, None, 3.5),
    ]


def test_ratings_csv_missing_column_and_bad_row(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.csv", "userId,movieId,timestamp\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"r\.csv:1: header lacks column\(s\) rating"):
        read_events(path, "ratings-csv")
    path = _write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"r\.csv:3: 3 fields, but the header has 4"):
        read_events(path)


# ---------------------------------------------------------------- generic CSV


def test_generic_csv_all_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ev.csv",
        "user_id,item_id,event_type,ts,weight,rating\n"
        "u1,i1,click,1700000000500,,\n"
        "u2,i2,,1700000000000,,4\n"
        "u3,i3,purchase,1700000000,2.5,\n",
    )
    assert detect_format(path) == "csv"
    assert read_events(path) == [
        RawEvent("u2", "i2", "rating", 1_700_000_000_000, None, 4.0),
        RawEvent("u3", "i3", "purchase", 1_700_000_000_000, 2.5, None),
        RawEvent("u1", "i1", "click", 1_700_000_000_500, None, None),
    ]


def test_generic_csv_without_ts_keeps_file_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "ev.csv", "item_id,user_id\ni9,u1\ni8,u2\ni7,u3\n")
    events = read_events(path)
    assert [(e.user_id, e.item_id, e.event_type, e.ts_ms) for e in events] == [
        ("u1", "i9", "view", 0),
        ("u2", "i8", "view", 1),
        ("u3", "i7", "view", 2),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("user_id,item_id,ts\nu,i,1\nu,i,soon\n", r"ev\.csv:3: timestamp 'soon' is not a number"),
        ("user_id,item_id,event_type\nu,i,like\n", r"ev\.csv:2: event_type 'like' is not one"),
        ("user_id,item_id,event_type\nu,i,forget\n", r"ev\.csv:2: event_type 'forget'"),
        ("user_id,item_id,event_type\nu,i,rating\n", r"ev\.csv:2: rating events need a rating"),
        ("user_id,item_id,weight\nu,i,-1\n", r"ev\.csv:2: weight -1 is negative"),
        ("user_id,item_id\n,i\n", r"ev\.csv:2: user_id is empty"),
        ("user_id,event_type\nu,view\n", r"ev\.csv:1: header lacks column\(s\) item_id"),
        ("user_id,item_id,ts\nu,i,nan\n", r"ev\.csv:2: timestamp 'nan' is not a finite number"),
    ],
)
def test_generic_csv_errors(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, "ev.csv", body)
    with pytest.raises(DataFormatError, match=message):
        read_events(path, "csv")


# ---------------------------------------------------------------- JSONL


def test_jsonl_uses_topic_rules(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ev.jsonl",
        '{"user_id": 5, "item_id": "i1", "event_type": "click", "ts": 1700000000}\n'
        "\n"
        '{"user_id": "u2", "item_id": "i2", "event_type": "view", "weight": 0.5, '
        '"ts": 1600000000000}\n',
    )
    assert detect_format(path) == "jsonl"
    assert read_events(path) == [
        RawEvent("u2", "i2", "view", 1_600_000_000_000, 0.5, None),
        RawEvent("5", "i1", "click", 1_700_000_000_000, None, None),
    ]


def test_jsonl_bad_record_names_line_and_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ev.jsonl",
        '{"user_id": "u", "item_id": "i", "event_type": "view"}\n'
        '{"user_id": "u", "item_id": "i", "event_type": "like"}\n',
    )
    with pytest.raises(DataFormatError, match=r"ev\.jsonl:2: unknown_event_type: event_type"):
        read_events(path)
    path = _write(tmp_path, "f.jsonl", '{"user_id": "u", "event_type": "forget"}\n')
    with pytest.raises(DataFormatError, match=r"f\.jsonl:1: forget records cannot be replayed"):
        read_events(path)


# ---------------------------------------------------------------- detection and file errors


def test_empty_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"empty\.txt: the file is empty"):
        read_events(_write(tmp_path, "empty.txt", "\n\n"))
    with pytest.raises(DataFormatError, match=r"x\.txt:1: cannot tell the file format"):
        detect_format(_write(tmp_path, "x.txt", "hello world\n"))
    with pytest.raises(DataFormatError, match=r"h\.csv: the file holds no events"):
        read_events(_write(tmp_path, "h.csv", "user_id,item_id\n"))
    with pytest.raises(DataFormatError, match=r"nope\.data: file not found"):
        read_events(tmp_path / "nope.data")
    with pytest.raises(DataFormatError, match=r"unknown format 'parquet'"):
        read_events(_write(tmp_path, "u.data", "1 2 3 4\n"), "parquet")  # type: ignore[arg-type]


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bin.data"
    path.write_bytes(b"1\t2\t3\t4\n\xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"bin\.data:2: not valid UTF-8"):
        read_events(path, "movielens")


def test_to_event_dict_round_trip() -> None:
    assert to_event_dict(RawEvent("u", "i", "rating", 5, None, 4.5)) == {
        "user_id": "u",
        "item_id": "i",
        "event_type": "rating",
        "ts": 5,
        "rating": 4.5,
    }
    assert to_event_dict(RawEvent("u", "i", "click", 5, 2.0)) == {
        "user_id": "u",
        "item_id": "i",
        "event_type": "click",
        "ts": 5,
        "weight": 2.0,
    }
