"""One frozen, typed configuration for every stream-knn process.

Read from a TOML file (``--config``) with ``STREAM_KNN_*`` environment overrides. The
environment is read here and nowhere else. Invalid values stop start-up with a
:class:`~stream_knn.errors.ConfigError` naming the setting and its valid values.

TOML layout: one table per section (``[kafka]``, ``[broker]``, ``[events]``, ``[model]``,
``[index]``, ``[serving]``, ``[drift]``, ``[worker]``, ``[privacy]``) and
``[[serving.variants]]`` for A/B variants.

Secrets (``kafka.sasl_password``, ``kafka.ssl_key_password``, ``worker.http_token``,
``privacy.pseudonym_key``) are :class:`Secret` values: their text never shows in a repr, a
log line or :func:`dump_toml`'s output. Each also has a ``*_file`` setting naming a file
that holds it (a mounted Kubernetes Secret), read when the value is needed.

Environment: every setting is ``STREAM_KNN_<SECTION>__<NAME>`` (e.g.
``STREAM_KNN_INDEX__N_TREES=20``); the common ones also have short names, listed in
:data:`ENV_ALIASES` (e.g. ``STREAM_KNN_BOOTSTRAP_SERVERS``, ``STREAM_KNN_REBUILD_INTERVAL``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from stream_knn.errors import ConfigError

__all__ = [
    "ENV_ALIASES",
    "BrokerConfig",
    "Config",
    "DriftConfig",
    "EventsConfig",
    "IndexConfig",
    "KafkaConfig",
    "ModelConfig",
    "PrivacyConfig",
    "Secret",
    "ServingConfig",
    "VariantConfig",
    "WorkerConfig",
    "dump_toml",
    "load_config",
    "read_secret",
]

#: Settings that also take ``inf`` (TOML ``inf``, environment ``inf``): half-lives, where
#: it means no decay.
_UNBOUNDED_SUFFIXES = ("half_life_seconds", "half_life_events")

Metric = Literal["angular", "euclidean", "dot", "manhattan"]
Backend = Literal["auto", "annoy", "exact", "hnsw"]
BuildPriority = Literal["idle", "low", "normal"]
WeightFunction = Literal["similarity", "distance", "popularity_blend"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
DlqRaw = Literal["full", "truncated", "none"]

_CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


class Secret:
    """A secret setting: compares and hashes by value, never shows it.

    ``repr``, ``str`` and f-strings give ``Secret('***')`` (``Secret('')`` when empty);
    :meth:`reveal` is the one way to the text.

    Examples
    --------
    >>> token = Secret("s3cr3t")
    >>> token, f"{token}", token.reveal(), bool(Secret(""))
    (Secret('***'), "Secret('***')", 's3cr3t', False)
    """

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret's text."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def read_secret(setting: str, value: Secret, path: Path | None) -> str:
    """The text of the secret ``setting``: the content of ``path`` (the ``*_file`` setting;
    one trailing line break dropped) when set, else ``value``'s.

    Raises
    ------
    ConfigError
        When the file cannot be read; the message names ``<setting>_file``.
    """
    if path is None:
        return value.reveal()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"{setting}_file = {str(path)!r} is not valid; valid values: a readable UTF-8 file "
            f"holding the secret ({reason})"
        ) from None
    return text[:-1] if text.endswith("\n") else text


@dataclass(frozen=True)
class KafkaConfig:
    """Where the broker is, how clients authenticate to it, and what the topics are called.

    Every Kafka client of stream-knn (Faust's consumer and producer, the output producer,
    the admin client, ``produce``, ``tail``, ``recommend``, the vector replica) gets its
    security settings from here, through :mod:`stream_knn.kafka`.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    #: ``SSL`` and ``SASL_SSL`` encrypt (TLS); ``SASL_*`` authenticate with a user name
    #: and password.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: Secret = field(default_factory=Secret)
    #: A file holding the SASL password (instead of ``sasl_password``).
    sasl_password_file: Path | None = None
    #: PEM file of the CA(s) that signed the broker's certificate; unset: the system's.
    ssl_ca_file: Path | None = None
    #: Client certificate and private key (PEM) for mutual TLS.
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    #: Password of an encrypted ``ssl_key_file``.
    ssl_key_password: Secret = field(default_factory=Secret)
    ssl_key_password_file: Path | None = None
    #: Check that the broker's certificate names the host connected to.
    ssl_check_hostname: bool = True
    topics_dir: Path = Path("topics")
    user_events_topic: str = "user-events"
    item_catalog_topic: str = "item-catalog"
    recommendations_topic: str = "recommendations"
    requests_topic: str = "recommendation-requests"
    dlq_topic: str = "events-dlq"
    #: Compression the worker's producer uses for its own output.
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "lz4"


