"""Declarative topic specs: one JSON file per topic in ``topics/``, loaded and checked offline.

A spec holds what Kafka needs to create the topic (partitions, replication, configs) and what
producers and consumers agree on (the key and a JSON Schema, draft 2020-12, of the value).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

# No types-jsonschema in the environment yet; these two lines are the only untyped imports.
import jsonschema  # type: ignore[import-untyped,unused-ignore]
import orjson
from jsonschema.validators import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]

import stream_knn
from stream_knn.errors import TopicSpecError

__all__ = [
    "SCHEMA_DIALECT",
    "CleanupPolicy",
    "TopicSpec",
    "default_topics_dir",
    "load_spec",
    "load_specs",
    "resolve_topics_dir",
    "schema_for",
    "validator_for",
]

CleanupPolicy = Literal["delete", "compact", "compact,delete"]
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_FIELDS = {
    "name": "the topic name",
    "description": "what the topic carries",
    "partitions": "integer >= 1",
    "replication_factor": "integer >= 1",
    "cleanup_policy": "one of " + ", ".join(get_args(CleanupPolicy)),
    "retention_ms": "integer >= -1 (-1 keeps records forever)",
    "configs": "object of other topic configs (name -> string, number or boolean)",
    "key": "what the record key is",
    "value_schema": "JSON Schema (draft 2020-12) of the record value",
}
_REQUIRED = (
    "name",
    "partitions",
    "replication_factor",
    "cleanup_policy",
    "retention_ms",
    "key",
    "value_schema",
)
# Kafka's legal topic names: at most 249 of these characters, and not "." or "..".
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_CONFIG_NAME = re.compile(r"^[a-z][a-z0-9.]*$")
#: Configs that have their own spec field and must not be repeated under ``configs``.
_OWN_FIELDS = {"cleanup.policy": "cleanup_policy", "retention.ms": "retention_ms"}


@dataclass(frozen=True)
class TopicSpec:
    """One topic, as declared in ``topics/<name>.json``.

    Attributes
    ----------
    name : str
        Kafka topic name; the file is named after it.
    partitions, replication_factor : int
        Wanted partition count (can only grow) and replicas per partition.
    cleanup_policy : {"delete", "compact", "compact,delete"}
        Kafka ``cleanup.policy``.
    retention_ms : int
        Kafka ``retention.ms``; -1 keeps records forever.
    key : str
        What the record key is (a description for people).
    value_schema : Mapping
        JSON Schema (draft 2020-12) every record value satisfies.
    configs : Mapping[str, str]
        Other topic configs, as the strings Kafka reports them.
    description : str
        What the topic carries.
    path : pathlib.Path or None
        The file the spec came from.
    """

    name: str
    partitions: int
    replication_factor: int
    cleanup_policy: CleanupPolicy
    retention_ms: int
    key: str
    value_schema: Mapping[str, Any]
    configs: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    path: Path | None = field(default=None, compare=False)

    def topic_configs(self) -> dict[str, str]:
        """Every Kafka topic config the spec sets, cleanup.policy and retention.ms included."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            **self.configs,
        }

    def validator(self) -> Draft202012Validator:
        """A validator of record values against :attr:`value_schema`."""
        return Draft202012Validator(self.value_schema)


def load_spec(path: str | Path) -> TopicSpec:
    """Read and check one spec file.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``<topic>.json`` file.

    Returns
    -------
    TopicSpec

    Raises
    ------
    TopicSpecError
        Naming the file and the field that is wrong.
    """
    path = Path(path)
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise TopicSpecError(f"{path}: topic spec file not found") from None
    except orjson.JSONDecodeError as exc:
        raise TopicSpecError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TopicSpecError(f"{path}: a topic spec must be a JSON object")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise TopicSpecError(
            f"{path}: unknown field {unknown[0]!r}; valid fields: {', '.join(_FIELDS)}"
        )
    for name in _REQUIRED:
        if name not in raw:
            raise TopicSpecError(f"{path}: field {name!r} is missing ({_FIELDS[name]})")

    def bad(name: str) -> TopicSpecError:
        return TopicSpecError(
            f"{path}: field {name!r} = {raw.get(name)!r} is not valid; expected {_FIELDS[name]}"
        )

    name = raw["name"]
    if not isinstance(name, str) or not _TOPIC_NAME.match(name) or name in (".", ".."):
        raise TopicSpecError(
            f"{path}: field 'name' = {name!r} is not a Kafka topic name "
            "(1-249 of A-Z a-z 0-9 . _ -)"
        )
    if path.stem != name:
        raise TopicSpecError(
            f"{path}: field 'name' = {name!r} must match the file name ({name}.json)"
        )
    for number in ("partitions", "replication_factor"):
        if not _is_int(raw[number]) or raw[number] < 1:
            raise bad(number)
    if not _is_int(raw["retention_ms"]) or raw["retention_ms"] < -1:
        raise bad("retention_ms")
    if raw["cleanup_policy"] not in get_args(CleanupPolicy):
        raise bad("cleanup_policy")
    for text in ("key", "description"):
        if not isinstance(raw.get(text, ""), str):
            raise bad(text)
    if not raw["key"].strip():
        raise bad("key")
    configs = _configs(path, raw.get("configs", {}))
    schema = raw["value_schema"]
    _check_schema(path, schema)
    return TopicSpec(
        name=name,
        partitions=raw["partitions"],
        replication_factor=raw["replication_factor"],
        cleanup_policy=cast(CleanupPolicy, raw["cleanup_policy"]),
        retention_ms=raw["retention_ms"],
        key=raw["key"],
        value_schema=schema,
        configs=configs,
        description=raw.get("description", ""),
        path=path,
    )


