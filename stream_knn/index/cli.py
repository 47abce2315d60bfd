"""``stream-knn index list|inspect|rollback``: look at and roll back saved index versions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from stream_knn.config import Config
from stream_knn.errors import CorruptIndexError
from stream_knn.index.store import IndexStore

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``index`` command and its actions to the ``stream-knn`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        metavar="DIR",
        type=Path,
        help="index root (default: <worker.data_dir>/index)",
    )
    parser = sub.add_parser("index", help="list, inspect and roll back saved index versions")
    actions = parser.add_subparsers(dest="index_action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=[common], help="saved versions, oldest first")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=_list)

    inspect = actions.add_parser(
        "inspect", parents=[common], help="metadata of a version and its checksum check"
    )
    inspect.add_argument(
        "version", nargs="?", type=int, help="version number (default: pinned, else newest)"
    )
    inspect.set_defaults(func=_inspect)

    rollback = actions.add_parser(
        "rollback", parents=[common], help="pin a version for the workers to serve"
    )
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", type=int, help="version to serve")
    target.add_argument("--unpin", action="store_true", help="serve the newest version again")
    rollback.set_defaults(func=_rollback)


def _store(args: argparse.Namespace, config: Config) -> IndexStore:
    root = args.dir if args.dir is not None else config.worker.data_dir / "index"
    return IndexStore(root, config.index.keep_versions)


def _list(args: argparse.Namespace, config: Config) -> int:
    store = _store(args, config)
    pinned = store.pinned()
    rows = [{**info.to_dict(), "pinned": info.version == pinned} for info in store.versions()]
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print(f"no index versions under {store.root}")
        return 0
    header = ("VERSION", "ITEMS", "BACKEND", "METRIC", "DIMS", "BUILD_S", "CREATED", "")
    table = [header] + [
        (
            str(r["version"]),
            str(r["item_count"]),
            str(r["backend"]),
            str(r["metric"]),
            str(r["dims"]),
            f"{r['build_seconds']:.2f}",
            str(r["created_at"])[:19],
            "pinned" if r["pinned"] else "",
        )
        for r in rows
    ]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(args: argparse.Namespace, config: Config) -> int:
    store = _store(args, config)
    version = args.version
    if version is None:
        version = store.pinned()
    if version is None:
        versions = store.versions()
        if not versions:
            raise CorruptIndexError(f"no index versions under {store.root}")
        version = versions[-1].version
    info = store.info(version)
    data = {**info.to_dict(), "pinned": store.pinned() == version}
    try:
        store.verify(version)
        data["checksums"] = "ok"
        code = 0
    except CorruptIndexError as exc:
        data["checksums"] = f"FAILED: {exc}"
        code = 1
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    return code


def _rollback(args: argparse.Namespace, config: Config) -> int:
    store = _store(args, config)
    if args.unpin:
        store.unpin()
        print(f"unpinned: workers serve the newest valid version under {store.root}")
        return 0
    info = store.pin(args.version)
    print(
        f"pinned version {info.version} ({info.item_count} items, created "
        f"{info.created_at.isoformat()}); new builds are written but not served until "
        "`stream-knn index rollback --unpin`"
    )
    return 0
