"""Events in, bad input out: record schemas, event files, the synthetic stream, Kafka tools."""

from __future__ import annotations

from stream_knn.events.schema import (
    DLQ_REASONS,
    EVENT_TYPES,
    CatalogRecord,
    DlqRecord,
    Request,
    UserEvent,
    parse_catalog_record,
    parse_request,
    parse_user_event,
)
from stream_knn.events.sources import RawEvent, detect_format, read_events, to_event_dict
from stream_knn.events.synthetic import SyntheticStream

__all__ = [
    "DLQ_REASONS",
    "EVENT_TYPES",
    "CatalogRecord",
    "DlqRecord",
    "RawEvent",
    "Request",
    "SyntheticStream",
    "UserEvent",
    "detect_format",
    "parse_catalog_record",
    "parse_request",
    "parse_user_event",
    "read_events",
    "to_event_dict",
]