def load_specs(directory: str | Path) -> list[TopicSpec]:
    """Read and check every ``*.json`` spec in ``directory``, sorted by topic name.

    Raises
    ------
    TopicSpecError
        When the directory is missing or empty, or a file is invalid.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TopicSpecError(
            f"topic spec directory {directory} not found; set kafka.topics_dir or run from the "
            "project root"
        )
    files = sorted(directory.glob("*.json"))
    if not files:
        raise TopicSpecError(f"no topic specs (*.json) in {directory}")
    # A spec's name must match its file name, so names in one directory are unique.
    specs = [load_spec(f) for f in files]
    return sorted(specs, key=lambda s: s.name)


def default_topics_dir() -> Path:
    """The ``topics/`` directory of the source tree, next to the ``stream_knn`` package."""
    return Path(stream_knn.__file__).resolve().parents[1] / "topics"


def resolve_topics_dir(configured: str | Path) -> Path:
    """Where to read specs from: ``configured`` if it exists, else the source tree's ``topics/``.

    A relative ``configured`` is taken from the current directory; when that does not exist
    (a command run from elsewhere), the repository's own ``topics/`` is used if present.
    """
    configured = Path(configured)
    if configured.is_absolute() or configured.is_dir():
        return configured
    fallback = default_topics_dir()
    return fallback if fallback.is_dir() else configured


def schema_for(topic_name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON Schema of ``topic_name``'s record values, from its spec.

    Parameters
    ----------
    topic_name : str
        A topic declared in the spec directory, e.g. ``"user-events"``.
    directory : str or pathlib.Path, optional
        Spec directory; defaults to ``topics`` resolved as :func:`resolve_topics_dir` does.

    Raises
    ------
    TopicSpecError
        When no spec declares the topic.
    """
    return dict(_spec_named(topic_name, directory).value_schema)


def validator_for(topic_name: str, directory: str | Path | None = None) -> Draft202012Validator:
    """A draft 2020-12 validator of ``topic_name``'s record values (``.validate(value)``)."""
    return _spec_named(topic_name, directory).validator()


def _spec_named(topic_name: str, directory: str | Path | None) -> TopicSpec:
    specs = load_specs(resolve_topics_dir(directory if directory is not None else "topics"))
    for spec in specs:
        if spec.name == topic_name:
            return spec
    raise TopicSpecError(
        f"no topic spec declares {topic_name!r}; declared: {', '.join(s.name for s in specs)}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _configs(path: Path, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise TopicSpecError(f"{path}: field 'configs' must be an object; got {raw!r}")
    configs: dict[str, str] = {}
    for name, value in raw.items():
        where = f"{path}: field 'configs.{name}'"
        if name in _OWN_FIELDS:
            raise TopicSpecError(f"{where}: set it with the field {_OWN_FIELDS[name]!r} instead")
        if not _CONFIG_NAME.match(name):
            raise TopicSpecError(f"{where}: not a Kafka config name (e.g. 'min.insync.replicas')")
        # Kafka reports every config as a string; store them that way so comparison is exact.
        if isinstance(value, bool):
            configs[name] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            configs[name] = str(value)
        else:
            raise TopicSpecError(f"{where} = {value!r}: expected a string, number or boolean")
    return configs


def _check_schema(path: Path, schema: Any) -> None:
    if not isinstance(schema, dict):
        raise TopicSpecError(f"{path}: field 'value_schema' must be a JSON Schema object")
    if schema.get("$schema") != SCHEMA_DIALECT:
        raise TopicSpecError(
            f"{path}: field 'value_schema.$schema' must be {SCHEMA_DIALECT!r} (draft 2020-12)"
        )
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise TopicSpecError(
            f"{path}: field 'value_schema' is not a valid JSON Schema at {where}: {exc.message}"
        ) from None
