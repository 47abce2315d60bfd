"""A single-node Apache Kafka broker (KRaft) run from the official Maven Central jars.

:class:`LocalBroker` backs ``stream-knn broker start|stop|status`` and the test fixtures: the
broker is a detached JVM that outlives the command and is found again through a pid file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from stream_knn.broker.secure import (
    ADMIN_USER,
    APP_USER,
    Pki,
    admin_settings,
    secure_properties,
    upsert_users,
)
from stream_knn.config import BrokerConfig
from stream_knn.errors import BrokerError

__all__ = ["BrokerStatus", "LocalBroker", "server_properties"]

logger = logging.getLogger(__name__)

_JAVA_MISSING = "java not found: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"
_MVN_MISSING = (
    "mvn not found: install Apache Maven 3 (apt-get install maven); "
    "it fetches the Kafka jars from Maven Central once"
)
#: Written into jars_dir after a successful resolve; holds the sha256 of the pom used.
_MARKER = ".stream-knn-pom.sha256"
_PID_FILE = "broker.pid"
_LOCK_FILE = "broker.lock"
_STOP_TIMEOUT_SECONDS = 30.0
_KILL_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 0.5
#: Partitions of topics the broker creates on first use (ad-hoc topics, clients' auto-create).
_DEFAULT_PARTITIONS = 4
_HEAP = re.compile(r"^[1-9][0-9]*[kKmMgG]?$")
_LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class BrokerStatus:
    """What ``stream-knn broker status`` reports.

    Attributes
    ----------
    running : bool
        Whether the broker process of this data directory is alive.
    pid : int or None
        Its process id when running.
    bootstrap : str
        The address clients use, ``host:port``.
    log_path : pathlib.Path
        The broker's log file.
    """

    running: bool
    pid: int | None
    bootstrap: str
    log_path: Path


def server_properties(config: BrokerConfig, pki: Pki | None = None) -> str:
    """The ``server.properties`` text of a single-node broker+controller.

    Parameters
    ----------
    config : BrokerConfig
        Host, ports and data directory of the broker.
    pki : Pki or None
        The TLS files of a secured broker (:mod:`stream_knn.broker.secure`: SASL_SSL
        and mutual-TLS listeners, ACLs); None: one PLAINTEXT listener.

    Returns
    -------
    str
        Java properties text; storage lives in ``<data_dir>/kraft``.
    """
    host, port, cport = config.host, config.port, config.controller_port
    data = _escape(str(Path(config.data_dir).absolute() / "kraft"))
    listeners = (
        [
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
        if pki is None
        else secure_properties(host, port, config.ssl_port, cport, pki)
    )
    lines = [
        "# Written by stream-knn broker start; edits are overwritten on the next start.",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{host}:{cport}",
        *listeners,
        f"log.dirs={data}",
        f"num.partitions={_DEFAULT_PARTITIONS}",
        # One node: internal topics cannot have more replicas than brokers.
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # Consumers join at once instead of after 3 s: tests and demos start faster.
        "group.initial.rebalance.delay.ms=0",
        # Faust creates its changelog and repartition topics on demand.
        "auto.create.topics.enable=true",
    ]
    return "\n".join(lines) + "\n"


class LocalBroker:
    """One Kafka broker process per data directory, started and stopped idempotently.

    Parameters
    ----------
    config : BrokerConfig
        Ports, data and jars directories, heap and start-up timeout.
    progress : callable, optional
        Receives one human-readable line per step; defaults to this module's logger.
    stop_with_parent : bool
        The broker gets SIGTERM when the process that started it dies, even by SIGKILL (Linux
        with util-linux ``setpriv``; elsewhere ignored). For test sessions, so a killed run
        leaves no broker behind; the CLI's broker outlives the command and leaves this off.
    secure : bool
        Start it secured (:mod:`stream_knn.broker.secure`): SASL_SSL on ``port``, mutual
        TLS on ``ssl_port``, ACLs; the TLS files and passwords in ``<data_dir>/secure``.
    """

    def __init__(
        self,
        config: BrokerConfig,
        progress: Callable[[str], None] | None = None,
        *,
        stop_with_parent: bool = False,
        secure: bool = False,
    ) -> None:
        self._config = config
        self._stop_with_parent = stop_with_parent
        self.pki: Pki | None = Pki(Path(config.data_dir).absolute() / "secure") if secure else None
        self._data_dir = Path(config.data_dir).absolute()
        self._jars_dir = Path(config.jars_dir).absolute()
        self._say = progress or logger.info
        # The JVM we started in this process, so that stop() can reap it (no zombie).
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The address clients connect to, ``host:port``."""
        return f"{self._config.host}:{self._config.port}"

    @property
    def log_path(self) -> Path:
        """The broker's log file (log4j2, rolled at 50 MB)."""
        return self._data_dir / "logs" / "broker.log"

    @property
    def pid_path(self) -> Path:
        """The pid file that marks a broker of this data directory as started."""
        return self._data_dir / _PID_FILE

    def ensure_jars(self) -> Path:
        """Resolve the Kafka jars with Maven unless ``jars_dir`` already holds them.

        A marker file records the sha256 of the pom they came from; a changed pom resolves
        again.

        Returns
        -------
        pathlib.Path
            The directory of jars (the classpath is ``<dir>/*``).

        Raises
        ------
        BrokerError
            When Maven is missing or cannot resolve the jars.
        """
        pom = resources.files("stream_knn.broker").joinpath("pom.xml")
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()
        marker = self._jars_dir / _MARKER
        if self._jars_current(marker, digest):
            return self._jars_dir
        self._jars_dir.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self._jars_dir.parent / f".{self._jars_dir.name}.lock"):
            # Another process may have resolved them while we waited for the lock.
            if self._jars_current(marker, digest):
                return self._jars_dir
            mvn = shutil.which("mvn")
            if mvn is None:
                raise BrokerError(_MVN_MISSING)
            self._say(f"resolving the Kafka jars with Maven into {self._jars_dir}")
            self._jars_dir.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True)
            # Old versions left beside new ones would both land on the classpath.
            for old in self._jars_dir.glob("*.jar"):
                old.unlink()
            with resources.as_file(pom) as pom_path:
                result = subprocess.run(
                    [
                        mvn,
                        "-q",
                        "-B",
                        "-f",
                        str(pom_path),
                        "dependency:copy-dependencies",
                        "-DincludeScope=runtime",
                        f"-DoutputDirectory={self._jars_dir}",
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            count = len(list(self._jars_dir.glob("*.jar")))
            if result.returncode != 0 or count == 0:
                raise BrokerError(
                    f"mvn could not resolve the Kafka jars (exit {result.returncode}): "
                    f"{_tail(result.stdout + result.stderr, 5)}; "
                    "check access to Maven Central (or ~/.m2/settings.xml) and retry"
                )
            marker.write_text(digest + "\n")
            self._say(f"{count} jars in {self._jars_dir}")
        return self._jars_dir

    def start(self) -> str:
        """Start the broker unless it already runs, and wait until it answers.

        Returns
        -------
        str
            The bootstrap address, ``host:port``.

        Raises
        ------
        BrokerError
            When java or mvn is missing, a port is taken by another process, the broker
            exits during start-up or does not answer within ``start_timeout_seconds``.
        """
        java = shutil.which("java")
        if java is None:
            raise BrokerError(_JAVA_MISSING)
        if not _HEAP.match(self._config.heap):
            raise BrokerError(
                f"broker.heap = {self._config.heap!r} is not a JVM heap size; "
                "use e.g. '512m' or '1g'"
            )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self._data_dir / _LOCK_FILE):
            pid = self._running_pid(clean=True)
            started = pid is None
            if pid is not None:
                bootstrap = self._live_bootstrap()
                self._say(f"broker already running (pid {pid}), log: {self.log_path}")
                if bootstrap != self.bootstrap:
                    # It keeps the ports it was started with; say so rather than wait on ours.
                    self._say(
                        f"note: it listens on {bootstrap}, not the configured {self.bootstrap}; "
                        "stop it first to change ports"
                    )
            else:
                jars = self.ensure_jars()
                self._check_ports_free()
                properties = self._write_files()
                self._format_storage(java, jars, properties)
                pid = self._launch(java, jars, properties)
                bootstrap = self.bootstrap
                self._say(f"broker starting (pid {pid}), log: {self.log_path}")
        self._wait_ready(pid, bootstrap, started=started)
        if self.pki is not None:
            users = (ADMIN_USER, APP_USER)
            passwords = {u: self.pki.password_file(u).read_text().strip() for u in users}
            upsert_users(self.admin_settings(), passwords)
            self._say(
                f"SASL_SSL (SCRAM-SHA-256/512, PLAIN) at {bootstrap}, users {', '.join(users)} "
                f"(passwords in {self.pki.directory}); mutual TLS at "
                f"{self._config.host}:{self._config.ssl_port}; CA {self.pki.ca_cert}"
            )
        self._say(f"broker ready at {bootstrap}")
        return bootstrap

    def stop(self) -> bool:
        """Stop the broker: SIGTERM, wait, then SIGKILL.

        Returns
        -------
        bool
            True if a broker was running and is now stopped, False if none was running.
        """
        self._data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self._data_dir / _LOCK_FILE):
            pid = self._running_pid(clean=True)
            if pid is None:
                self._say(f"no broker running for data dir {self._data_dir}")
                return False
            self._say(f"stopping broker (pid {pid})")
            _signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, _STOP_TIMEOUT_SECONDS):
                self._say(f"broker did not stop within {_STOP_TIMEOUT_SECONDS:.0f} s; killing it")
                _signal(pid, signal.SIGKILL)
                if not self._wait_exit(pid, _KILL_TIMEOUT_SECONDS):
                    raise BrokerError(f"broker pid {pid} survived SIGKILL; check it with ps")
            self.pid_path.unlink(missing_ok=True)
            self._say("broker stopped")
            return True

    def status(self) -> BrokerStatus:
        """Whether the broker of this data directory runs; reads the pid file only."""
        pid = self._running_pid(clean=False)
        bootstrap = self.bootstrap if pid is None else self._live_bootstrap()
        return BrokerStatus(
            running=pid is not None, pid=pid, bootstrap=bootstrap, log_path=self.log_path
        )

    # -- internals ---------------------------------------------------------------------

    def _jars_current(self, marker: Path, digest: str) -> bool:
        try:
            recorded = marker.read_text().strip()
        except FileNotFoundError:
            return False
        return recorded == digest and any(self._jars_dir.glob("*.jar"))

    def _running_pid(self, *, clean: bool) -> int | None:
        try:
            text = self.pid_path.read_text().strip()
        except FileNotFoundError:
            return None
        pid = int(text) if text.isdigit() else None
        if pid is not None and _alive(pid) and self._is_our_broker(pid):
            return pid
        if clean:
            logger.info("removing stale pid file %s (pid %s is gone)", self.pid_path, text)
            self.pid_path.unlink(missing_ok=True)
        return None

    def _properties_path(self) -> Path:
        return self._data_dir / "server.properties"

    def _is_our_broker(self, pid: int) -> bool:
        # A recycled pid must not be mistaken for the broker (and must not get our SIGTERM).
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return False
        except OSError:
            return True  # no /proc (macOS): trust the pid file
        return b"kafka.Kafka" in argv and os.fsencode(self._properties_path()) in argv

    def admin_settings(self) -> dict[str, str | int]:
        """librdkafka settings of a super-user admin client: PLAINTEXT, or for a secured
        broker its own certificate on the mutual-TLS listener."""
        if self.pki is None:
            return {"bootstrap.servers": self.bootstrap}
        return admin_settings(self.pki, self._config.host, self._config.ssl_port)

    def _check_ports_free(self) -> None:
        ports = [("port", self._config.port), ("controller_port", self._config.controller_port)]
        if self.pki is not None:
            ports.append(("ssl_port", self._config.ssl_port))
        for name, port in ports:
            if _port_open(self._config.host, port):
                raise BrokerError(
                    f"{self._config.host}:{port} (broker.{name}) is already in use by another "
                    "process; stop it or choose another port (--port, broker.controller_port)"
                )

    def _write_files(self) -> Path:
        (self._data_dir / "logs").mkdir(parents=True, exist_ok=True)
        properties = self._properties_path()
        if self.pki is not None:
            self.pki.ensure(self._config.host)
        # Secured, it holds passwords: readable by the owner only.
        fd = os.open(properties, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(server_properties(self._config, self.pki))
        # A copy in the data dir: the JVM outlives this process and any temporary extraction.
        log4j = resources.files("stream_knn.broker").joinpath("log4j2.xml")
        (self._data_dir / "log4j2.xml").write_bytes(log4j.read_bytes())
        return properties

    def _jvm_options(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={self._data_dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self._data_dir / 'logs'}",
            "-Djava.awt.headless=true",
        ]

    def _format_storage(self, java: str, jars: Path, properties: Path) -> None:
        if (self._data_dir / "kraft" / "meta.properties").exists():
            return
        self._say(f"formatting storage in {self._data_dir / 'kraft'}")
        classpath = ["-cp", f"{jars}/*", "kafka.tools.StorageTool"]
        uuid = _run([java, *self._jvm_options(), *classpath, "random-uuid"], "random-uuid")
        cluster_id = uuid.strip().splitlines()[-1].strip() if uuid.strip() else ""
        if not cluster_id:
            raise BrokerError("kafka StorageTool random-uuid printed no cluster id")
        # No --standalone: it is refused together with controller.quorum.voters.
        _run(
            [
                java,
                *self._jvm_options(),
                *classpath,
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--ignore-formatted",
            ],
            "storage format",
        )

    def _launch(self, java: str, jars: Path, properties: Path) -> int:
        command = [
            java,
            f"-Xmx{self._config.heap}",
            *self._jvm_options(),
            "-cp",
            f"{jars}/*",
            "kafka.Kafka",
            str(properties),
        ]
        setpriv = shutil.which("setpriv") if self._stop_with_parent else None
        if setpriv is not None:
            # setpriv sets PR_SET_PDEATHSIG, then execs java: same pid, no preexec_fn in a
            # threaded parent.
            command = [setpriv, "--pdeathsig", "TERM", *command]
        elif self._stop_with_parent:
            logger.debug("setpriv not found: the broker will outlive this process if it dies")
        with open(self._data_dir / "logs" / "broker.out", "ab") as out:
            # Own session: the broker survives the CLI exiting and ignores its Ctrl-C.
            self._process = subprocess.Popen(
                command,
                cwd=self._data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._process.pid}\n")
        return self._process.pid

    def _live_bootstrap(self) -> str:
        """The address the running broker advertises first (from the properties it started
        with: the PLAINTEXT or the SASL_SSL listener)."""
        for line in _read(self._properties_path()).splitlines():
            if line.startswith("advertised.listeners="):
                return line.split("://", 1)[1].split(",", 1)[0].strip()
        return self.bootstrap

    def _wait_ready(self, pid: int, bootstrap: str, *, started: bool) -> None:
        timeout = self._config.start_timeout_seconds
        deadline = time.monotonic() + timeout
        while True:
            if not self._exists(pid):
                self.pid_path.unlink(missing_ok=True)
                output = _read(self.log_path) + _read(self.log_path.with_name("broker.out"))
                raise BrokerError(
                    f"the broker (pid {pid}) exited during start-up; log {self.log_path}: "
                    f"{_tail(output, _LOG_TAIL_LINES)}"
                )
            host, _, port = bootstrap.rpartition(":")
            # A secured broker answers its own certificate on the mutual-TLS listener.
            settings: dict[str, str | int] = (
                self.admin_settings() if self.pki else {"bootstrap.servers": bootstrap}
            )
            if _port_open(host, int(port)) and _answers(settings):
                return
            if time.monotonic() > deadline:
                # Only a broker this call launched is ours to stop; a running one is left be.
                if started:
                    self.stop()
                raise BrokerError(
                    f"the broker did not answer at {bootstrap} within {timeout:.0f} s"
                    f"{' and was stopped' if started else ''}; see {self.log_path} or raise "
                    "broker.start_timeout_seconds"
                )
            time.sleep(_POLL_SECONDS)

    def _exists(self, pid: int) -> bool:
        if self._process is not None and self._process.pid == pid:
            return self._process.poll() is None
        return _alive(pid)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._process = None
            return True
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_SECONDS / 5)
        return True


def _alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # Format: "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def _escape(value: str) -> str:
    """A Java properties value: backslashes are escapes there."""
    return value.replace("\\", "\\\\")


def _signal(pid: int, sig: signal.Signals) -> None:
    # It may exit between the check and the signal: that is what we wanted anyway.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _answers(settings: dict[str, str | int]) -> bool:
    admin = AdminClient({**settings, "socket.timeout.ms": 5000})
    try:
        metadata = admin.list_topics(timeout=5)
    except KafkaException as exc:
        logger.debug("broker at %s not ready yet: %s", settings["bootstrap.servers"], exc)
        return False
    return bool(metadata.brokers)


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerError(
            f"kafka {what} failed (exit {result.returncode}): "
            f"{_tail(result.stdout + result.stderr, 5)}"
        )
    return result.stdout


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: two concurrent starts must not launch two brokers."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
