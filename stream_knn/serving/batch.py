"""Batch recommendations for a file of users, through the worker's own service and index.

``stream-knn recommend --users FILE`` reads the worker's changelog topics (item vectors,
item contents, user profiles), feeds them to a :class:`RecommendationService` exactly as a
worker's replica does, warm-starts the index from the worker's saved versions and answers
every user with the same body as the worker's on-demand answer.

Users file formats (chosen by content, then by suffix):

* JSON Lines (``.jsonl``/``.ndjson``, or a first non-blank line starting with ``{``): one
  object per line with a ``user_id`` string;
* CSV (``.csv``): a header row with a ``user_id`` column;
* anything else: one user id per line, surrounding whitespace stripped.

Blank lines are ignored everywhere; a user listed twice is answered once, in first-seen order.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from stream_knn.config import Config
from stream_knn.embeddings.profile import UserProfile
from stream_knn.errors import BrokerError, DataFormatError, DimensionError
from stream_knn.events.pseudonym import pseudonymiser_for
from stream_knn.index.manager import BASIS_FILE
from stream_knn.kafka import Connection, kafka_config, librdkafka_settings
from stream_knn.metrics.registry import Metrics
from stream_knn.serving.service import RecommendationService
from stream_knn.worker.replica import VectorReplica

if TYPE_CHECKING:
    pass

__all__ = [
    "BatchRecommender",
    "BatchSummary",
    "answer_for_user",
    "profiles_topic",
    "read_changelog",
    "read_user_ids",
    "recommend_users",
]

logger = logging.getLogger(__name__)

#: Records asked of the consumer per poll.
_BATCH = 2000
_POLL_S = 0.5
#: Metadata and watermark requests give up after this long.
_METADATA_TIMEOUT_S = 15.0


# -- the users file ------------------------------------------------------------------------


def read_user_ids(path: Path, max_id_length: int = 256) -> list[str]:
    """The distinct user ids of a users file, in first-seen order.

    Parameters
    ----------
    path
        Plain text (one id per line), JSON Lines or CSV with a ``user_id`` field; see the
        module docstring for how the format is chosen.
    max_id_length
        Longest id accepted (``events.max_id_length``).

    Returns
    -------
    list of str
        At least one id.

    Raises
    ------
    DataFormatError
        If the file is missing or unreadable, holds no user, or a line has no usable
        ``user_id``; the message names the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"users file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"cannot read users file {path}: {exc}") from None
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    suffix = path.suffix.lower()
    if first.startswith("{") or suffix in (".jsonl", ".ndjson"):
        found = _jsonl_ids(path, lines)
    elif suffix == ".csv":
        found = _csv_ids(path, lines)
    else:
        found = ((n, line.strip()) for n, line in enumerate(lines, 1) if line.strip())
    ids: dict[str, None] = {}
    for line_no, user_id in found:
        if len(user_id) > max_id_length:
            raise DataFormatError(
                f"{path}:{line_no}: user id is {len(user_id)} characters long; the limit "
                f"(events.max_id_length) is {max_id_length}"
            )
        ids.setdefault(user_id, None)
    if not ids:
        raise DataFormatError(
            f"users file {path} holds no user id; give one id per line, JSON Lines with "
            f"a user_id field, or a CSV with a user_id column"
        )
    return list(ids)


def _jsonl_ids(path: Path, lines: list[str]) -> Iterator[tuple[int, str]]:
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{line_no}: not valid JSON: {exc}") from None
        user_id = record.get("user_id") if isinstance(record, dict) else None
        if not isinstance(user_id, str) or not user_id.strip():
            raise DataFormatError(
                f"{path}:{line_no}: expected a JSON object with a non-empty user_id string"
            )
        yield line_no, user_id.strip()


