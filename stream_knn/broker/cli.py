"""``stream-knn broker start|stop|status``: the local single-node Kafka for dev, tests and CI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stream_knn.broker.local import LocalBroker
from stream_knn.broker.secure import APP_USER, app_acls, client_env, create_acls
from stream_knn.config import Config

__all__ = ["register"]

#: Exit code of ``broker status`` when no broker runs (like ``systemctl status``).
EXIT_NOT_RUNNING = 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``broker`` command and its ``start``, ``stop`` and ``status`` subcommands."""
    parser = sub.add_parser(
        "broker",
        help="run a local single-node Apache Kafka (KRaft) from the Maven Central jars",
        description="Run a local single-node Apache Kafka broker (KRaft mode) for "
        "development, tests and CI. Progress goes to stderr; `start` prints the bootstrap "
        "address on stdout.",
    )
    actions = parser.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    for name, handler, text in (
        ("start", _start, "start the broker (no-op if it runs) and wait until it answers"),
        ("stop", _stop, "stop the broker (SIGTERM, then SIGKILL)"),
        ("status", _status, "print running/stopped; exit 0 if running, 3 if not"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--port", type=int, help="client port (overrides broker.port)")
        action.add_argument(
            "--controller-port", type=int, help="KRaft controller port (broker.controller_port)"
        )
        action.add_argument(
            "--data-dir", type=Path, help="pid file, logs and storage (broker.data_dir)"
        )
        if name == "start":
            action.add_argument(
                "--secure",
                action="store_true",
                help="SASL_SSL (SCRAM) on --port and mutual TLS on broker.ssl_port, with ACLs: "
                "user 'stream-knn' may use the configured topics and groups only; its client "
                "settings are written to <data dir>/secure/client.env",
            )
        action.set_defaults(func=handler)


def _broker(args: argparse.Namespace, config: Config) -> LocalBroker:
    overrides = {
        f"broker__{name}": value
        for name, value in (
            ("port", args.port),
            ("controller_port", args.controller_port),
            ("data_dir", args.data_dir),
        )
        if value is not None
    }
    if overrides:
        config = config.replace(**overrides)
    return LocalBroker(config.broker, progress=_progress, secure=getattr(args, "secure", False))


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _start(args: argparse.Namespace, config: Config) -> int:
    broker = _broker(args, config)
    bootstrap = broker.start()
    if broker.pki is not None:
        # The application user may use this deployment's topics and groups, nothing else.
        create_acls(broker.admin_settings(), app_acls(config, f"User:{APP_USER}"))
        env = client_env(broker.pki, bootstrap)
        path = broker.pki.directory / "client.env"
        path.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
        _progress(
            f"ACLs for User:{APP_USER}: topics {config.kafka.user_events_topic}, ... and "
            f"{config.worker.app_id}-*, groups {config.worker.app_id}* and stream-knn-*; its "
            f"client settings: {path} (set -a; . {path})"
        )
    print(bootstrap, flush=True)
    return 0


def _stop(args: argparse.Namespace, config: Config) -> int:
    _broker(args, config).stop()
    return 0


def _status(args: argparse.Namespace, config: Config) -> int:
    status = _broker(args, config).status()
    if not status.running:
        print(f"stopped\nbootstrap: {status.bootstrap}\nlog: {status.log_path}")
        return EXIT_NOT_RUNNING
    print(f"running\npid: {status.pid}\nbootstrap: {status.bootstrap}\nlog: {status.log_path}")
    return 0