@dataclass(frozen=True)
class BrokerConfig:
    """The local single-node Apache Kafka run by ``stream-knn broker``."""

    port: int = 9092
    controller_port: int = 9093
    #: The mutual-TLS listener of a broker started with ``--secure``.
    ssl_port: int = 9094
    host: str = "127.0.0.1"
    data_dir: Path = _CACHE_HOME / "stream-knn" / "broker"
    jars_dir: Path = _CACHE_HOME / "stream-knn" / "kafka-jars"
    heap: str = "1g"
    start_timeout_seconds: float = 90.0


@dataclass(frozen=True)
class EventsConfig:
    """Validation limits and default weights of user events."""

    max_id_length: int = 256
    max_payload_bytes: int = 65_536
    #: What a dead letter keeps of the bad record's value: ``full``, ``truncated`` (its
    #: first :data:`~stream_knn.events.schema.DLQ_TRUNCATED_BYTES` bytes and its length)
    #: or ``none`` (its length).
    #: Raw values hold whatever the producer sent, user ids included.
    dlq_raw: DlqRaw = "full"
    #: Weight of an event when the record carries none (view < click < add_to_cart < purchase).
    view_weight: float = 1.0
    click_weight: float = 2.0
    add_to_cart_weight: float = 3.0
    purchase_weight: float = 5.0
    #: Weight of a ``rating`` event is ``rating_weight_base + rating_weight_scale * rating``.
    rating_weight_base: float = 1.0
    rating_weight_scale: float = 0.0

    def weight_of(self, event_type: str) -> float:
        weights = {
            "view": self.view_weight,
            "click": self.click_weight,
            "add_to_cart": self.add_to_cart_weight,
            "purchase": self.purchase_weight,
            "rating": self.rating_weight_base,
            "forget": 0.0,
        }
        return weights[event_type]


@dataclass(frozen=True)
class ModelConfig:
    """Online item embeddings and user profiles."""

    #: Dimension of the item vectors the index is built on.
    dims: int = 64
    seed: int = 0
    #: Width of the learned item sketch (the stored item state); the ``dims``-wide index
    #: vectors are its projection on the top principal directions, refitted from the data.
    #: Wider means less random noise on the cosines (about ``1/sqrt(sketch_dims)``) for
    #: ``4 * sketch_dims`` bytes per item. ``sketch_dims == dims`` means no projection.
    sketch_dims: int = 256
    #: Refit the sketch -> ``dims`` projection after this many item updates.
    projection_refit_updates: int = 1_000
    #: A worker refits at most this often (wall clock): each refit re-expresses every item
    #: in the new basis and builds a full index version of them.
    projection_refit_interval_seconds: float = 600.0
    #: Items (highest recent popularity first) the projection is fitted on, at most.
    projection_fit_max_items: int = 50_000
    #: Half-life of past behaviour in item vectors (and in the recent popularity kept with
    #: them), seconds of event time; ``inf``: no decay. A wall-clock constant is only right
    #: for data of one pace: 90 days gave HR@10 0.1412 on MovieLens 100K and 0.0826 on the
    #: same events stretched to twenty years; no decay gives 0.1421 and 0.1454.
    half_life_seconds: float = math.inf
    #: Half-life of past interactions in a user's query vector, seconds of event time
    #: (``inf``: none; the rank decay below is the default).
    profile_half_life_seconds: float = math.inf
    #: Half-life of past interactions in a user's query vector, counted in the user's own
    #: newer interactions (a rank, not an age: the same on a stream of any pace). MovieLens
    #: 100K HR@10 by value: 2: 0.165, 3: 0.167, 5: 0.165, 10: 0.157, 20: 0.149, inf: 0.139.
    profile_half_life_events: float = 5.0
    #: Recent items kept per user (query vector and exclusion list).
    profile_max_items: int = 50
    #: Share of the catalog (content) vector in an item's blended vector, 0..1.
    catalog_weight: float = 0.3
    #: Project catalog features to ``dims`` with PCA fitted on a warm-up sample.
    pca: bool = True
    pca_warmup_items: int = 256


