"""The ``stream-knn evaluate`` and ``stream-knn tune`` subcommands (offline, no broker)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import orjson

from stream_knn.config import Config, dump_toml, load_config
from stream_knn.errors import ConfigError
from stream_knn.evaluation.baselines import DEFAULT_BASELINE_MEMORY_MB
from stream_knn.evaluation.replay import METHODS, evaluate_events
from stream_knn.evaluation.report import (
    evaluation_json,
    evaluation_table,
    tune_json,
    write_evaluation_report,
    write_tune_report,
)
from stream_knn.evaluation.tune import tune
from stream_knn.events.sources import FORMATS, FileFormat, RawEvent, read_events

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``evaluate`` and ``tune`` to the ``stream-knn`` command line."""
    ev = sub.add_parser(
        "evaluate",
        help="replay an event file; compare the model with item-kNN and popularity",
        description=(
            "Prequential replay in time order: each event of a known user is scored against "
            "the list served before it, then learned. Prints HR@k, NDCG@k, MRR@k, coverage "
            "and latency per method."
        ),
    )
    _data_options(ev)
    ev.add_argument("--k", type=int, default=10, help="list length and cutoff (default 10)")
    ev.add_argument("--output", metavar="FILE.json", help="also write the figures as JSON")
    ev.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    ev.add_argument(
        "--baseline-memory-mb",
        type=float,
        default=DEFAULT_BASELINE_MEMORY_MB,
        help="memory the exact item-kNN matrix may use; over it the baseline is left out "
        f"with a message (default {DEFAULT_BASELINE_MEMORY_MB})",
    )
    ev.add_argument(
        "--no-timing",
        action="store_true",
        help="leave latency and throughput out of the JSON (byte-identical reruns)",
    )
    ev.add_argument(
        "--report",
        metavar="DIR",
        help="write report.md and a plot of HR and NDCG over time windows here",
    )
    ev.set_defaults(func=_evaluate)

    tu = sub.add_parser(
        "tune",
        help="search model and index settings by rolling time-based validation",
        description=(
            "Scores model settings on consecutive time windows (each after learning all "
            "earlier data), then picks the cheapest Annoy setting with recall@10 >= 0.95 "
            "on the best model's item vectors. Writes a config file the worker accepts."
        ),
    )
    _data_options(tu)
    tu.add_argument(
        "--trials",
        type=int,
        default=8,
        help="settings tried by random search, the base config first (default 8); grid "
        "search tries every point of the grid",
    )
    tu.add_argument("--search", choices=("grid", "random"), default="random")
    tu.add_argument("--windows", type=int, default=3, help="validation windows (default 3)")
    tu.add_argument(
        "--output-config",
        metavar="FILE.toml",
        help="write the best configuration here (default: print it)",
    )
    tu.add_argument("--report", metavar="DIR", help="write report.md and PNG plots here")
    tu.add_argument("--json", metavar="FILE.json", help="also write the results as JSON")
    tu.set_defaults(func=_tune)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PATH", help="event file")
    parser.add_argument(
        "--format", choices=FORMATS, default=None, help="file format (default: detect)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="use the first N events in time order"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="model seed (default: model.seed of the config)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace) -> list[RawEvent]:
    fmt: FileFormat | None = args.format
    events = read_events(args.data, fmt)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit {args.limit} is not valid; need >= 1")
        events = events[: args.limit]
    return events


def _evaluate(args: argparse.Namespace, config: Config) -> int:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ConfigError(
            f"--methods {args.methods!r} is not valid; choose from {', '.join(METHODS)}"
        )
    if args.seed is not None:
        config = config.replace(model__seed=args.seed)
    events = _load(args)
    result = evaluate_events(
        events,
        config,
        k=args.k,
        names=names,
        baseline_memory_mb=args.baseline_memory_mb,
        progress=not args.no_progress,
    )
    print(evaluation_table(result))
    if args.output:
        doc = evaluation_json(
            result,
            config,
            data=str(args.data),
            fmt=args.format,
            limit=args.limit,
            timing=not args.no_timing,
        )
        Path(args.output).write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
        print(f"wrote {args.output}")
    if args.report:
        command = "stream-knn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        report = write_evaluation_report(
            result, Path(args.report), data=str(args.data), command=command
        )
        print(f"wrote {report}")
    return 0


def _tune(args: argparse.Namespace, config: Config) -> int:
    events = _load(args)
    seed = config.model.seed if args.seed is None else args.seed
    result = tune(
        events,
        config,
        trials=args.trials,
        search=args.search,
        seed=seed,
        windows=args.windows,
        progress=not args.no_progress,
    )
    text = dump_toml(result.config)
    best = result.best
    print(
        f"best trial #{best.number} of {len(result.trials)}: {best.params}, k={result.best_k}, "
        f"mean HR@{min(result.best_k, 10)} over {len(result.windows)} windows = "
        f"{best.objective(result.best_k):.4f}"
    )
    chosen = result.chosen_index
    if chosen is not None:
        print(
            f"index: metric={chosen.metric} n_trees={chosen.n_trees} search_k={chosen.search_k} "
            f"recall@10={chosen.recall:.3f} latency={chosen.latency_us:.1f}us"
        )
    if args.output_config:
        path = Path(args.output_config)
        path.write_text(text, encoding="utf-8")
        reread = load_config(path, environ={})
        if reread != result.config:
            raise ConfigError(f"{path} does not read back as the tuned configuration")
        print(f"wrote {path}")
    else:
        print(text)
    if args.report:
        parts = ["stream-knn", "tune", "--data", str(args.data), "--search", args.search]
        parts += ["--trials", str(args.trials), "--seed", str(seed), "--windows", str(args.windows)]
        if args.format:
            parts += ["--format", args.format]
        if args.limit is not None:
            parts += ["--limit", str(args.limit)]
        command = " ".join(shlex.quote(p) for p in parts)
        report = write_tune_report(result, Path(args.report), data=str(args.data), command=command)
        print(f"wrote {report}")
    if args.json:
        doc = tune_json(result, data=str(args.data))
        Path(args.json).write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
        print(f"wrote {args.json}")
    return 0
