"""Index versions built in a child process, so a build never pauses the worker's event loop.

The child builds the index and writes it as the next version of the
:class:`~stream_knn.index.store.IndexStore`; the worker's process only memory-maps the
finished version. The child is started with "spawn": forking a process that runs threads,
asyncio and librdkafka is unsafe. The vectors go to the child through files, written
without holding the GIL for long (pickling them whole held it for tens of milliseconds on
100k items), in shared memory (``/dev/shm``) where there is room: 27 MB through the
filesystem per 100k-item build, created and deleted every few seconds under non-stop
rebuilds, was the largest single cost the builds put on serving.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream_knn.config import BuildPriority, IndexConfig
from stream_knn.errors import IndexError_
from stream_knn.index.base import Index, make_index
from stream_knn.index.store import IndexStore, VersionInfo

__all__ = ["BuildJob", "BuildProcess", "VersionWriteError", "build_version"]

logger = logging.getLogger(__name__)

_IDS_FILE = "ids.json"
_MATRIX_FILE = "vectors.npy"
#: Prefix of the directory handing one job's vectors to the child (not a version).
_JOB_PREFIX = ".build-"
#: Shared memory for the hand-over, and the prefix of a hand-over there (plus the pid of
#: the worker that wrote it, so one left by a killed worker can be told and removed).
_SHM = Path("/dev/shm")
_SHM_PREFIX = "stream-knn-build-"
#: os.nice increments of the ``low`` build priority, and of ``idle`` without SCHED_IDLE.
_LOW_NICENESS = 5
#: Period of a paced build (``index.build_cpu_share`` < 1), seconds.
_PACE_PERIOD_S = 0.02
#: prctl(2) option: the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1
_IDLE_NICENESS = 19


class VersionWriteError(IndexError_):
    """The child built the index but could not write its version (disk full, permissions)."""


@dataclass(frozen=True)
class BuildJob:
    """Everything a build needs, picklable: the vectors and where the version goes."""

    root: Path
    keep_versions: int
    config: IndexConfig
    dims: int
    ids: list[str]
    matrix: npt.NDArray[np.float32]
    #: More files of the version (name -> content), e.g. the embedding basis.
    extras: Mapping[str, bytes] = field(default_factory=dict)


def build_version(
    job: BuildJob, store: IndexStore | None = None
) -> tuple[Index, VersionInfo, float]:
    """Build the index of ``job`` and write it as the next version of ``store``.

    Returns the index, its version and the build time in seconds (without the write).

    Raises
    ------
    VersionWriteError
        If the index was built but its version could not be written.
    StreamKnnError
        If the build fails.
    """
    store = IndexStore(job.root, job.keep_versions) if store is None else store
    index = make_index(job.config, job.dims)
    started = time.perf_counter()
    index.build(job.ids, job.matrix)
    seconds = time.perf_counter() - started
    try:
        info = store.write(index, seconds, job.extras)
    except IndexError_ as exc:
        raise VersionWriteError(str(exc)) from exc
    return index, info, seconds


def _write_vectors(directory: Path, ids: list[str], matrix: npt.NDArray[np.float32]) -> None:
    np.save(directory / _MATRIX_FILE, matrix)  # one write, without the GIL
    # orjson encodes 100k ids in about a millisecond (pickle took several).
    (directory / _IDS_FILE).write_bytes(orjson.dumps(ids))


def _read_vectors(directory: Path) -> tuple[list[str], npt.NDArray[np.float32]]:
    ids = orjson.loads((directory / _IDS_FILE).read_bytes())
    matrix = np.load(directory / _MATRIX_FILE, allow_pickle=False)
    return ids, np.asarray(matrix, dtype=np.float32)


def _handover_dir(root: Path, nbytes: int) -> Path:
    """A new directory for one job's vectors: in shared memory when it has room for twice
    ``nbytes``, else under the store's ``root`` (its filesystem holds the versions)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        if os.access(_SHM, os.W_OK) and shutil.disk_usage(_SHM).free > 2 * nbytes:
            return Path(tempfile.mkdtemp(prefix=f"{_SHM_PREFIX}{os.getpid()}-", dir=_SHM))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix=_JOB_PREFIX, dir=root))


