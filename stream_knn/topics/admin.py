"""Make the broker's topics match their specs: create, grow partitions, reconcile configs.

Idempotent: applying the same specs twice changes nothing the second time. Kafka cannot
remove partitions, so a spec with fewer partitions than its topic is an error, not a change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaException

# confluent_kafka.admin re-exports these without `as`, which mypy --strict does not accept.
from confluent_kafka.admin import (  # type: ignore[attr-defined,unused-ignore]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from stream_knn.errors import BrokerError, TopicSpecError
from stream_knn.kafka import Connection, kafka_config, librdkafka_settings
from stream_knn.topics.spec import TopicSpec

__all__ = [
    "Change",
    "ChangeKind",
    "TopicState",
    "apply_topics",
    "growth_note",
    "list_topics",
    "moved_key_share",
    "plan_topics",
]

logger = logging.getLogger(__name__)

ChangeKind = Literal["create", "add_partitions", "set_config", "delete_config"]
_TIMEOUT_SECONDS = 30.0
_VISIBLE_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Change:
    """One change :func:`apply_topics` makes (or :func:`plan_topics` would make).

    Attributes
    ----------
    topic : str
        The topic changed.
    kind : {"create", "add_partitions", "set_config", "delete_config"}
        ``delete_config`` resets a config the spec no longer sets to the broker default.
    name : str or None
        The config name, for config changes.
    old, new : str or None
        Values before and after (partition counts as text for ``add_partitions``).
    """

    topic: str
    kind: ChangeKind
    name: str | None = None
    old: str | None = None
    new: str | None = None

    def __str__(self) -> str:
        if self.kind == "create":
            return f"create {self.topic} ({self.new})"
        if self.kind == "add_partitions":
            return f"grow {self.topic} partitions: {self.old} -> {self.new}"
        if self.kind == "delete_config":
            return f"reset {self.topic} {self.name}: {self.old} -> (broker default)"
        return f"set {self.topic} {self.name}: {self.old} -> {self.new}"


def moved_key_share(old: int, new: int) -> float:
    """The share of keys whose partition changes when a topic grows from ``old`` to ``new``
    partitions (Kafka's default partitioner: hash modulo the partition count).

    >>> moved_key_share(4, 12)  # a key stays only if its hash mod 12 is below 4
    0.6666666666666666
    >>> moved_key_share(4, 4)
    0.0
    """
    span = math.lcm(old, new)
    return sum(h % old != h % new for h in range(span)) / span


def growth_note(change: Change, key: str, state_partitions: int) -> str:
    """What growing a keyed input topic that the worker keeps state for does, for people.

    The note of ``stream-knn topics apply`` after an ``add_partitions`` change.
    """
    old, new = int(change.old or 0), int(change.new or 0)
    share = moved_key_share(old, new) if old else 0.0
    return (
        f"  note: {change.topic} is keyed ({key}). Kafka moves no records: what is in the "
        f"topic stays in its {old} partitions, and from now on a key goes to "
        f"hash(key) % {new}: {share:.0%} of keys change partition. Order per key holds "
        "only within a partition, so until the older records are consumed a moved key's "
        "old and new records are read by different workers, in any order. The worker's "
        f"state follows the input partitions (tables and changelogs of worker.partitions = "
        f"{state_partitions}): a moved user's profile stays behind in its old partition "
        "and the user starts afresh in the new one. To grow without losing state: stop "
        f"the workers, grow the topics, set worker.partitions to {new} and start the "
        "workers under a new worker.app_id, so their tables are rebuilt from the topics "
        "(the input's retention decides how much history is learned again)."
    )


@dataclass(frozen=True)
class TopicState:
    """A spec'd topic as the broker has it.

    Attributes
    ----------
    spec : TopicSpec
        What it should be.
    exists : bool
        Whether the broker has the topic.
    partitions : int or None
        Its partition count, when it exists.
    configs : Mapping[str, str]
        Current values of the configs the spec sets (empty when missing).
    pending : tuple of Change
        What :func:`apply_topics` would change.
    problems : tuple of str
        Differences apply cannot fix (fewer partitions in the spec).
    """

    spec: TopicSpec
    exists: bool
    partitions: int | None
    configs: Mapping[str, str] = field(default_factory=dict)
    pending: tuple[Change, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def in_sync(self) -> bool:
        """True when the topic exists and matches its spec."""
        return self.exists and not self.pending and not self.problems


def list_topics(
    connection: Connection, specs: Sequence[TopicSpec], *, timeout: float = _TIMEOUT_SECONDS
) -> list[TopicState]:
    """How each spec'd topic looks on the broker, and what applying would change.

    Parameters
    ----------
    connection : KafkaConfig or str
        The ``[kafka]`` settings, or a bootstrap address (PLAINTEXT).
    specs : sequence of TopicSpec
        The declared topics.
    timeout : float
        Seconds to wait for each admin request.

    Raises
    ------
    BrokerError
        When the broker does not answer.
    """
    admin = _admin(connection)
    partitions, configs = _observe(admin, connection, specs, timeout)
    states = []
    for spec in specs:
        current = configs.get(spec.name, {})
        changes, problems = _diff(spec, partitions.get(spec.name), current)
        states.append(
            TopicState(
                spec=spec,
                exists=spec.name in partitions,
                partitions=partitions.get(spec.name),
                configs={n: current[n].value for n in spec.topic_configs() if n in current},
                pending=tuple(changes),
                problems=tuple(problems),
            )
        )
    return states


def plan_topics(
    connection: Connection, specs: Sequence[TopicSpec], *, timeout: float = _TIMEOUT_SECONDS
) -> list[Change]:
    """The changes :func:`apply_topics` would make, without making them.

    Raises
    ------
    TopicSpecError
        When a spec asks for something Kafka cannot do (fewer partitions).
    BrokerError
        When the broker does not answer.
    """
    states = list_topics(connection, specs, timeout=timeout)
    problems = [p for s in states for p in s.problems]
    if problems:
        raise TopicSpecError("; ".join(problems))
    return [c for s in states for c in s.pending]


def apply_topics(
    connection: Connection, specs: Sequence[TopicSpec], *, timeout: float = _TIMEOUT_SECONDS
) -> list[Change]:
    """Create missing topics, grow partitions and reconcile configs to match ``specs``.

    Nothing is changed when any spec asks for the impossible (fewer partitions than the
    topic has). Configs a spec does not set that were set on the topic are reset to the
    broker default, so the spec is the whole truth.

    Parameters
    ----------
    connection : KafkaConfig or str
        The ``[kafka]`` settings, or a bootstrap address (PLAINTEXT).
    specs : sequence of TopicSpec
        The declared topics.
    timeout : float
        Seconds to wait for each admin request.

    Returns
    -------
    list of Change
        What was changed, in order; empty when everything already matched.

    Raises
    ------
    TopicSpecError
        When a spec cannot be applied (fewer partitions) or Kafka refuses a change.
    BrokerError
        When the broker does not answer.
    """
    changes = plan_topics(connection, specs, timeout=timeout)
    if not changes:
        return []
    admin = _admin(connection)
    by_name = {s.name: s for s in specs}
    creates = [
        NewTopic(
            c.topic,
            num_partitions=by_name[c.topic].partitions,
            replication_factor=by_name[c.topic].replication_factor,
            config=by_name[c.topic].topic_configs(),
        )
        for c in changes
        if c.kind == "create"
    ]
    if creates:
        _wait(admin.create_topics(creates, request_timeout=timeout), "create topic", timeout)
    grows = [NewPartitions(c.topic, int(c.new or 0)) for c in changes if c.kind == "add_partitions"]
    if grows:
        _wait(admin.create_partitions(grows, request_timeout=timeout), "add partitions to", timeout)
    resources = _alterations(changes)
    if resources:
        _wait(
            admin.incremental_alter_configs(resources, request_timeout=timeout),
            "alter configs of",
            timeout,
        )
    for change in changes:
        logger.debug("topic change: %s", change)
    _await_visible(connection, specs, timeout)
    return changes


def _await_visible(connection: Connection, specs: Sequence[TopicSpec], timeout: float) -> None:
    """Return once the broker reports the applied state.

    The controller accepts a change before every broker's metadata shows it; without this
    wait an immediate second apply (or the worker starting) could see the old partition
    count and act on it.
    """
    deadline = time.monotonic() + timeout
    while True:
        pending = [c for s in list_topics(connection, specs, timeout=timeout) for c in s.pending]
        if not pending:
            return
        if time.monotonic() > deadline:
            logger.warning(
                "applied topic changes not yet visible after %.0f s: %s",
                timeout,
                "; ".join(str(c) for c in pending),
            )
            return
        time.sleep(_VISIBLE_POLL_SECONDS)


def _admin(connection: Connection) -> AdminClient:
    # librdkafka's own log lines go through our logger tree instead of raw stderr.
    settings: dict[str, Any] = {
        **librdkafka_settings(connection),
        "logger": logging.getLogger(f"{__name__}.librdkafka"),
    }
    return AdminClient(settings)


def _observe(
    admin: AdminClient, connection: Connection, specs: Sequence[TopicSpec], timeout: float
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Partition counts and config entries of the spec'd topics that exist."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot reach Kafka at {kafka_config(connection).bootstrap_servers}: "
            f"{_reason(exc)}; start a local broker with "
            "`stream-knn broker start` or set kafka.bootstrap_servers"
        ) from None
    wanted = {s.name for s in specs}
    partitions = {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if name in wanted and topic.error is None
    }
    for spec in specs:
        topic = metadata.topics.get(spec.name)
        if topic is not None and topic.error is None and topic.partitions:
            replicas = len(next(iter(topic.partitions.values())).replicas)
            if replicas != spec.replication_factor:
                # Changing replicas needs a reassignment plan, which is an operator's job.
                logger.warning(
                    "topic %s has replication factor %d, its spec says %d; apply does not "
                    "change it (use kafka-reassign-partitions)",
                    spec.name,
                    replicas,
                    spec.replication_factor,
                )
    configs: dict[str, dict[str, Any]] = {}
    if partitions:
        futures = admin.describe_configs(
            [ConfigResource(ResourceType.TOPIC, name) for name in sorted(partitions)],
            request_timeout=timeout,
        )
        for resource, future in futures.items():
            try:
                configs[resource.name] = future.result(timeout=timeout)
            except (KafkaException, TimeoutError) as exc:
                raise BrokerError(
                    f"cannot read the configs of topic {resource.name}: {_reason(exc)}"
                ) from None
    return partitions, configs


def _diff(
    spec: TopicSpec, partitions: int | None, current: Mapping[str, Any]
) -> tuple[list[Change], list[str]]:
    if partitions is None:
        settings = ", ".join(
            [f"partitions={spec.partitions}", f"replication_factor={spec.replication_factor}"]
            + [f"{k}={v}" for k, v in spec.topic_configs().items()]
        )
        return [Change(spec.name, "create", new=settings)], []
    changes: list[Change] = []
    problems: list[str] = []
    if partitions > spec.partitions:
        problems.append(
            f"topic {spec.name} has {partitions} partitions but its spec ({spec.path}) says "
            f"{spec.partitions}: Kafka cannot remove partitions; set partitions to "
            f"{partitions} or more, or delete and re-create the topic"
        )
    elif partitions < spec.partitions:
        changes.append(
            Change(spec.name, "add_partitions", old=str(partitions), new=str(spec.partitions))
        )
    wanted = spec.topic_configs()
    for name, value in wanted.items():
        entry = current.get(name)
        old = None if entry is None else entry.value
        if not _same(name, old, value):
            changes.append(Change(spec.name, "set_config", name=name, old=old, new=value))
    for name, entry in sorted(current.items()):
        if name not in wanted and entry.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value:
            changes.append(Change(spec.name, "delete_config", name=name, old=entry.value))
    return changes, problems


def _same(name: str, old: str | None, new: str) -> bool:
    if old is None:
        return False
    if name == "cleanup.policy":
        # A list config: "compact,delete" and "delete,compact" are the same policy.
        return {p.strip() for p in old.split(",")} == {p.strip() for p in new.split(",")}
    return old == new


def _alterations(changes: Iterable[Change]) -> list[ConfigResource]:
    """One resource per topic: Kafka wants all config changes of a topic in one request."""
    entries: dict[str, list[ConfigEntry]] = {}
    for change in changes:
        if change.kind == "set_config":
            op = AlterConfigOpType.SET
        elif change.kind == "delete_config":
            op = AlterConfigOpType.DELETE
        else:
            continue
        entries.setdefault(change.topic, []).append(
            ConfigEntry(change.name or "", change.new, incremental_operation=op)
        )
    return [
        ConfigResource(ResourceType.TOPIC, topic, incremental_configs=items)
        for topic, items in entries.items()
    ]


def _wait(futures: Mapping[Any, Any], what: str, timeout: float) -> None:
    failures = []
    for target, future in futures.items():
        try:
            future.result(timeout=timeout)
        except (KafkaException, TimeoutError) as exc:
            name = getattr(target, "name", target)
            failures.append(f"{what} {name}: {_reason(exc)}")
    if failures:
        raise TopicSpecError(
            "Kafka refused: " + "; ".join(failures) + "; fix the spec or the broker and re-apply"
        )


def _reason(exc: Exception) -> str:
    error: Any = exc.args[0] if exc.args else None
    # A KafkaException carries a KafkaError, whose str() method is the readable part.
    text = error.str() if hasattr(error, "str") else str(exc)
    return str(text) or type(exc).__name__
