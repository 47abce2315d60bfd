"""Versioned index directories on disk: atomic writes, checksums, pruning and pinning.

Layout under the root::

    v000001/            one build: the backend's files, ids.json, meta.json
    v000002/
    PINNED              optional: the version to serve instead of the newest (rollback)
    .tmp-v000003-...    a build being written; renamed to v000003 when complete
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from stream_knn.errors import CorruptIndexError, IndexError_
from stream_knn.index.base import Index, KnownIds, create_index

__all__ = ["META_FILE", "PIN_FILE", "IndexStore", "VersionInfo"]

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
PIN_FILE = "PINNED"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class VersionInfo:
    """What ``meta.json`` of one index version says."""

    version: int
    path: Path
    backend: str
    metric: str
    dims: int
    item_count: int
    build_seconds: float
    created_at: datetime
    params: Mapping[str, Any] = field(default_factory=dict)
    #: File name -> sha256 hex digest of every file of the version except meta.json.
    files: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``path`` as text, ``created_at`` as ISO 8601 UTC)."""
        return {
            "version": self.version,
            "path": str(self.path),
            "backend": self.backend,
            "metric": self.metric,
            "dims": self.dims,
            "item_count": self.item_count,
            "build_seconds": self.build_seconds,
            "created_at": self.created_at.isoformat(),
            "params": dict(self.params),
            "files": dict(self.files),
        }


def _dir_name(version: int) -> str:
    return f"v{version:06d}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_meta(path: Path) -> VersionInfo:
    meta_path = path / META_FILE
    try:
        raw = orjson.loads(meta_path.read_bytes())
        return VersionInfo(
            version=int(raw["version"]),
            path=path,
            backend=str(raw["backend"]),
            metric=str(raw["metric"]),
            dims=int(raw["dims"]),
            item_count=int(raw["item_count"]),
            build_seconds=float(raw["build_seconds"]),
            created_at=datetime.fromisoformat(raw["created_at"]),
            params=dict(raw["params"]),
            files={str(k): str(v) for k, v in dict(raw["files"]).items()},
        )
    except FileNotFoundError:
        raise CorruptIndexError(
            f"{meta_path} is missing; the index version is incomplete"
        ) from None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{meta_path} is not valid index metadata: {exc!r}") from None