@dataclass(frozen=True)
class IndexConfig:
    """The nearest-neighbour index and its rebuild lifecycle.

    The default backend, ``auto``, searches exactly (numpy, batched matrix products) up to
    ``exact_max_items`` items and builds Annoy above. Measured on this machine kind (2
    cores, ``benchmarks/answers.py`` and an Annoy sweep) on clustered 64-d items with
    user-profile queries (sums of 1-20 items): Annoy at its defaults (10 trees,
    ``search_k = 10 * n_trees * k``) reached recall@10 of 0.37 at 50k items and 0.30 at
    100k (0.63 for single-item queries; 0.60 live in ``make demo``). Reaching 0.95 took 20
    trees and ``search_k = 20000`` at 50k (about 1.4 ms a query) and 50 trees at 100k
    (2.3 ms a query, 4.4 s to build, over the 1.5 s budget). Exact search is exact, builds
    100k items in under 0.05 s, and a whole list in batches of 1000 cost 47 us of CPU at
    5k items and 235 us at 50k (0.6-0.9 ms a query at 100k). Above 100k items Annoy's
    sublinear search wins; tune it there with ``stream-knn tune``.
    """

    backend: Backend = "auto"
    metric: Metric = "angular"
    #: ``backend = "auto"``: the largest catalog searched exactly; Annoy above.
    exact_max_items: int = 100_000
    n_trees: int = 10
    #: Nodes inspected per Annoy query; -1 means n_trees * k * 10 (recall >= 0.95 here).
    search_k: int = -1
    #: Annoy build threads; -1 means all cores. One: a second thread bought 4% on a 100k
    #: build here, and took the core the worker and the broker answer on.
    build_threads: int = 1
    #: CPU priority of the build process: ``idle`` (Linux SCHED_IDLE: it runs only on CPU
    #: the worker leaves idle; nice 19 elsewhere), ``low`` (nice 5) or ``normal``. On a
    #: machine that serving saturates, ``idle`` builds slow down instead of the answers.
    build_priority: BuildPriority = "idle"
    #: Share of one core a running build may take, 0 < x <= 1: the build process is
    #: stopped and resumed in 20 ms periods to hold it there (1: never paced). On two
    #: cores shared with serving (and here the broker), any busy neighbour slowed answers
    #: even at idle priority: non-stop 100k-item rebuilds doubled the p99 of lists; at
    #: 0.25 they cost a quarter of that and a build takes about 4x as long, while the
    #: exact delta keeps answers fresh in between.
    build_cpu_share: float = 0.25
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    #: Rebuild at most this often, seconds (no rebuild when nothing changed).
    rebuild_interval_seconds: float = 30.0
    #: Rebuild as soon as this many items changed since the live build.
    rebuild_min_changes: int = 5_000
    #: The exact-search delta may not grow past this; reaching it forces a rebuild.
    max_delta_items: int = 20_000
    #: ... nor past this share of the live index's items (at least 100 items): once most
    #: items a query meets are stale in the live index, searching it is mostly wasted.
    max_delta_share: float = 0.25
    keep_versions: int = 5
    #: Share of live queries also answered exactly, for the sampled recall metric.
    recall_sample_rate: float = 0.01


