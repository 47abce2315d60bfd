"""``python -m benchmarks.bare_faust``: the reference for the worker's ingest rate.

A minimal faust-streaming app, run as its own process: one agent on the events topic,
``async for event in stream.events()`` + ``orjson.loads``, nothing else; a fresh consumer
group reading from the earliest offset, the worker's partition count, no web server, no
tables. Once ``--expected`` records are read it writes the record count and the wall time
of every ``--every``-th record to ``--out`` (JSON) and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.worker import Worker

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_faust")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--every", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    app = faust.App(
        f"sknn-bench-bare-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{args.bootstrap}",
        datadir=tempfile.mkdtemp(prefix="sknn-bench-bare-"),
        web_enabled=False,
        topic_partitions=args.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        loghandlers=[],
    )
    topic = app.topic(args.topic, key_type=bytes, value_type=bytes)
    marks: list[float] = []
    seen = 0

    @app.agent(topic)
    async def consume(stream: Any) -> None:
        nonlocal seen
        async for event in stream.events():
            orjson.loads(event.value)
            if seen % args.every == 0:
                marks.append(time.time())
            seen += 1
            if seen >= args.expected:
                marks.append(time.time())
                args.out.write_bytes(
                    orjson.dumps({"records": seen, "every": args.every, "marks": marks})
                )
                # Faust's orderly shutdown takes seconds and measures nothing: leave now.
                os._exit(0)

    Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