class IndexStore:
    """Index versions under ``root``: write atomically, load verified, prune, pin.

    Parameters
    ----------
    root
        Directory holding the versions; created on the first write.
    keep_versions
        :meth:`prune` keeps this many newest versions (plus the pinned one).
    """

    def __init__(self, root: Path, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise IndexError_(f"keep_versions must be >= 1, got {keep_versions}")
        self.root = Path(root)
        self.keep_versions = keep_versions
        #: Writes that failed (disk full, permissions); the versions on disk are untouched.
        self.write_errors = 0
        self._writing: set[str] = set()

    # -- reading ---------------------------------------------------------------------

    def _version_numbers(self) -> list[int]:
        """Every version directory on disk, readable or not, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        found = (_VERSION_DIR.match(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m and (self.root / m.group(0)).is_dir())

    def path_of(self, version: int) -> Path:
        """The directory of ``version`` (whether or not it exists)."""
        return self.root / _dir_name(version)

    def info(self, version: int) -> VersionInfo:
        """The metadata of ``version``; :class:`CorruptIndexError` if missing or unreadable."""
        path = self.path_of(version)
        if not path.is_dir():
            raise CorruptIndexError(
                f"index version {version} does not exist under {self.root}; "
                "see `stream-knn index list`"
            )
        return _read_meta(path)

    def versions(self) -> list[VersionInfo]:
        """Versions with readable metadata, oldest first (unreadable ones are logged)."""
        out = []
        for version in self._version_numbers():
            try:
                out.append(self.info(version))
            except CorruptIndexError as exc:
                logger.warning("skipping index version %d: %s", version, exc)
        return out

    def verify(self, version: int) -> VersionInfo:
        """Check every file of ``version`` against its sha256 in ``meta.json``.

        Raises
        ------
        CorruptIndexError
            If the metadata is unreadable or a file is missing or differs.
        """
        info = self.info(version)
        if not info.files:
            raise CorruptIndexError(f"{info.path / META_FILE} lists no files")
        for name, expected in info.files.items():
            path = info.path / name
            try:
                actual = _sha256(path)
            except FileNotFoundError:
                raise CorruptIndexError(
                    f"{path} is missing; index version {version} is incomplete"
                ) from None
            if actual != expected:
                raise CorruptIndexError(
                    f"{path} fails its checksum (sha256 {actual[:12]}..., expected "
                    f"{expected[:12]}...); index version {version} is corrupt, "
                    "roll back or rebuild"
                )
        return info

    def load(self, version: int, known: KnownIds | None = None, verify: bool = True) -> Index:
        """The index of ``version``, memory-mapped where the backend can, after verifying it.

        The process that just wrote the version (and checksummed it while writing) passes
        ``verify=False`` and the ``known`` ids it was built from: a 100k-item version's
        checksums and ids file cost tens of milliseconds of the serving process.

        Raises
        ------
        CorruptIndexError
            If the version fails verification or its files cannot be loaded (logged).
        """
        try:
            info = self.verify(version) if verify else self.info(version)
            index = create_index(info.backend, info.metric, info.dims, info.params)
            index.load(info.path, known)
        except CorruptIndexError as exc:
            logger.error(
                "index version %d is corrupt: %s", version, exc, extra={"version": version}
            )
            raise
        if len(index) != info.item_count:
            message = (
                f"index version {version} holds {len(index)} items, meta.json says "
                f"{info.item_count}"
            )
            logger.error("%s", message, extra={"version": version})
            raise CorruptIndexError(message)
        return index

    def latest_valid(
        self, *, dims: int | None = None, metric: str | None = None
    ) -> tuple[VersionInfo, Index] | None:
        """The newest version that loads (and matches ``dims``/``metric`` when given).

        Corrupt and mismatching versions are skipped, each logged.
        """
        for version in reversed(self._version_numbers()):
            try:
                info = self.info(version)
                if (dims is not None and info.dims != dims) or (
                    metric is not None and info.metric != metric
                ):
                    logger.warning(
                        "skipping index version %d: built for %s/%d dims, need %s/%s dims",
                        version,
                        info.metric,
                        info.dims,
                        metric,
                        dims,
                    )
                    continue
                index = self.load(version)
            except CorruptIndexError as exc:
                logger.warning("skipping index version %d: %s", version, exc)
                continue
            return info, index
        return None

    # -- writing ---------------------------------------------------------------------

    def write(
        self, index: Index, build_seconds: float, extras: Mapping[str, bytes] | None = None
    ) -> VersionInfo:
        """Save ``index`` as the next version, atomically (temp dir, then ``os.rename``).

        ``extras`` are more files of the version (name -> content), checksummed with the
        index files: what the vectors mean, e.g. the embedding basis they are expressed in.

        Raises
        ------
        IndexError_
            If writing fails (e.g. disk full); the temp dir is removed, existing versions
            are untouched and :attr:`write_errors` grows by one.
        """
        numbers = self._version_numbers()
        version = (numbers[-1] if numbers else 0) + 1
        final = self.path_of(version)
        tmp = self.root / f"{_TMP_PREFIX}{_dir_name(version)}-{uuid.uuid4().hex[:8]}"
        self._writing.add(tmp.name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            index.save(tmp)
            for name, content in (extras or {}).items():
                (tmp / name).write_bytes(content)
            # No fsync: a version torn by a crash fails its checksum and is skipped.
            files = {name: _sha256(tmp / name) for name in sorted(os.listdir(tmp))}
            created = datetime.now(UTC)
            meta = {
                "version": version,
                "backend": index.backend,
                "metric": index.metric,
                "dims": index.dims,
                "params": dict(index.params),
                "item_count": len(index),
                "build_seconds": round(build_seconds, 6),
                "created_at": created.isoformat(),
                "files": files,
            }
            (tmp / META_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
            os.rename(tmp, final)
        except OSError as exc:
            self.write_errors += 1
            if tmp.exists():
                shutil.rmtree(tmp, onerror=_log_rmtree_error)
            raise IndexError_(
                f"could not write index version {version} under {self.root}: {exc}; "
                "free disk space or fix permissions (the previous versions still serve)"
            ) from exc
        finally:
            self._writing.discard(tmp.name)
        logger.info(
            "wrote index version %d: %d items, %.2fs build",
            version,
            len(index),
            build_seconds,
            extra={"version": version},
        )
        return _read_meta(final)

    def read_extra(self, version: int, name: str) -> bytes | None:
        """A file :meth:`write` saved with ``extras``; ``None`` if the version has none."""
        path = self.path_of(version) / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def prune(self, protect: Collection[int] = ()) -> list[int]:
        """Remove all but the newest ``keep_versions`` versions; return the removed ones.

        The pinned version and versions in ``protect`` (e.g. the one being served) stay.
        Leftover temp dirs of interrupted writes are removed too.
        """
        keep = set(self._version_numbers()[-self.keep_versions :]) | set(protect)
        pinned = self.pinned()
        if pinned is not None:
            keep.add(pinned)
        removed = []
        for version in self._version_numbers():
            if version not in keep:
                shutil.rmtree(self.path_of(version), onerror=_log_rmtree_error)
                removed.append(version)
                logger.info("pruned index version %d", version, extra={"version": version})
        if self.root.is_dir():
            for name in os.listdir(self.root):
                if name.startswith(_TMP_PREFIX) and name not in self._writing:
                    shutil.rmtree(self.root / name, onerror=_log_rmtree_error)
        return removed

    # -- pinning ---------------------------------------------------------------------

    def pinned(self) -> int | None:
        """The pinned version, or ``None`` (an unreadable PINNED file is logged and ignored)."""
        path = self.root / PIN_FILE
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        try:
            return int(text)
        except ValueError:
            logger.warning("ignoring %s: %r is not a version number", path, text)
            return None

    def pin(self, version: int) -> VersionInfo:
        """Serve ``version`` instead of the newest (rollback); it must verify.

        New builds are still written but not swapped in until :meth:`unpin`.
        """
        info = self.verify(version)
        tmp = self.root / f"{PIN_FILE}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(f"{version}\n", encoding="utf-8")
        os.replace(tmp, self.root / PIN_FILE)
        logger.info("pinned index version %d", version, extra={"version": version})
        return info

    def unpin(self) -> None:
        """Serve the newest valid version again."""
        try:
            (self.root / PIN_FILE).unlink()
        except FileNotFoundError:
            return
        logger.info("unpinned the index version")


def _log_rmtree_error(function: Any, path: str, exc_info: Any) -> None:
    # Clean-up after a failure must not hide the original error; say what was left.
    logger.warning(
        "could not remove %s (%s): %s", path, getattr(function, "__name__", function), exc_info[1]
    )