@dataclass(frozen=True)
class VariantConfig:
    """A named A/B variant; unset fields fall back to the main settings."""

    name: str = "control"
    share: float = 1.0
    backend: Backend | None = None
    metric: Metric | None = None
    n_trees: int | None = None
    search_k: int | None = None
    weight_function: WeightFunction | None = None
    k: int | None = None


@dataclass(frozen=True)
class ServingConfig:
    """What recommendations look like and how often they are sent."""

    k: int = 10
    max_k: int = 200
    weight_function: WeightFunction = "similarity"
    #: Share of recent popularity in a ``popularity_blend`` score, 0..1.
    popularity_weight: float = 0.2
    #: At most one emission per user per this many seconds (0 = one per event).
    emit_interval_seconds: float = 0.0
    cache_entries: int = 10_000
    #: Threads searching an Annoy index for a batch of lists (the caller's included):
    #: Annoy's search releases the GIL; 2 threads answered 23.3k queries/s against 12.8k
    #: on 1 here (2 cores).
    search_threads: int = 2
    #: Score candidate query settings (rank half-lives, a short memory) side by side on a
    #: sample of events and serve the best (:mod:`stream_knn.serving.tuning`).
    self_tuning: bool = True
    #: Share of events every candidate is scored on (one extra list per candidate each).
    tuning_sample_rate: float = 0.05
    #: A worker scores at most this many sampled events a second (the cost stays bounded
    #: at any traffic: 50 a second is 300 extra lists with the six candidates).
    tuning_max_samples_per_second: float = 50.0
    variants: tuple[VariantConfig, ...] = (VariantConfig(),)


@dataclass(frozen=True)
class DriftConfig:
    """Drift monitoring: windows, probe sample and the thresholds that log a warning.

    Threshold defaults and their calibration are documented in
    :class:`stream_knn.metrics.drift.DriftThresholds`.
    """

    #: Events per input window; each closed window is compared with the one before.
    window_events: int = 50_000
    #: Most popular items kept apart in the item-popularity distribution (the rest pooled).
    top_items: int = 100
    #: Items whose vectors and neighbours are compared between index versions.
    probe_items: int = 200
    #: Least seconds between two probes. A probe compares the version it runs on with the
    #: last probed one; 200 searches of a 100k-item index at every swap of a catalog
    #: rebuilt each second took a core's tenth from serving. 0 probes every version.
    probe_interval_seconds: float = 30.0
    item_cosine_shift: float = 0.2
    centroid_shift: float = 0.1
    neighbour_drift: float = 0.5
    item_popularity: float = 0.1
    event_type: float = 0.02


@dataclass(frozen=True)
class WorkerConfig:
    """The Faust worker process."""

    app_id: str = "stream-knn"
    data_dir: Path = Path("var")
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    #: Partitions of the worker's internal topics (changelogs, repartition topics): the
    #: same as the input topics' (12 by default: up to 12 workers share the work).
    partitions: int = 12
    #: /health fails after the broker has been unreachable this long.
    broker_timeout_seconds: float = 30.0
    #: Consumer-group session timeout: how soon a dead worker's partitions move on.
    session_timeout_seconds: float = 10.0
    heartbeat_interval_seconds: float = 1.0
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"
    #: Bearer token every HTTP page but ``/health`` and ``/ready`` asks for (unset: none).
    http_token: Secret = field(default_factory=Secret)
    http_token_file: Path | None = None
    #: Whether ``/metrics`` asks for the token too (Prometheus sends it with
    #: ``authorization: {credentials_file: ...}``).
    metrics_require_token: bool = True


@dataclass(frozen=True)
class PrivacyConfig:
    """What the worker keeps about users."""

    #: Key profiles, item updates, online statistics, logs and dead letters by a keyed
    #: HMAC-SHA256 pseudonym of the user id; lists still go out under the id as sent.
    pseudonymise_user_ids: bool = False
    #: The HMAC key (at least 16 characters). Changing it orphans every stored profile.
    pseudonym_key: Secret = field(default_factory=Secret)
    pseudonym_key_file: Path | None = None


