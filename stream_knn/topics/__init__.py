"""Topics as data: the specs in ``topics/*.json`` and the admin that makes Kafka match them."""

from __future__ import annotations

from stream_knn.topics.admin import Change, TopicState, apply_topics, list_topics, plan_topics
from stream_knn.topics.spec import (
    TopicSpec,
    load_spec,
    load_specs,
    resolve_topics_dir,
    schema_for,
    validator_for,
)

__all__ = [
    "Change",
    "TopicSpec",
    "TopicState",
    "apply_topics",
    "list_topics",
    "load_spec",
    "load_specs",
    "plan_topics",
    "resolve_topics_dir",
    "schema_for",
    "validator_for",
]