def _csv_ids(path: Path, lines: list[str]) -> Iterator[tuple[int, str]]:
    rows = csv.reader(lines)
    header = next(rows, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    if "user_id" not in names:
        raise DataFormatError(
            f"{path}:1: the CSV header has no user_id column (columns: {', '.join(names)})"
        )
    column = names.index("user_id")
    for line_no, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        user_id = row[column].strip() if column < len(row) else ""
        if not user_id:
            raise DataFormatError(f"{path}:{line_no}: empty user_id")
        yield line_no, user_id


# -- the changelogs ------------------------------------------------------------------------


def profiles_topic(config: Config) -> str:
    """The changelog topic of the worker's user profile table."""
    return f"{config.worker.app_id}-user-profiles-changelog"


def read_changelog(
    connection: Connection,
    topic: str,
    *,
    keys: Collection[bytes] | None = None,
    progress: bool = True,
    stall_timeout_s: float = 30.0,
) -> dict[bytes, bytes]:
    """The current value of every key of a changelog topic.

    Reads all partitions from the beginning to the end offsets they had when the read
    started (later records are left out, so the result is one consistent cut); the last
    value of a key wins and a tombstone deletes the key.

    Parameters
    ----------
    connection
        The ``[kafka]`` settings, or a bootstrap address (PLAINTEXT).
    topic
        Topic to read.
    keys
        Keep only these keys (``None``: all).
    progress
        Show a tqdm bar on stderr.
    stall_timeout_s
        Give up when no record arrives for this long while partitions are unfinished.

    Raises
    ------
    BrokerError
        If the broker cannot be reached, the topic does not exist or the read stalls.
    """
    consumer = _consumer(connection)
    try:
        ends = _end_offsets(consumer, topic)
        wanted = None if keys is None else set(keys)
        state: dict[bytes, bytes] = {}
        pending = {p: hi for p, (lo, hi) in ends.items() if hi > lo}
        total = sum(hi - lo for lo, hi in ends.values())
        consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in pending])
        with tqdm(total=total, desc=topic, unit="rec", disable=not progress, leave=False) as bar:
            last_seen = time.monotonic()
            while pending:
                messages = consumer.consume(num_messages=_BATCH, timeout=_POLL_S)
                for message in messages:
                    err = message.error()
                    if err is not None:
                        if err.fatal():
                            raise BrokerError(f"reading {topic} failed: {err}")
                        logger.warning("reading %s: %s", topic, err)
                        continue
                    partition, offset = message.partition(), message.offset()
                    end = None if partition is None else pending.get(partition)
                    if end is None or offset is None or offset >= end:
                        continue
                    _apply_record(state, wanted, message.key(), message.value())
                    bar.update(1)
                    if offset + 1 >= end:
                        del pending[cast(int, partition)]
                if messages:
                    last_seen = time.monotonic()
                else:
                    # Compaction and transaction markers leave offsets that never arrive.
                    _drop_finished(consumer, topic, pending)
                    if pending and time.monotonic() - last_seen > stall_timeout_s:
                        raise BrokerError(
                            f"reading {topic} stalled: no record for {stall_timeout_s:.0f} s "
                            f"with partitions {sorted(pending)} unfinished; is the broker up?"
                        )
    finally:
        consumer.close()
    return state


