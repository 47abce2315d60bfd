"""stream-knn: fresh k-nearest-neighbour recommendations from a live Kafka stream."""

from __future__ import annotations

from stream_knn.config import Config, load_config
from stream_knn.errors import (
    BrokerError,
    ConfigError,
    CorruptIndexError,
    DataFormatError,
    DimensionError,
    EventError,
    IndexError_,
    StreamKnnError,
    TopicSpecError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Config",
    "ConfigError",
    "CorruptIndexError",
    "DataFormatError",
    "DimensionError",
    "EventError",
    "IndexError_",
    "StreamKnnError",
    "TopicSpecError",
    "__version__",
    "load_config",
]
