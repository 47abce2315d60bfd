"""``stream-knn produce`` and ``stream-knn tail``: put events on Kafka and watch topics."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from stream_knn.config import Config
from stream_knn.events.producer import produce_events
from stream_knn.events.sources import FORMATS, read_events, to_event_dict
from stream_knn.events.synthetic import SyntheticStream
from stream_knn.events.tail import format_record, iter_records
from stream_knn.kafka import verify_connection

__all__ = ["register"]

# Without --limit a synthetic stream runs until Ctrl-C; this is "forever" for events(n).
_ENDLESS = 2**62


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``produce`` and ``tail`` subcommands."""
    produce = sub.add_parser(
        "produce",
        help="publish synthetic or file events to the user-events topic",
        description="Publish user events (JSON, keyed by user_id) and wait for every "
        "acknowledgement; exits 1 if any event was not acknowledged.",
    )
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic", action="store_true", help="a generated stream with planted clusters"
    )
    source.add_argument("--file", metavar="PATH", help="an event file (u.data, ratings.csv, ...)")
    produce.add_argument("--format", choices=FORMATS, help="format of --file (default: detected)")
    produce.add_argument("--rate", type=_positive_float, metavar="N", help="events per second")
    produce.add_argument(
        "--limit",
        type=_non_negative_int,
        metavar="N",
        help="send at most N events (synthetic default: until Ctrl-C)",
    )
    produce.add_argument("--topic", metavar="T", help="default: kafka.user_events_topic")
    synthetic = produce.add_argument_group("synthetic stream")
    synthetic.add_argument(
        "--shift-at",
        type=_non_negative_int,
        metavar="N",
        help="every user's tastes change after event N",
    )
    synthetic.add_argument("--users", type=int, default=1000, metavar="N")
    synthetic.add_argument("--items", type=int, default=500, metavar="N")
    synthetic.add_argument("--clusters", type=int, default=10, metavar="N")
    synthetic.add_argument("--seed", type=int, default=0, metavar="S")
    produce.set_defaults(func=_produce)

    tail = sub.add_parser(
        "tail",
        help="print records of a topic as they arrive",
        description="Print each record as 'key<TAB>compact JSON value', one per line.",
    )
    tail.add_argument("topic", nargs="?", metavar="TOPIC", help="default: recommendations topic")
    tail.add_argument("--from-beginning", action="store_true", help="start at the earliest offset")
    tail.add_argument("--limit", type=_non_negative_int, metavar="N", help="stop after N records")
    tail.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="stop after S seconds without records"
    )
    tail.set_defaults(func=_tail)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _produce(args: argparse.Namespace, config: Config) -> int:
    topic = args.topic or config.kafka.user_events_topic
    verify_connection(config.kafka)
    events: Iterable[dict[str, Any]]
    if args.synthetic:
        stream = SyntheticStream(
            n_users=args.users,
            n_items=args.items,
            n_clusters=args.clusters,
            shift_at=args.shift_at,
            seed=args.seed,
        )
        events = stream.events(_ENDLESS if args.limit is None else args.limit)
    else:
        # A list, so the progress bar knows the total.
        events = [to_event_dict(e) for e in read_events(args.file, args.format)]
    report = produce_events(
        config.kafka,
        topic,
        events,
        rate=args.rate,
        limit=args.limit,
        progress=True,
        compression=config.kafka.compression,
    )
    print(f"{report.summary()} to topic {topic}")
    if report.interrupted:
        return 130
    if not report.ok:
        print(
            f"stream-knn produce: error: {report.sent - report.acked} of {report.sent} events "
            f"were not acknowledged by {config.kafka.bootstrap_servers}; check the broker "
            "(stream-knn broker status) and the topic",
            file=sys.stderr,
        )
        return 1
    return 0


def _tail(args: argparse.Namespace, config: Config) -> int:
    topic = args.topic or config.kafka.recommendations_topic
    verify_connection(config.kafka)
    for key, value in iter_records(
        config.kafka,
        topic,
        limit=args.limit,
        timeout_s=args.timeout,
        from_beginning=args.from_beginning,
    ):
        print(format_record(key, value), flush=True)
    return 0
