"""The exception tree of stream-knn: one root, one line per kind.

StreamKnnError
├── ConfigError         a setting is missing or invalid; names the setting and valid values
├── BrokerError         the local Kafka broker cannot be set up, started or stopped
├── TopicSpecError      a topic spec in ``topics/`` is invalid
├── EventError          an input record cannot be used (carries topic/partition/offset/key)
├── DataFormatError     an input file for produce/evaluate/tune is unreadable (names the line)
├── IndexError_         an index cannot be built, saved or loaded
│   └── CorruptIndexError   a saved index version fails its checksum or is incomplete
└── DimensionError      a vector has the wrong dimension or non-finite values
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "CorruptIndexError",
    "DataFormatError",
    "DimensionError",
    "EventError",
    "IndexError_",
    "StreamKnnError",
    "TopicSpecError",
]


class StreamKnnError(Exception):
    """Root of every error stream-knn raises on purpose."""


class ConfigError(StreamKnnError):
    """A configuration setting is missing or invalid."""


class BrokerError(StreamKnnError):
    """The local Kafka broker cannot be set up, started or stopped."""


class TopicSpecError(StreamKnnError):
    """A declarative topic spec is invalid."""


class EventError(StreamKnnError):
    """An input record cannot be used; carries where it came from."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        key: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key

    def __str__(self) -> str:
        where = f"{self.topic}[{self.partition}]@{self.offset} key={self.key!r}"
        return f"{self.reason}: {self.args[0]} ({where})"


class DataFormatError(StreamKnnError):
    """An input data file cannot be read; the message names the file and line."""


class IndexError_(StreamKnnError):  # noqa: N801, N818 - the builtin IndexError is another thing
    """An index cannot be built, saved or loaded."""


class CorruptIndexError(IndexError_):
    """A saved index version fails its checksum or misses a file."""


class DimensionError(StreamKnnError):
    """A vector has the wrong dimension or holds NaN/inf."""
