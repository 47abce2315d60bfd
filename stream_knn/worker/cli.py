"""``stream-knn worker``: run a Faust worker process; ``stream-knn status``: what running
workers are doing."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from stream_knn.config import Config

__all__ = ["register"]


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "worker", help="run a stream-knn worker (consumes events, emits recommendations)"
    )
    parser.add_argument("--web-port", type=int, help="HTTP port (overrides worker.web_port)")
    parser.add_argument("--data-dir", type=Path, help="state directory (overrides worker.data_dir)")
    parser.set_defaults(func=_run)

    status = sub.add_parser(
        "status",
        help="one-screen summary of running workers: partitions, lag, rates, index, drift, "
        "last errors",
    )
    status.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="a worker's web address (repeatable; default http://WEB_HOST:WEB_PORT from the "
        "configuration); the other members of its group are found through it",
    )
    status.add_argument(
        "--no-members", action="store_true", help="ask only the given workers, not their group"
    )
    status.add_argument("--json", action="store_true", help="print the /status documents")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per worker (5)")
    status.add_argument(
        "--token",
        metavar="TOKEN",
        help="the workers' HTTP token (default: worker.http_token, e.g. from "
        "STREAM_KNN_HTTP_TOKEN or worker.http_token_file)",
    )
    status.set_defaults(func=_status)


#: BLAS threads of the worker process. Its matrix products are small and many (one per
#: batch); BLAS threads spinning beside the event loop and the index build process made
#: them 5-10x slower on a busy 2-core machine.
_BLAS_THREADS = 1
#: Allocations between young-generation collections (Python's default is 700). A batch
#: of lists allocates tens of thousands of small tuples that live until the batch is
#: sent; at 700 the collector ran every few events and rescanned them each time.
_GC_GEN0_THRESHOLD = 20_000


def _status(args: argparse.Namespace, config: Config) -> int:
    import orjson

    from stream_knn.config import read_secret
    from stream_knn.worker.status import fetch_statuses, format_status

    urls = args.url or [f"http://{config.worker.web_host}:{config.worker.web_port}"]
    w = config.worker
    token = args.token or read_secret("worker.http_token", w.http_token, w.http_token_file)
    answers, failed = fetch_statuses(urls, not args.no_members, args.timeout, token)
    if args.json:
        print(orjson.dumps(answers, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(answers, failed), end="")
    if failed:
        for url, error in failed:
            print(f"stream-knn status: {url}: {error}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace, config: Config) -> int:
    from faust import Worker
    from threadpoolctl import threadpool_limits

    from stream_knn.kafka import verify_connection
    from stream_knn.worker.app import create_app

    threadpool_limits(limits=_BLAS_THREADS, user_api="blas")

    changes: dict[str, Any] = {}
    if args.web_port is not None:
        changes["web_port"] = args.web_port
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if changes:
        config = dataclasses.replace(config, worker=dataclasses.replace(config.worker, **changes))
    # Refused credentials or certificates stop here, with one message, instead of
    # Faust's clients retrying (and printing stack traces) forever.
    verify_connection(config.kafka)
    worker_app = create_app(config)
    print(
        f"stream-knn worker {config.worker.app_id}: broker {config.kafka.bootstrap_servers}, "
        f"web http://{config.worker.web_host}:{config.worker.web_port}/metrics, "
        f"state {Path(config.worker.data_dir).resolve()}",
        flush=True,
    )

    class _Worker(Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            # Faust's terminal spinner leaves the root logger at DEBUG: every library's
            # debug record is then built (and dropped) on the hot path.
            logger.setLevel(level)

    worker = _Worker(
        worker_app.app,
        loglevel=config.worker.log_level,
        quiet=True,
        redirect_stdouts=False,
    )
    # What exists now (modules, config, the app) lives as long as the process: out of the
    # collector's scans, whose full passes paused the event loop for ~50 ms.
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0_THRESHOLD, gen1, gen2)
    worker.execute_from_commandline()
    return 0
