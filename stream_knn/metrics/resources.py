"""What a worker holds on disk and in memory: bytes per RocksDB table and per saved index
version, and the index managers' memory. Plain filesystem walks, no Kafka.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IndexVersionSize", "dir_bytes", "index_version_sizes", "table_sizes"]

#: A saved version's directory (``v000001``), as :mod:`stream_knn.index.store` names them.
_VERSION_DIR = re.compile(r"^v(\d+)$")


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if it does not exist). Files removed
    while walking (a RocksDB compaction, a pruned version) are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def table_sizes(tabledir: Path, tables: Iterable[str]) -> dict[str, int]:
    """Bytes on disk of each table: Faust's RocksDB store keeps one database directory per
    partition, ``<tabledir>/<table>-<partition>.db``; they are summed per table."""
    out: dict[str, int] = {}
    for table in tables:
        pattern = re.compile(rf"^{re.escape(table)}-\d+\.db$")
        total = 0
        if tabledir.is_dir():
            for entry in tabledir.iterdir():
                if pattern.match(entry.name):
                    total += dir_bytes(entry)
        out[table] = total
    return out


@dataclass(frozen=True)
class IndexVersionSize:
    """A saved index version of one index setting (its directory's name) and its bytes."""

    index: str
    version: int
    bytes: int


def index_version_sizes(roots: Iterable[Path]) -> list[IndexVersionSize]:
    """Every saved version under each index root (unfinished temporary ones excluded)."""
    out: list[IndexVersionSize] = []
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                out.append(IndexVersionSize(root.name, int(match.group(1)), dir_bytes(entry)))
    return out
