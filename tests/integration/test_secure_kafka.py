"""The whole path over a secured broker, as a user runs it: SASL_SSL with SCRAM, mutual
TLS, the standard authorizer with ACLs that allow the deployment's principal its own
topics and groups only; an HTTP token; pseudonymous user ids.

One secured broker serves every test here (the ``secure_kafka`` session fixture)."""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream_knn.broker.secure import APP_USER, Pki, issue_certificate, make_ca
from stream_knn.config import load_config
from stream_knn.events.pseudonym import Pseudonymiser
from tests.integration.conftest import SecureKafka, WorkerEnv, WorkerProcess, free_port

pytestmark = pytest.mark.integration

#: These tests run on the session's secured broker, not the plaintext one.
OWN_BROKER = True

TOKEN = f"http-token-{secrets.token_hex(8)}"
PSEUDONYM_KEY = f"pseudonym-key-{secrets.token_hex(8)}"
SHIPPED_SPECS = Path(__file__).resolve().parents[2] / "topics"
ROLE_OF_SPEC = {
    "user-events": "user_events",
    "item-catalog": "item_catalog",
    "recommendations": "recommendations",
    "recommendation-requests": "requests",
    "events-dlq": "dlq",
}
#: A refused start must end with its message within this many seconds (the issue's bound).
REFUSAL_SECONDS = 30


def _cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_knn.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAM_KNN_")}


