"""``stream-knn topics apply|list|check``: topics declared in ``topics/*.json`` made real."""

from __future__ import annotations

import argparse
from pathlib import Path

from stream_knn.config import Config
from stream_knn.errors import TopicSpecError
from stream_knn.kafka import verify_connection
from stream_knn.topics.admin import apply_topics, growth_note, list_topics, plan_topics
from stream_knn.topics.spec import TopicSpec, load_spec, load_specs, resolve_topics_dir

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``topics`` command and its ``apply``, ``list`` and ``check`` subcommands."""
    parser = sub.add_parser(
        "topics",
        help="create and reconcile the topics declared in topics/*.json",
        description="Topics are data: one JSON spec per topic (partitions, replication, "
        "cleanup policy, retention, configs, key, JSON Schema of the value).",
    )
    actions = parser.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    apply = actions.add_parser(
        "apply", help="create missing topics and reconcile partitions and configs"
    )
    apply.add_argument(
        "--dry-run", action="store_true", help="print the changes without making them"
    )
    apply.set_defaults(func=_apply)
    listing = actions.add_parser("list", help="show the spec'd topics as the broker has them")
    listing.set_defaults(func=_list)
    check = actions.add_parser("check", help="validate the specs offline (no broker needed)")
    check.set_defaults(func=_check)
    for action in (apply, listing, check):
        action.add_argument("--dir", type=Path, help="spec directory (default: kafka.topics_dir)")


def _directory(args: argparse.Namespace, config: Config) -> Path:
    return resolve_topics_dir(args.dir if args.dir is not None else config.kafka.topics_dir)


def _specs(args: argparse.Namespace, config: Config) -> list[TopicSpec]:
    return load_specs(_directory(args, config))


def _apply(args: argparse.Namespace, config: Config) -> int:
    bootstrap = config.kafka.bootstrap_servers
    specs = _specs(args, config)
    verify_connection(config.kafka)
    changes = (plan_topics if args.dry_run else apply_topics)(config.kafka, specs)
    prefix = "would " if args.dry_run else ""
    # The keyed inputs the worker keeps state for, partition by partition.
    stateful = {config.kafka.user_events_topic, config.kafka.item_catalog_topic}
    keys = {spec.name: spec.key for spec in specs}
    for change in changes:
        print(f"{prefix}{change}")
        if change.kind == "add_partitions" and change.topic in stateful:
            print(growth_note(change, keys[change.topic], config.worker.partitions))
    if not changes:
        print(f"no changes ({len(specs)} topics match their specs at {bootstrap})")
    return 0


def _list(args: argparse.Namespace, config: Config) -> int:
    specs = _specs(args, config)
    verify_connection(config.kafka)
    states = list_topics(config.kafka, specs)
    rows = [("TOPIC", "EXISTS", "PARTITIONS", "CLEANUP", "RETENTION_MS", "STATE")]
    for state in states:
        spec = state.spec
        if not state.exists:
            status = "missing"
        elif state.problems:
            status = "conflict"
        elif state.pending:
            status = f"drift ({len(state.pending)} changes)"
        else:
            status = "ok"
        rows.append(
            (
                spec.name,
                "yes" if state.exists else "no",
                f"{state.partitions if state.exists else '-'}/{spec.partitions}",
                state.configs.get("cleanup.policy", "-"),
                state.configs.get("retention.ms", "-"),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for state in states:
        for problem in state.problems:
            print(f"conflict: {problem}")
    return 0


def _check(args: argparse.Namespace, config: Config) -> int:
    directory = _directory(args, config)
    # Load every file on its own so one bad spec does not hide the others' verdicts.
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    failed = 0
    for path in files:
        try:
            load_spec(path)
        except TopicSpecError as exc:
            print(f"ERROR {exc}")
            failed += 1
        else:
            print(f"OK {path}")
    if not failed:
        # The whole-set checks: the directory exists and holds specs.
        try:
            load_specs(directory)
        except TopicSpecError as exc:
            print(f"ERROR {exc}")
            failed += 1
    return 1 if failed else 0
