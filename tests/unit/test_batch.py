"""``stream-knn recommend --users``: users files, the batch recommender over saved indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_knn.cli import main
from stream_knn.config import Config, VariantConfig
from stream_knn.embeddings.codec import encode_vector
from stream_knn.embeddings.profile import UserProfile
from stream_knn.embeddings.sketch import ItemState
from stream_knn.errors import DataFormatError
from stream_knn.index.store import IndexStore
from stream_knn.serving.batch import BatchRecommender, read_user_ids
from stream_knn.serving.variants import VariantAssigner

DIMS = 8
TS = 1_700_000_000_000


# -- users files ---------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_users_file_skips_blanks_strips_and_dedupes(tmp_path: Path) -> None:
    path = _write(tmp_path, "users.txt", "u1\n\n  u2 \nu1\n\t\nu3")
    assert read_user_ids(path) == ["u1", "u2", "u3"]


def test_jsonl_users_file_reads_user_id(tmp_path: Path) -> None:
    path = _write(tmp_path, "users.txt", '{"user_id": "a", "x": 1}\n\n{"user_id": "b"}\n')
    assert read_user_ids(path) == ["a", "b"]


def test_csv_users_file_reads_user_id_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "users.csv", "segment,user_id\nx,u7\n,\ny, u8 \nz,u7\n")
    assert read_user_ids(path) == ["u7", "u8"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("users.txt", "", "holds no user id"),
        ("users.txt", "\n  \n", "holds no user id"),
        ("users.csv", "user_id\n", "holds no user id"),
        ("users.csv", "id,name\n1,a\n", "no user_id column (columns: id, name)"),
        ("users.jsonl", '{"user_id": "a"}\n{"user": "b"}\n', "users.jsonl:2: expected a JSON"),
        ("users.jsonl", '{"user_id": "a"}\nnot json\n', "users.jsonl:2: not valid JSON"),
        ("users.txt", "u1\n" + "x" * 300 + "\n", "users.txt:2: user id is 300 characters"),
    ],
)
def test_bad_users_files_name_the_problem(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_user_ids(path)


def test_missing_users_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="users file not found"):
        read_user_ids(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users", "{tmp}/missing.txt"], "users file not found: {tmp}/missing.txt"),
        (["--users", "{tmp}/empty.txt"], "holds no user id"),
        (["--users", "{tmp}/empty.txt", "--k", "0"], "--k must be an integer in 1..200"),
        (["--users", "{tmp}/one.txt", "--output", "{tmp}/no/such/out.jsonl"], "does not exist"),
    ],
)
def test_cli_errors_before_touching_kafka(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    # An unreachable broker: reaching Kafka at all would fail differently (and slowly).
    monkeypatch.setenv("STREAM_KNN_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "one.txt").write_text("u1\n")
    code = main(["recommend", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("stream-knn recommend: error: ")
    assert message.format(tmp=tmp_path) in err


# -- the recommender -----------------------------------------------------------------------


def _config(tmp_path: Path, **changes: object) -> Config:
    return Config().replace(
        model__dims=DIMS,
        # Item states as wide as the index vectors: no projection, vectors as written.
        model__sketch_dims=DIMS,
        worker__data_dir=tmp_path / "state",
        index__n_trees=5,
        index__recall_sample_rate=0.0,
        **changes,
    )


def _changelogs() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Items a0..a5 near axis 0, b0..b5 near axis 1; popularity 1..12; one content-only item."""
    rng = np.random.default_rng(7)
    behaviour: dict[bytes, bytes] = {}
    for n in range(12):
        group, axis = ("a", 0) if n < 6 else ("b", 1)
        vector = rng.normal(0.0, 0.05, DIMS).astype(np.float32)
        vector[axis] += 1.0
        state = ItemState(vector, TS, n + 1, float(n + 1))
        behaviour[f"{group}{n % 6}".encode()] = state.to_bytes()
    content_vector = np.zeros(DIMS, dtype=np.float32)
    content_vector[0] = 1.0
    return behaviour, {b"fresh": encode_vector(content_vector)}


def _profile(*items: str) -> bytes:
    profile = UserProfile()
    for n, item in enumerate(items):
        profile = profile.add(item, TS + n, 1.0, cap=50)
    return profile.to_bytes()


