"""``stream-knn recommend --users FILE``: batch recommendations through the worker's index."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from stream_knn.config import Config
from stream_knn.errors import ConfigError, DataFormatError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``recommend`` command to the ``stream-knn`` parser."""
    parser = sub.add_parser(
        "recommend",
        help="recommendations for a file of users, from the worker's changelogs and index",
        description=(
            "Answer every user of FILE with the worker's on-demand answer (one JSON line "
            "per user: user_id, items, k, index_version, variant, fallback, cold_start), "
            "using the item vectors and profiles in the worker's changelog topics and the "
            "index versions saved under <data dir>/index. FILE holds one user id per line, "
            "or JSON Lines with a user_id field, or a CSV with a user_id column; blank "
            "lines are ignored and repeated users answered once."
        ),
    )
    parser.add_argument("--users", required=True, type=Path, metavar="FILE", help="users file")
    parser.add_argument(
        "--output", type=Path, metavar="OUT", help="JSON Lines output file (default: stdout)"
    )
    parser.add_argument(
        "--k", type=int, metavar="K", help="items per user (default: each user's variant's k)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="worker state directory (overrides worker.data_dir)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace, config: Config) -> int:
    from stream_knn.kafka import verify_connection
    from stream_knn.serving.batch import read_user_ids, recommend_users

    if args.data_dir is not None:
        config = dataclasses.replace(
            config, worker=dataclasses.replace(config.worker, data_dir=args.data_dir)
        )
    max_k = config.serving.max_k
    if args.k is not None and not 1 <= args.k <= max_k:
        raise ConfigError(f"--k must be an integer in 1..{max_k} (serving.max_k), got {args.k}")
    user_ids = read_user_ids(args.users, config.events.max_id_length)
    verify_connection(config.kafka)
    progress = not args.no_progress
    if args.output is None:
        summary = recommend_users(config, user_ids, sys.stdout.buffer, k=args.k, progress=progress)
        sys.stdout.buffer.flush()
    else:
        output: Path = args.output
        if not output.parent.is_dir():
            raise DataFormatError(
                f"cannot write {output}: directory {output.parent} does not exist"
            )
        # Written beside the target and renamed: a failed run leaves no half-written file.
        partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                summary = recommend_users(config, user_ids, out, k=args.k, progress=progress)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    versions = ", ".join(f"{name}: {v}" for name, v in summary.index_versions.items())
    print(
        f"stream-knn recommend: {summary.users} users ({summary.cold_start} unknown, "
        f"{summary.fallback} popularity fallback), {summary.items} items, index {versions}"
        + (f", written to {args.output}" if args.output is not None else ""),
        file=sys.stderr,
    )
    return 0