def _deployment(secure_kafka: SecureKafka, tmp_path: Path) -> WorkerEnv:
    """A worker deployment on the secured broker as the application user, with an HTTP
    token and pseudonyms, its ACLs granted (its topics are not created yet)."""
    token_file = tmp_path / "http-token"
    token_file.write_text(TOKEN + "\n")
    key_file = tmp_path / "pseudonym-key"
    key_file.write_text(PSEUDONYM_KEY)
    env = WorkerEnv(
        secure_kafka.bootstrap,
        tmp_path / "state",
        client=secure_kafka.client(),
        admin=secure_kafka.admin,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    env.extra = {
        **secure_kafka.env(),
        "STREAM_KNN_WORKER__HTTP_TOKEN_FILE": str(token_file),
        "STREAM_KNN_PRIVACY__PSEUDONYMISE_USER_IDS": "true",
        "STREAM_KNN_PRIVACY__PSEUDONYM_KEY_FILE": str(key_file),
        "STREAM_KNN_EVENTS__DLQ_RAW": "none",
    }
    secure_kafka.grant(load_config(environ=env.env()))
    return env


def _spec_dir(env: WorkerEnv, directory: Path) -> Path:
    """The shipped topic specs, renamed to the deployment's topics."""
    directory.mkdir()
    for path in SHIPPED_SPECS.glob("*.json"):
        spec = orjson.loads(path.read_bytes())
        role = ROLE_OF_SPEC[spec["name"]]
        spec["name"] = env.topics[role]
        (directory / f"{spec['name']}.json").write_bytes(orjson.dumps(spec))
        if role == "user_events":
            # The worker's tables are partitioned as its input (the shipped default, 12).
            env.extra["STREAM_KNN_WORKER__PARTITIONS"] = str(spec["partitions"])
    return directory


def _tail(env: dict[str, str], topic: str, limit: int) -> list[tuple[str, Any]]:
    result = _cli(
        ["tail", topic, "--from-beginning", "--limit", str(limit), "--timeout", "60"], env
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t", 1) for line in result.stdout.splitlines()]
    return [(key, orjson.loads(value)) for key, value in rows]


def _read_all(settings: dict[str, Any], topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of ``topic`` up to its end now."""
    consumer = Consumer({**settings, "group.id": "stream-knn-check", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        out: list[tuple[bytes | None, bytes | None]] = []
        pending = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is None:
                    out.append((message.key(), message.value()))
                    if (message.offset() or 0) + 1 >= ends[message.partition() or 0]:
                        pending.discard(message.partition() or 0)
        assert not pending, f"{topic}: partitions {pending} not read to their end"
        return out
    finally:
        consumer.close()


def _raw_get(env: WorkerEnv, path: str, headers: dict[str, str], body: bytes = b"") -> Any:
    """One GET with exactly these headers (and a body), for what urllib will not send."""
    connection = http.client.HTTPConnection("127.0.0.1", env.web_port, timeout=10)
    try:
        connection.request("GET", path, body=body or None, headers=headers)
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def _wait(condition: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def test_whole_path_over_sasl_ssl_with_least_privilege(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    env = _deployment(secure_kafka, tmp_path)
    cli_env = env.env()
    # Topics, created by the deployment's own principal (its ACLs allow its topics only).
    result = _cli(["topics", "apply", "--dir", str(_spec_dir(env, tmp_path / "specs"))], cli_env)
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("create") for line in result.stdout.splitlines()) == 5

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        users = [f"alice-{env.suffix}-{n}" for n in range(8)]
        now = int(time.time() * 1000)
        events = [
            {
                "user_id": user,
                "item_id": f"item-{(u + j) % 12}",
                "event_type": "view",
                "ts": now + j,
            }
            for u, user in enumerate(users)
            for j in range(6)
        ]
        events_file = tmp_path / "events.jsonl"
        events_file.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
        result = _cli(
            ["produce", "--file", str(events_file), "--topic", env.topics["user_events"]], cli_env
        )
        assert result.returncode == 0, result.stderr
        mallory = f"mallory-{env.suffix}"
        bad = orjson.dumps({"user_id": mallory, "item_id": "   ", "event_type": "view"})
        env.produce("user_events", [(mallory.encode(), bad)])
        # tail, as the deployment's principal: a list per event, under the ids as sent.
        lists = _tail(cli_env, env.topics["recommendations"], len(events))
        assert len(lists) == len(events)
        assert {key for key, _ in lists} == set(users)
        # A request, once the user's events are in: answered from the stored profile.
        request = {"request_id": f"r-{env.suffix}", "user_id": users[0], "k": 3}
        env.produce("requests", [(users[0].encode(), orjson.dumps(request))])
        lists = _tail(cli_env, env.topics["recommendations"], len(events) + 1)
        assert len(lists) == len(events) + 1
        assert {key for key, _ in lists} == set(users)
        assert {value["user_id"] for _, value in lists} == set(users)
        (reply,) = [value for _, value in lists if value.get("request_id") == request["request_id"]]
        assert (reply["user_id"], len(reply["items"]), reply.get("cold_start")) == (
            users[0],
            3,
            None,
        )

        # The dead letter: keyed by the pseudonym, the value left out (events.dlq_raw).
        pseudonym = Pseudonymiser(PSEUDONYM_KEY.encode())
        ((key, letter),) = _tail(cli_env, env.topics["dlq"], 1)
        assert (key, letter["key"], letter["reason"]) == (
            pseudonym.pseudonym(mallory),
            pseudonym.pseudonym(mallory),
            "empty_id",
        )
        assert (letter["raw"], letter["raw_bytes"]) == (None, len(bad))

        _check_http(env, users[0])
        _check_status_command(env, cli_env)

        # At rest, user ids are pseudonyms: the profile changelog, the item updates.
        profiles = _read_all(secure_kafka.admin, f"{env.app_id}-user-profiles-changelog")
        assert {k for k, _ in profiles} == {pseudonym.pseudonym(u).encode() for u in users}
        updates = b"".join(
            v or b"" for _, v in _read_all(secure_kafka.admin, f"{env.app_id}-item-updates")
        )
        assert pseudonym.pseudonym(users[0]).encode() in updates
        assert not [u for u in users if u.encode() in updates]

        # recommend, as the deployment's principal: the profiles found under pseudonyms.
        users_file = tmp_path / "users.txt"
        users_file.write_text(f"{users[0]}\nnobody-{env.suffix}\n")
        result = _cli(["recommend", "--users", str(users_file), "--no-progress"], cli_env)
        assert result.returncode == 0, result.stderr
        known, unknown = (orjson.loads(line) for line in result.stdout.splitlines())
        assert (known["user_id"], known.get("cold_start")) == (users[0], None)
        assert (unknown["user_id"], unknown.get("cold_start")) == (f"nobody-{env.suffix}", True)

        # forget: the profile goes (the changelog's tombstone under the pseudonym).
        env.produce(
            "user_events",
            [(users[1].encode(), orjson.dumps({"user_id": users[1], "event_type": "forget"}))],
        )
        _wait(
            lambda: env.get(f"/recommendations/{users[1]}")[1].get("cold_start"),
            "the forgotten user answered cold",
        )
        tombstones = [
            k
            for k, v in _read_all(secure_kafka.admin, f"{env.app_id}-user-profiles-changelog")
            if v is None
        ]
        assert tombstones == [pseudonym.pseudonym(users[1]).encode()]

        # Nothing the worker wrote or showed holds a secret, nor the ids as sent.
        shown = "".join(str(env.get(path)[1]) for path in ("/", "/status", "/index", "/metrics"))
        written = worker.log_tail(lines=100_000)
        password = secure_kafka.pki.password_file(APP_USER).read_text().strip()
        for secret in (password, TOKEN, PSEUDONYM_KEY):
            assert secret not in shown and secret not in written
        assert not [u for u in [*users, mallory] if u in written]
    finally:
        worker.stop()


def _check_http(env: WorkerEnv, user: str) -> None:
    """The token on every page but /health and /ready; bounded paths, k, query, body."""
    for path in ("/health", "/ready"):
        assert env.get(path, headers={})[0] == 200, path
    for path in (
        "/",
        "/status",
        "/index",
        "/metrics",
        "/dashboard/panels",
        f"/recommendations/{user}",
        "/similar/item-1",
    ):
        assert env.get(path, headers={})[0] == 401, path
        assert env.get(path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
    status, body = env.get(f"/recommendations/{user}?k=3")
    assert (status, body["user_id"], len(body["items"]), body.get("cold_start")) == (
        200,
        user,
        3,
        None,
    )
    _wait(lambda: env.get("/similar/item-1?k=2")[0] == 200, "item-1 replicated")
    assert env.get(f"/recommendations/{user}?k=0")[0] == 400
    assert env.get(f"/recommendations/{user}?k=201")[0] == 400  # serving.max_k = 200
    assert env.get("/recommendations/" + "x" * 257)[0] == 400  # events.max_id_length
    assert env.get("/recommendations/%20%20%20")[0] == 400  # blank, like an event's id
    assert env.get("/similar/item%1B%5B2J")[0] == 400  # a control character
    assert env.get("/status?pad=" + "x" * 2000)[0] == 414
    big = _raw_get(env, "/status", {**env.headers, "Content-Length": "5000"}, b"x" * 5000)
    assert big.status == 413
    connection = http.client.HTTPConnection("127.0.0.1", env.web_port, timeout=10)
    try:  # a body of unknown length
        connection.request(
            "GET", "/status", body=iter([b"x"]), headers=env.headers, encode_chunked=True
        )
        assert connection.getresponse().status == 411
    finally:
        connection.close()
    # The dashboard in a browser: /?token= once, then a cookie (the token leaves the URL).
    signed_in = _raw_get(env, f"/?token={TOKEN}", {})
    assert (signed_in.status, signed_in.getheader("Location")) == (303, "/")
    cookie = signed_in.getheader("Set-Cookie").split(";", 1)[0]
    assert TOKEN not in cookie and "HttpOnly" in signed_in.getheader("Set-Cookie")
    for path in ("/", "/dashboard/panels", "/status"):
        assert _raw_get(env, path, {"Cookie": cookie}).status == 200, path
    assert _raw_get(env, "/?token=wrong", {}).status == 401


def _check_status_command(env: WorkerEnv, cli_env: dict[str, str]) -> None:
    """``stream-knn status`` with the token from the configuration, from --token, none."""
    url = env.url("")
    result = _cli(["status", "--url", url, "--no-members", "--json"], cli_env)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)[0]["ready"]["ready"] is True
    no_token = {k: v for k, v in cli_env.items() if k != "STREAM_KNN_WORKER__HTTP_TOKEN_FILE"}
    result = _cli(["status", "--url", url, "--no-members"], no_token)
    assert result.returncode == 1
    assert "HTTP 401 (the worker wants its token: --token or worker.http_token)" in result.stderr
    result = _cli(["status", "--url", url, "--no-members", "--token", TOKEN], no_token)
    assert result.returncode == 0, result.stderr


def _refused(env: dict[str, str], tmp_path: Path, command: list[str]) -> str:
    """Run ``command`` expecting a refused start: exit 2 with one message, no traceback,
    within :data:`REFUSAL_SECONDS`; returns stderr."""
    env = {
        **env,
        "STREAM_KNN_DATA_DIR": str(tmp_path / "state"),
        "STREAM_KNN_WEB_PORT": str(free_port()),
    }
    result = _cli(command, env, timeout=REFUSAL_SECONDS)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


def test_wrong_password_stops_start_up_with_a_clear_message(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    env = {**_base_env(), **secure_kafka.env(), "STREAM_KNN_KAFKA__SASL_PASSWORD_FILE": str(wrong)}
    for command in (["worker"], ["tail", "recommendations", "--timeout", "5"]):
        stderr = _refused(env, tmp_path, command)
        assert (
            f"stream-knn {command[0]}: error: Kafka at {secure_kafka.bootstrap} refused the credentials of kafka.sasl_username = '{APP_USER}' (kafka.sasl_mechanism = 'SCRAM-SHA-512')"
            in stderr
        )
        assert "check kafka.sasl_password (or kafka.sasl_password_file)" in stderr
        assert "not-the-password" not in stderr


def test_untrusted_ca_stops_start_up_with_a_clear_message(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    other, _ = make_ca(tmp_path, "other-ca", "someone else's CA")
    env = {**_base_env(), **secure_kafka.env(), "STREAM_KNN_KAFKA__SSL_CA_FILE": str(other)}
    stderr = _refused(env, tmp_path, ["worker"])
    assert (
        f"stream-knn worker: error: the TLS handshake with Kafka at {secure_kafka.bootstrap} failed"
        in stderr
    )
    assert (
        f"kafka.ssl_ca_file = '{other}' must hold the CA that signed the broker's certificate"
        in stderr
    )


def test_principal_without_the_acl_cannot_read_recommendations(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    env = _deployment(secure_kafka, tmp_path)
    env.create_topics()
    topic = env.topics["recommendations"]
    secure_kafka.add_user("outsider")
    outsider = {**_base_env(), **secure_kafka.env("outsider")}
    result = _cli(["tail", topic, "--from-beginning", "--timeout", "20"], outsider, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"denied reading topic {topic} to user 'outsider'" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    # Its own principal reads it (an empty topic: the tail ends on silence).
    result = _cli(["tail", topic, "--from-beginning", "--timeout", "3"], env.env(), timeout=60)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    # Nor may the outsider write to the deployment's input.
    events = tmp_path / "events.jsonl"
    events.write_text('{"user_id": "u", "item_id": "i", "event_type": "view"}\n')
    result = _cli(
        ["produce", "--file", str(events), "--topic", env.topics["user_events"]], outsider
    )
    assert result.returncode == 1
    assert "authorization failed" in result.stdout.lower() + result.stderr.lower()


@pytest.mark.parametrize("client", ["SCRAM-SHA-256", "PLAIN", "mutual TLS"])
def test_each_authentication_produces_and_tails(
    secure_kafka: SecureKafka, tmp_path: Path, client: str
) -> None:
    """SCRAM-SHA-512 runs the whole path above; the other mechanisms and mutual TLS carry
    ``produce`` and ``tail`` (the admin client checks the connection first)."""
    topic = f"secure-{client.replace(' ', '-').lower()}-{secrets.token_hex(4)}"
    admin = AdminClient(secure_kafka.admin)
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    if client == "mutual TLS":
        name = f"mtls-{secrets.token_hex(4)}"
        cert, key = issue_certificate(Pki(secure_kafka.pki.directory), name, name)
        env = {
            **_base_env(),
            "STREAM_KNN_BOOTSTRAP_SERVERS": secure_kafka.ssl_bootstrap,
            "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SSL",
            "STREAM_KNN_KAFKA__SSL_CA_FILE": str(secure_kafka.pki.ca_cert),
            "STREAM_KNN_KAFKA__SSL_CERT_FILE": str(cert),
            "STREAM_KNN_KAFKA__SSL_KEY_FILE": str(key),
        }
        principal = f"User:CN={name}"
        # Without a certificate the mutual-TLS listener refuses the client, and says so.
        no_cert = {k: v for k, v in env.items() if "CERT" not in k and "KEY" not in k}
        stderr = _refused(no_cert, tmp_path, ["tail", topic, "--timeout", "5"])
        assert "the TLS handshake with Kafka" in stderr and "kafka.ssl_cert_file" in stderr
    else:
        env = {**_base_env(), **secure_kafka.env(mechanism=client)}
        principal = f"User:{APP_USER}"
    env["STREAM_KNN_KAFKA__RECOMMENDATIONS_TOPIC"] = topic
    secure_kafka.grant(load_config(environ=env), principal)
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(
            f'{{"user_id": "u{n}", "item_id": "i{n}", "event_type": "view"}}\n' for n in range(5)
        )
    )
    result = _cli(["produce", "--file", str(events), "--topic", topic], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent 5, acked 5, failed 0"), result.stdout
    rows = _tail(env, topic, 5)
    assert sorted(key for key, _ in rows) == [f"u{n}" for n in range(5)]