@dataclass(frozen=True)
class Config:
    """The configuration root."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check_ranges(self)

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections or ``section__name`` settings replaced."""
        values: dict[str, dict[str, Any]] = {}
        for key, value in sections.items():
            if "__" in key:
                section, name = key.split("__", 1)
                values.setdefault(section, {})[name] = value
            else:
                table = (
                    {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                    if dataclasses.is_dataclass(value) and not isinstance(value, type)
                    else value
                )
                values.setdefault(key, {}).update(table)
        return _build(values, base=self)


#: Short environment names for the settings operators change most.
ENV_ALIASES: Mapping[str, tuple[str, str]] = {
    "STREAM_KNN_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "STREAM_KNN_DATA_DIR": ("worker", "data_dir"),
    "STREAM_KNN_WEB_PORT": ("worker", "web_port"),
    "STREAM_KNN_K": ("serving", "k"),
    "STREAM_KNN_DIMS": ("model", "dims"),
    "STREAM_KNN_METRIC": ("index", "metric"),
    "STREAM_KNN_BACKEND": ("index", "backend"),
    "STREAM_KNN_TREES": ("index", "n_trees"),
    "STREAM_KNN_SEARCH_K": ("index", "search_k"),
    "STREAM_KNN_REBUILD_INTERVAL": ("index", "rebuild_interval_seconds"),
    "STREAM_KNN_LOG_LEVEL": ("worker", "log_level"),
    "STREAM_KNN_LOG_FORMAT": ("worker", "log_format"),
    "STREAM_KNN_BROKER_PORT": ("broker", "port"),
    "STREAM_KNN_BROKER_DATA_DIR": ("broker", "data_dir"),
    "STREAM_KNN_HTTP_TOKEN": ("worker", "http_token"),
}

_SECTIONS: dict[str, type[Any]] = {
    "kafka": KafkaConfig,
    "broker": BrokerConfig,
    "events": EventsConfig,
    "model": ModelConfig,
    "index": IndexConfig,
    "serving": ServingConfig,
    "drift": DriftConfig,
    "worker": WorkerConfig,
    "privacy": PrivacyConfig,
}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), then apply ``STREAM_KNN_*`` overrides."""
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, content in raw.items():
            if section not in _SECTIONS:
                raise ConfigError(
                    f"unknown config section [{section}] in {path}; "
                    f"valid sections: {', '.join(_SECTIONS)}"
                )
            if not isinstance(content, dict):
                raise ConfigError(f"config section [{section}] in {path} must be a table")
            values[section] = dict(content)
    env = os.environ if environ is None else environ
    for name, raw_value in env.items():
        if not name.startswith("STREAM_KNN_"):
            continue
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name]
        elif "__" in name:
            section, key = name[len("STREAM_KNN_") :].lower().split("__", 1)
            if section not in _SECTIONS:
                raise ConfigError(
                    f"{name}: unknown section {section!r}; valid: {', '.join(_SECTIONS)}"
                )
        else:
            continue
        values.setdefault(section, {})[key] = _EnvString(raw_value)
    return _build(values)


class _EnvString(str):
    """A value that came from the environment and may need converting from text."""


def _build(values: Mapping[str, Mapping[str, Any]], base: Config | None = None) -> Config:
    base = base or Config.__new__(Config)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        current = getattr(base, name, None) or cls()
        overrides = values.get(name, {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(
                    f"unknown setting {name}.{key}; valid settings of [{name}]: "
                    f"{', '.join(sorted(known))}"
                )
            changes[key] = _coerce(f"{name}.{key}", hints[key], value)
        sections[name] = dataclasses.replace(current, **changes)
    return Config(**sections)


def _coerce(setting: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            valid = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{setting} = {value!r} is not valid; valid values: {valid}")
        return str(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return _coerce(setting, args[0], value)
    if origin is tuple and get_args(hint)[0] is VariantConfig:
        return _variants(setting, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{setting} = {value!r} is not valid; valid values: true, false")
    if hint is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except ValueError:
            raise ConfigError(f"{setting} = {value!r} is not valid; expected an integer") from None
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{setting} = {value!r} is not valid; expected a number") from None
        if number == math.inf and setting.endswith(_UNBOUNDED_SUFFIXES):
            return number  # a half-life of inf: no decay
        if not math.isfinite(number):
            raise ConfigError(f"{setting} = {value!r} is not valid; expected a finite number")
        return number
    if hint is Secret:
        return value if isinstance(value, Secret) else Secret(str(value))
    if hint is Path:
        return Path(os.path.expanduser(str(value)))
    if hint is str:
        return str(value)
    raise ConfigError(f"{setting}: unsupported setting type {hint!r}")  # pragma: no cover


def _variants(setting: str, value: Any) -> tuple[VariantConfig, ...]:
    if isinstance(value, str):
        import orjson

        try:
            value = orjson.loads(str(value))  # orjson refuses str subclasses
        except orjson.JSONDecodeError:
            raise ConfigError(f"{setting} must be a JSON array of variant tables") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{setting} must be a non-empty array of variant tables")
    hints = typing.get_type_hints(VariantConfig)
    known = {f.name for f in dataclasses.fields(VariantConfig)}
    variants = []
    for i, item in enumerate(value):
        if isinstance(item, VariantConfig):
            variants.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{setting}[{i}] must be a table")
        unknown = set(item) - known
        if unknown:
            raise ConfigError(
                f"unknown setting {setting}[{i}].{sorted(unknown)[0]}; "
                f"valid: {', '.join(sorted(known))}"
            )
        variants.append(
            VariantConfig(
                **{k: _coerce(f"{setting}[{i}].{k}", hints[k], v) for k, v in item.items()}
            )
        )
    return tuple(variants)


def _require(ok: bool, setting: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{setting} = {value!r} is not valid; valid values: {valid}")


def _check_ranges(config: Config) -> None:
    m, ix, s, w, e, b = (
        config.model,
        config.index,
        config.serving,
        config.worker,
        config.events,
        config.broker,
    )
    _require(1 <= m.dims <= 4096, "model.dims", m.dims, "integers 1..4096")
    _require(
        m.dims <= m.sketch_dims <= 8192,
        "model.sketch_dims",
        m.sketch_dims,
        f"integers model.dims ({m.dims})..8192",
    )
    _require(
        m.projection_refit_updates >= 1,
        "model.projection_refit_updates",
        m.projection_refit_updates,
        "integers >= 1",
    )
    _require(
        m.projection_refit_interval_seconds > 0,
        "model.projection_refit_interval_seconds",
        m.projection_refit_interval_seconds,
        "> 0",
    )
    _require(
        m.projection_fit_max_items >= 1,
        "model.projection_fit_max_items",
        m.projection_fit_max_items,
        "integers >= 1",
    )
    _require(m.half_life_seconds > 0, "model.half_life_seconds", m.half_life_seconds, "> 0")
    _require(
        m.profile_half_life_seconds > 0,
        "model.profile_half_life_seconds",
        m.profile_half_life_seconds,
        "> 0",
    )
    _require(
        m.profile_half_life_events > 0,
        "model.profile_half_life_events",
        m.profile_half_life_events,
        "> 0 (inf: no decay by rank)",
    )
    _require(m.profile_max_items >= 1, "model.profile_max_items", m.profile_max_items, ">= 1")
    _require(0.0 <= m.catalog_weight <= 1.0, "model.catalog_weight", m.catalog_weight, "0..1")
    _require(ix.n_trees >= 1, "index.n_trees", ix.n_trees, "integers >= 1")
    _require(ix.exact_max_items >= 0, "index.exact_max_items", ix.exact_max_items, "integers >= 0")
    _require(ix.search_k == -1 or ix.search_k >= 1, "index.search_k", ix.search_k, "-1 or >= 1")
    _require(
        ix.rebuild_interval_seconds > 0,
        "index.rebuild_interval_seconds",
        ix.rebuild_interval_seconds,
        "> 0",
    )
    _require(
        0.0 < ix.build_cpu_share <= 1.0, "index.build_cpu_share", ix.build_cpu_share, "0 < x <= 1"
    )
    _require(ix.keep_versions >= 1, "index.keep_versions", ix.keep_versions, "integers >= 1")
    _require(ix.max_delta_items >= 1, "index.max_delta_items", ix.max_delta_items, ">= 1")
    _require(
        0.0 < ix.max_delta_share <= 1.0, "index.max_delta_share", ix.max_delta_share, "0 < x <= 1"
    )
    _require(
        0.0 <= ix.recall_sample_rate <= 1.0,
        "index.recall_sample_rate",
        ix.recall_sample_rate,
        "0..1",
    )
    _require(1 <= s.k <= s.max_k, "serving.k", s.k, f"integers 1..serving.max_k ({s.max_k})")
    _require(
        0.0 <= s.popularity_weight <= 1.0, "serving.popularity_weight", s.popularity_weight, "0..1"
    )
    _require(
        s.tuning_max_samples_per_second > 0,
        "serving.tuning_max_samples_per_second",
        s.tuning_max_samples_per_second,
        "> 0",
    )
    _require(
        0.0 < s.tuning_sample_rate <= 1.0,
        "serving.tuning_sample_rate",
        s.tuning_sample_rate,
        "0 < rate <= 1",
    )
    _require(
        s.emit_interval_seconds >= 0,
        "serving.emit_interval_seconds",
        s.emit_interval_seconds,
        ">= 0",
    )
    _require(s.cache_entries >= 0, "serving.cache_entries", s.cache_entries, ">= 0")
    _require(s.search_threads >= 1, "serving.search_threads", s.search_threads, "integers >= 1")
    names = [v.name for v in s.variants]
    _require(len(set(names)) == len(names), "serving.variants", names, "unique names")
    _require(
        all(v.share >= 0 for v in s.variants) and sum(v.share for v in s.variants) > 0,
        "serving.variants.share",
        [v.share for v in s.variants],
        "non-negative shares with a positive sum",
    )
    for port_name, port in (
        ("worker.web_port", w.web_port),
        ("broker.port", b.port),
        ("broker.controller_port", b.controller_port),
        ("broker.ssl_port", b.ssl_port),
    ):
        _require(1 <= port <= 65535, port_name, port, "1..65535")
    _require(
        0 < w.heartbeat_interval_seconds < w.session_timeout_seconds,
        "worker.heartbeat_interval_seconds",
        w.heartbeat_interval_seconds,
        "> 0 and below worker.session_timeout_seconds",
    )
    _require(w.partitions >= 1, "worker.partitions", w.partitions, "integers >= 1")
    d = config.drift
    _require(d.window_events >= 1, "drift.window_events", d.window_events, "integers >= 1")
    _require(d.top_items >= 1, "drift.top_items", d.top_items, "integers >= 1")
    _require(d.probe_items >= 1, "drift.probe_items", d.probe_items, "integers >= 1")
    _require(
        d.probe_interval_seconds >= 0,
        "drift.probe_interval_seconds",
        d.probe_interval_seconds,
        ">= 0",
    )
    _require(e.max_id_length >= 1, "events.max_id_length", e.max_id_length, ">= 1")
    _require(e.max_payload_bytes >= 64, "events.max_payload_bytes", e.max_payload_bytes, ">= 64")
    _check_kafka_security(config.kafka)
    _check_secret("worker.http_token", w.http_token, w.http_token_file)
    p = config.privacy
    _check_secret("privacy.pseudonym_key", p.pseudonym_key, p.pseudonym_key_file)
    if p.pseudonymise_user_ids:
        _require(
            bool(p.pseudonym_key) or p.pseudonym_key_file is not None,
            "privacy.pseudonym_key",
            p.pseudonym_key,
            "a secret of at least 16 characters (or privacy.pseudonym_key_file) with "
            "privacy.pseudonymise_user_ids = true",
        )
    if p.pseudonym_key:
        _require(
            len(p.pseudonym_key.reveal()) >= _MIN_KEY_CHARACTERS,
            "privacy.pseudonym_key",
            p.pseudonym_key,
            f"a secret of at least {_MIN_KEY_CHARACTERS} characters",
        )


#: Shortest accepted pseudonym key.
_MIN_KEY_CHARACTERS = 16


def _check_secret(setting: str, value: Secret, path: Path | None) -> None:
    """A secret comes from its value or its file, not both; the file must be readable."""
    if value and path is not None:
        raise ConfigError(
            f"{setting} and {setting}_file are both set; valid values: one of them "
            "(the file for a mounted secret)"
        )
    if path is not None:
        _check_file(f"{setting}_file", path)


def _check_file(setting: str, path: Path) -> None:
    _require(
        Path(path).is_file() and os.access(path, os.R_OK),
        setting,
        str(path),
        "a readable file (not found or not readable)",
    )


def _check_kafka_security(k: KafkaConfig) -> None:
    """The security settings fit the protocol: SASL needs a user and a password, TLS
    files are readable and only set where TLS is spoken, a certificate comes with its key."""
    protocol = k.security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    _check_secret("kafka.sasl_password", k.sasl_password, k.sasl_password_file)
    _check_secret("kafka.ssl_key_password", k.ssl_key_password, k.ssl_key_password_file)
    if sasl:
        _require(
            bool(k.sasl_username),
            "kafka.sasl_username",
            k.sasl_username,
            f"a user name, required with kafka.security_protocol = {protocol!r}",
        )
        _require(
            bool(k.sasl_password) or k.sasl_password_file is not None,
            "kafka.sasl_password",
            k.sasl_password,
            f"a password (or kafka.sasl_password_file), required with "
            f"kafka.security_protocol = {protocol!r}",
        )
    else:
        for name in ("sasl_username", "sasl_password", "sasl_password_file"):
            value = getattr(k, name)
            _require(
                not value,
                f"kafka.{name}",
                value,
                f"unset with kafka.security_protocol = {protocol!r} (SASL is used by "
                "'SASL_PLAINTEXT' and 'SASL_SSL')",
            )
    files = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")
    for name in (*files, "ssl_key_password", "ssl_key_password_file"):
        value = getattr(k, name)
        if value and not tls:
            raise ConfigError(
                f"kafka.{name} is set but kafka.security_protocol = {protocol!r} does not use "
                "TLS; valid values of kafka.security_protocol with it: 'SSL', 'SASL_SSL'"
            )
    for name in files:
        path = getattr(k, name)
        if path is not None:
            _check_file(f"kafka.{name}", path)
    if (k.ssl_cert_file is None) != (k.ssl_key_file is None):
        raise ConfigError(
            "kafka.ssl_cert_file and kafka.ssl_key_file go together (mutual TLS); "
            "valid values: both set or both unset"
        )


def dump_toml(config: Config) -> str:
    """The configuration as TOML text that :func:`load_config` reads back unchanged, but
    for secrets: a :class:`Secret` is never written (a comment says where to set it)."""
    lines: list[str] = []
    for name in _SECTIONS:
        section = getattr(config, name)
        lines.append(f"[{name}]")
        variants: tuple[VariantConfig, ...] = ()
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.name == "variants":
                variants = value
                continue
            if isinstance(value, Secret):
                if value:
                    lines.append(
                        f"# {f.name}: a secret, not written; set STREAM_KNN_{name.upper()}__"
                        f"{f.name.upper()} or {f.name}_file"
                    )
                continue
            if value is None:
                continue  # unset optional setting: its default
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        for variant in variants:
            lines.append(f"[[{name}.variants]]")
            for f in dataclasses.fields(variant):
                value = getattr(variant, f.name)
                if value is not None:
                    lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    import orjson

    return orjson.dumps(str(value)).decode()
