"""The ``stream-knn`` command line: a thin dispatcher.

Each concern registers its own subcommands from ``<package>/cli.py`` (a ``register``
function); this module only parses the shared options, loads the configuration and
reports :class:`~stream_knn.errors.StreamKnnError` as a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from stream_knn import __version__
from stream_knn.config import load_config
from stream_knn.errors import StreamKnnError
from stream_knn.logs import setup_logging

__all__ = ["main"]

logger = logging.getLogger(__name__)

# Order is the order of `stream-knn --help`.
_COMMAND_MODULES = (
    "stream_knn.broker.cli",
    "stream_knn.topics.cli",
    "stream_knn.worker.cli",
    "stream_knn.events.cli",
    "stream_knn.evaluation.cli",
    "stream_knn.serving.cli",
    "stream_knn.index.cli",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-knn",
        description="Fresh k-nearest-neighbour recommendations from a live Kafka stream.",
    )
    parser.add_argument("--version", action="version", version=f"stream-knn {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (STREAM_KNN_* overrides it)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stream-knn`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(config.worker.log_level, config.worker.log_format)
        result: int = args.func(args, config)
    except StreamKnnError as exc:
        print(f"stream-knn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