def test_builds_a_version_when_none_is_saved_and_answers_like_the_worker(tmp_path: Path) -> None:
    config = _config(tmp_path)
    behaviour, content = _changelogs()
    with BatchRecommender(config) as batch:
        assert batch.behaviour_topic == "stream-knn-item-vectors-changelog"
        assert batch.content_topic == "stream-knn-item-contents-changelog"
        assert batch.load_items(behaviour, content) == 13
        batch.start()
        body = batch.answer("u1", _profile("a0", "a1"), 4, TS)
    store = IndexStore(tmp_path / "state" / "index", 5)
    assert [v.version for v in store.versions()] == [1]
    assert store.versions()[0].item_count == 13
    assert set(body) == {
        "user_id",
        "variant",
        "items",
        "k",
        "index_version",
        "trigger",
        "emitted_ts",
    }
    assert (body["user_id"], body["variant"], body["k"]) == ("u1", "control", 4)
    assert (body["index_version"], body["trigger"]) == (1, "batch")
    found = [entry["item_id"] for entry in body["items"]]
    # The nearest items of the a-cluster (and the content-only "fresh", also on axis 0),
    # never the two the user has already seen.
    assert len(found) == 4
    assert set(found) <= {"a2", "a3", "a4", "a5", "fresh"}
    scores = [entry["score"] for entry in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_warm_starts_from_the_saved_version_without_writing_a_new_one(tmp_path: Path) -> None:
    config = _config(tmp_path)
    behaviour, content = _changelogs()
    answers = []
    for _ in range(2):
        with BatchRecommender(config) as batch:
            batch.load_items(behaviour, content)
            batch.start()
            answers.append(batch.answer("u1", _profile("b0"), 3, TS))
            assert batch.service.primary.pending_items == 0
    store = IndexStore(tmp_path / "state" / "index", 5)
    assert [v.version for v in store.versions()] == [1]
    assert answers[0]["items"] == answers[1]["items"]
    assert answers[1]["index_version"] == 1


def test_items_changed_since_the_saved_version_are_searched_exactly(tmp_path: Path) -> None:
    config = _config(tmp_path)
    behaviour, content = _changelogs()
    with BatchRecommender(config) as batch:
        batch.load_items(behaviour, content)
        batch.start()
    # b5 moves next to the a-cluster after the worker's last build.
    moved = np.zeros(DIMS, dtype=np.float32)
    moved[0] = 1.0
    behaviour[b"b5"] = ItemState(moved, TS, 1, 1.0).to_bytes()
    with BatchRecommender(config) as batch:
        batch.load_items(behaviour, content)
        batch.start()
        assert batch.service.primary.version == 1
        assert batch.service.primary.pending_items == 1
        body = batch.answer("u1", _profile("a0", "a1", "a2", "a3", "a4", "a5", "fresh"), 1, TS)
    assert [entry["item_id"] for entry in body["items"]] == ["b5"]


def test_unknown_user_gets_popular_items_flagged_cold_start(tmp_path: Path) -> None:
    config = _config(tmp_path)
    behaviour, content = _changelogs()
    with BatchRecommender(config) as batch:
        batch.load_items(behaviour, content)
        batch.start()
        body = batch.answer("stranger", None, 3, TS)
    assert body["cold_start"] is True
    assert body["fallback"] == "popular"
    # Popularity is each item's decayed weight from its changelog state: b5=12, b4=11, b3=10.
    assert body["items"] == [
        {"item_id": "b5", "score": 1.0},
        {"item_id": "b4", "score": round(11 / 12, 6)},
        {"item_id": "b3", "score": round(10 / 12, 6)},
    ]


def test_default_k_is_the_variant_k(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        serving__variants=(VariantConfig("a", 0.5), VariantConfig("b", 0.5, k=2)),
    )
    assigner = VariantAssigner(config.serving, config.index)
    users = [f"user{n}" for n in range(40)]
    behaviour, content = _changelogs()
    with BatchRecommender(config) as batch:
        batch.load_items(behaviour, content)
        batch.start()
        bodies = [batch.answer(user, _profile("a0"), None, TS) for user in users]
    assert {b["variant"] for b in bodies} == {"a", "b"}
    for user, body in zip(users, bodies, strict=True):
        variant = assigner.assign(user)
        assert body["variant"] == variant.name
        assert body["k"] == (2 if variant.name == "b" else 10)
        assert len(body["items"]) == min(body["k"], 12)


def test_no_items_means_no_build_and_an_empty_fallback(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with BatchRecommender(config) as batch:
        assert batch.load_items({}, {}) == 0
        batch.start()
        body = batch.answer("u1", _profile("a0"), 3, TS)
    assert not (tmp_path / "state" / "index").exists() or not any(
        (tmp_path / "state" / "index").iterdir()
    )
    assert body["items"] == [] and body["fallback"] == "popular"
    assert body["index_version"] is None


def test_an_old_history_still_gives_personal_recommendations(tmp_path: Path) -> None:
    config = _config(tmp_path)
    behaviour, content = _changelogs()
    four_years_later = TS + 4 * 365 * 24 * 3600 * 1000
    with BatchRecommender(config) as batch:
        batch.load_items(behaviour, content)
        batch.start()
        body = batch.answer("u1", _profile("a0", "a1"), 3, four_years_later)
    assert "fallback" not in body
    assert {entry["item_id"] for entry in body["items"]} <= {"a2", "a3", "a4", "a5", "fresh"}