def _consumer(connection: Connection) -> Consumer:
    try:
        return Consumer(
            {
                **librdkafka_settings(connection),
                "group.id": f"stream-knn-recommend-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
    except KafkaException as exc:
        raise BrokerError(
            f"cannot create a Kafka consumer for {kafka_config(connection).bootstrap_servers}: "
            f"{exc}"
        ) from None


def _end_offsets(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    try:
        metadata = consumer.list_topics(topic, timeout=_METADATA_TIMEOUT_S)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BrokerError(
                f"topic {topic} does not exist; start the worker once with the same "
                f"worker.app_id so it creates its changelog topics"
            )
        return {
            p: consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=_METADATA_TIMEOUT_S, cached=False
            )
            for p in sorted(found.partitions)
        }
    except KafkaException as exc:
        raise BrokerError(f"cannot read the offsets of {topic}: {exc}") from None


def _apply_record(
    state: dict[bytes, bytes], wanted: set[bytes] | None, key: bytes | None, value: bytes | None
) -> None:
    if key is None or (wanted is not None and key not in wanted):
        return
    if value is None:
        state.pop(key, None)
    else:
        state[key] = value


def _drop_finished(consumer: Consumer, topic: str, pending: dict[int, int]) -> None:
    positions = consumer.position([TopicPartition(topic, p) for p in pending])
    for tp in positions:
        if tp.offset >= 0 and tp.offset >= pending[tp.partition]:
            del pending[tp.partition]


# -- answering -----------------------------------------------------------------------------


def answer_for_user(
    service: RecommendationService,
    user_id: str,
    profile: UserProfile | None,
    k: int | None,
    now_ms: int,
    trigger: str = "batch",
) -> dict[str, Any]:
    """The JSON body of an on-demand answer for one user, as the worker sends it.

    Parameters
    ----------
    service
        The serving side (index managers, recommenders, popularity).
    user_id
        Who to answer.
    profile
        The user's stored profile, ``None`` for an unknown user (``cold_start: true``).
    k
        List length; ``None`` means the user's variant's ``k``.
    now_ms
        Time the profile is decayed to, epoch ms.
    trigger
        What asked (``"batch"``, ``"http"``, ``"request"``).

    Returns
    -------
    dict
        ``user_id, variant, [cold_start], items [{item_id, score}], k, index_version,
        trigger, emitted_ts, [fallback]``.
    """
    return service.answer(user_id=user_id, profile=profile, k=k, now_ms=now_ms, trigger=trigger)


class BatchRecommender:
    """A :class:`RecommendationService` fed from changelog values, outside any worker.

    Use as a context manager: feed :meth:`load_items`, then :meth:`start` (warm start from
    the saved index versions, or a build when there is none), then :meth:`answer`.

    Parameters
    ----------
    config
        The deployment's configuration (the worker's).
    index_root
        Saved index versions of the primary index; default ``<worker.data_dir>/index``,
        the worker's own.
    """

    def __init__(self, config: Config, index_root: Path | None = None) -> None:
        # Someone waits for the answers and nothing is served meanwhile: a build, if one
        # is needed, runs unpaced.
        config = dataclasses.replace(
            config, index=dataclasses.replace(config.index, build_cpu_share=1.0)
        )
        self.config = config
        root = index_root if index_root is not None else Path(config.worker.data_dir) / "index"
        self.service = RecommendationService(config, root, Metrics(CollectorRegistry()))
        # The worker's replica does the decoding, blending and popularity.
        self._replica = VectorReplica(config, self.service)
        self._started = False

    @property
    def behaviour_topic(self) -> str:
        """Changelog of the learned item vectors."""
        return self._replica.behaviour_topic

    @property
    def content_topic(self) -> str:
        """Changelog of the catalog content vectors."""
        return self._replica.content_topic

    def load_items(self, behaviour: Mapping[bytes, bytes], content: Mapping[bytes, bytes]) -> int:
        """Feed the current changelog values (key item id) and return the items served.

        Recent popularity (the cold-start fallback) comes from each item's decayed event
        weight in the same records, as in the worker.
        """
        if self._started:
            raise RuntimeError("load_items() must come before start()")
        # Project the states in the basis of the version start() will serve.
        primary = self.service.primary
        saved = primary.store.pinned()
        if saved is None:
            latest = primary.store.latest_valid(dims=primary.dims, metric=primary.metric)
            saved = None if latest is None else latest[0].version
        if saved is not None:
            self._replica.adopt_basis(primary.store.read_extra(saved, BASIS_FILE))
        for key, value in behaviour.items():
            self._replica.apply(self.behaviour_topic, key, value)
        for key, value in content.items():
            self._replica.apply(self.content_topic, key, value)
        return self.service.primary.item_count

    def start(self) -> None:
        """Serve the pinned or newest saved version of each index, or build one now.

        The builder thread is stopped at once: a batch run must not write versions into
        the worker's index directory behind its back; only a missing index is built.
        """
        for manager in self.service.managers.values():
            manager.start()
            manager.stop()
        if self.service.primary.version is None and self._replica.refit_now():
            # No saved version: fit the basis on the loaded states, as a worker does once
            # it has caught up; that also built and saved a version of every index.
            logger.info("no saved index: fitted an embedding basis and built a version")
        for manager in self.service.managers.values():
            if manager.version is None and manager.item_count:
                info = manager.rebuild_now(wait=True)
                logger.info(
                    "no saved index under %s: built version %s",
                    manager.store.root,
                    None if info is None else info.version,
                )
        self._started = True

    def close(self) -> None:
        """Stop the index managers (idempotent)."""
        for manager in self.service.managers.values():
            manager.stop()

    def __enter__(self) -> BatchRecommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(
        self, user_id: str, raw_profile: bytes | None, k: int | None, now_ms: int
    ) -> dict[str, Any]:
        """The answer for ``user_id`` given its stored profile bytes (see
        :func:`answer_for_user`); a corrupt profile is logged and treated as unknown."""
        profile = None
        if raw_profile:
            try:
                profile = UserProfile.from_bytes(raw_profile)
            except DimensionError as exc:
                logger.error("profile of user %s is unreadable, answering cold: %s", user_id, exc)
        return answer_for_user(self.service, user_id, profile, k, now_ms)


@dataclass
class BatchSummary:
    """What a batch run answered."""

    users: int = 0
    cold_start: int = 0
    fallback: int = 0
    items: int = 0
    index_versions: dict[str, int | None] = field(default_factory=dict)


def recommend_users(
    config: Config,
    user_ids: list[str],
    out: IO[bytes],
    *,
    k: int | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Answer ``user_ids`` from the deployment's changelogs and index; one JSON line each.

    Parameters
    ----------
    config
        The worker's configuration (broker, ``worker.app_id``, ``worker.data_dir``).
    user_ids
        Users to answer, in output order.
    out
        Binary stream the JSON lines are written to.
    k
        List length for every user; ``None``: each user's variant's ``k``.
    progress
        Show tqdm bars on stderr (changelogs, then users).

    Raises
    ------
    BrokerError
        If a changelog topic cannot be read.
    """
    kafka = config.kafka
    summary = BatchSummary()
    with BatchRecommender(config) as batch:
        behaviour = read_changelog(kafka, batch.behaviour_topic, progress=progress)
        content = read_changelog(kafka, batch.content_topic, progress=progress)
        summary.items = batch.load_items(behaviour, content)
        del behaviour, content
        # Profiles are kept under the pseudonym when privacy.pseudonymise_user_ids is on.
        pseudonymiser = pseudonymiser_for(config.privacy)
        keys = {
            user_id: (
                user_id if pseudonymiser is None else pseudonymiser.pseudonym(user_id)
            ).encode()
            for user_id in user_ids
        }
        profiles = read_changelog(
            kafka, profiles_topic(config), keys=set(keys.values()), progress=progress
        )
        batch.start()
        summary.index_versions = {
            "-".join(str(part) for part in key): manager.version
            for key, manager in batch.service.managers.items()
        }
        # One time for every user: the answers of one run are decayed alike.
        now_ms = int(time.time() * 1000)
        for user_id in tqdm(user_ids, desc="users", unit="user", disable=not progress):
            key = keys[user_id]
            body = batch.answer(key.decode(), profiles.get(key), k, now_ms)
            body["user_id"] = user_id
            out.write(orjson.dumps(body) + b"\n")
            summary.users += 1
            summary.cold_start += bool(body.get("cold_start"))
            summary.fallback += "fallback" in body
    return summary