def _remove_stale_handovers() -> None:
    """Hand-overs in shared memory left by workers that died mid-build (memory, not disk)."""
    try:
        names = os.listdir(_SHM)
    except OSError:
        return
    for name in names:
        if not name.startswith(_SHM_PREFIX):
            continue
        pid = name[len(_SHM_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(_SHM / name, ignore_errors=True)


def _start_child(priority: BuildPriority, parent: int) -> None:
    """Set up the build process: its CPU priority (inherited by Annoy's build threads);
    Ctrl-C is the worker's to handle (the worker stops its builder, which shuts this
    process down), not a traceback here."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if priority == "low":
        os.nice(_LOW_NICENESS)
        _own_autogroup(_LOW_NICENESS)
    elif priority == "idle":
        # A 100k-item Annoy build is about a CPU-second: run on what serving leaves.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux
            os.nice(_IDLE_NICENESS)
        _own_autogroup(_IDLE_NICENESS)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends.

    The process's own end of the task pipe notices a worker that is gone, but not while
    it is stopped by the pacing of ``index.build_cpu_share``: a worker killed then would
    leave it stopped for good (in a session of its own nothing resumes it).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # gone before the request was made
        os._exit(1)


def _own_autogroup(niceness: int) -> None:
    """Leave the worker's scheduling group, at ``niceness`` (Linux autogroups).

    With autogroups (the default on desktop and many server kernels, for processes outside
    a container's cgroup) CPU is shared fairly between sessions first: a build charged to
    the worker's session made the kernel hold the worker back behind the broker and every
    other session while a build ran (p99 of lists 2-4x during 100k-item rebuilds on two
    cores), SCHED_IDLE notwithstanding. In a session of its own at nice 19 the build
    weighs ~1/70 of the worker. Harmless where autogroups do not apply (the process then
    stays in its cgroup, where SCHED_IDLE alone does the job). The child still ends when
    the worker does: its task pipe closes.
    """
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w", encoding="ascii") as f:
            f.write(str(niceness))
    except OSError:
        pass


def _build_in_child(job: BuildJob, vectors: Path) -> tuple[VersionInfo, float]:
    ids, matrix = _read_vectors(vectors)
    # The index itself stays here: the parent memory-maps the written version.
    _, info, seconds = build_version(dataclasses.replace(job, ids=ids, matrix=matrix))
    return info, seconds


class BuildProcess:
    """One child process that builds index versions, started on first use.

    A child that dies (e.g. killed for memory) fails its build; the next build starts a
    new one. :meth:`shutdown` ends the child; a later build starts another.
    """

    def __init__(self, priority: BuildPriority = "idle", cpu_share: float = 1.0) -> None:
        self.priority: BuildPriority = priority
        self.cpu_share = cpu_share
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        #: The child's pid, learnt when it starts (to pace it).
        self._pid = 0
        #: Set when the current child is let go: its owner thread ends then.
        self._release = threading.Event()

    def build(self, job: BuildJob) -> tuple[VersionInfo, float]:
        """Build and write ``job`` in the child; waits (the GIL is free meanwhile).

        Returns the written version and the build time in seconds.

        Raises
        ------
        VersionWriteError
            If the version could not be written.
        StreamKnnError
            If the build fails or the child process dies.
        """
        with self._lock:
            if self._executor is None:
                self._executor, self._pid, self._release = self._launch()
            executor, pid = self._executor, self._pid
        try:
            vectors = _handover_dir(job.root, job.matrix.nbytes)
        except OSError as exc:
            raise VersionWriteError(
                f"could not hand the vectors to the index build process under {job.root}: "
                f"{exc}; free disk space or fix permissions"
            ) from exc
        try:
            try:
                _write_vectors(vectors, job.ids, job.matrix)
            except OSError as exc:
                raise VersionWriteError(
                    f"could not hand the vectors to the index build process: {exc}; free "
                    "disk space or fix permissions"
                ) from exc
            light = dataclasses.replace(job, ids=[], matrix=job.matrix[:0])
            try:
                future = executor.submit(_build_in_child, light, vectors)
            except BrokenExecutor as exc:
                raise self._discard(executor, exc) from exc
            except RuntimeError as exc:  # shut down by another thread meanwhile
                raise IndexError_(f"the index build process was shut down: {exc}") from exc
            try:
                if self.cpu_share < 1.0:
                    self._paced(future, pid)
                return future.result()
            except BrokenExecutor as exc:
                raise self._discard(executor, exc) from exc
        finally:
            shutil.rmtree(vectors, ignore_errors=True)

    def _launch(self) -> tuple[ProcessPoolExecutor, int, threading.Event]:
        """A new child, started from a thread of its own that lives until the child is
        let go (:meth:`_discard`, :meth:`shutdown`): the child dies with the thread that
        started it (:func:`_die_with_parent`), so that must not be a caller's thread,
        which may end first. Caller holds the lock."""
        _remove_stale_handovers()
        executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child,
            initargs=(self.priority, os.getpid()),
        )
        release = threading.Event()
        started: Future[int] = Future()

        def own() -> None:
            try:
                started.set_result(executor.submit(os.getpid).result())
            except BaseException as exc:  # handed to the build that asked for the child
                started.set_exception(exc)
                return
            release.wait()

        threading.Thread(target=own, name="stream-knn-build-process", daemon=True).start()
        try:
            return executor, started.result(), release
        except BrokenExecutor as exc:
            release.set()
            executor.shutdown(wait=False)
            raise IndexError_(f"the index build process could not start: {exc}") from exc

    def _paced(self, future: Future[Any], pid: int) -> None:
        """Hold the child to :attr:`cpu_share` of a core until ``future`` is done: it runs
        for that share of every :data:`_PACE_PERIOD_S` and is stopped (SIGSTOP) for the
        rest. It is always resumed before this returns; were the worker killed while the
        child is stopped, the kernel resumes and hangs up the child's orphaned session."""
        running = _PACE_PERIOD_S * self.cpu_share
        stopped = _PACE_PERIOD_S - running
        while not future.done():
            wait([future], timeout=running)
            if future.done():
                return
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # the child died: the future says how
                return
            try:
                time.sleep(stopped)
            finally:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    return

    def _discard(self, executor: ProcessPoolExecutor, exc: BaseException) -> IndexError_:
        """Forget a child that died, so the next build starts a new one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
                self._release.set()
        executor.shutdown(wait=False)
        return IndexError_(
            f"the index build process ended unexpectedly ({exc}); the next build starts a new one"
        )

    def shutdown(self) -> None:
        """End the child process (after the build it is running, if any)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
            self._release.set()
