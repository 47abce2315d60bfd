"""Kafka security settings: one builder for librdkafka and Faust, secrets kept out of
reprs and config output, bad combinations refused at start-up with the setting named."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from stream_knn.broker.secure import Pki, issue_certificate, make_ca
from stream_knn.config import Config, KafkaConfig, Secret, dump_toml, load_config, read_secret
from stream_knn.errors import ConfigError
from stream_knn.kafka import faust_settings, librdkafka_settings, ssl_context, verify_connection

PASSWORD = "s3cret-pa55word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    make_ca(pki.directory, "ca", "test CA")
    issue_certificate(pki, "broker", "test-broker", hosts=("127.0.0.1", "localhost"))
    issue_certificate(pki, "client", "test-client")
    return pki


def _sasl_ssl(pki: Pki, **changes: object) -> KafkaConfig:
    values: dict[str, object] = {
        "kafka__bootstrap_servers": "127.0.0.1:19093",
        "kafka__security_protocol": "SASL_SSL",
        "kafka__sasl_mechanism": "SCRAM-SHA-256",
        "kafka__sasl_username": "app",
        "kafka__sasl_password": PASSWORD,
        "kafka__ssl_ca_file": pki.ca_cert,
    }
    values.update({f"kafka__{k}": v for k, v in changes.items()})
    return Config().replace(**values).kafka


def test_plaintext_is_just_the_address() -> None:
    assert librdkafka_settings("127.0.0.1:9092") == {"bootstrap.servers": "127.0.0.1:9092"}
    assert librdkafka_settings(KafkaConfig()) == {"bootstrap.servers": "127.0.0.1:9092"}
    assert faust_settings(KafkaConfig()) == {"broker": "kafka://127.0.0.1:9092"}


def test_sasl_ssl_settings_for_librdkafka_and_faust_agree(pki: Pki) -> None:
    kafka = _sasl_ssl(pki)
    assert librdkafka_settings(kafka) == {
        "bootstrap.servers": "127.0.0.1:19093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "app",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(pki.ca_cert),
        "ssl.endpoint.identification.algorithm": "https",
    }
    settings = faust_settings(kafka)
    credentials = settings["broker_credentials"]
    assert settings["broker"] == "kafka://127.0.0.1:19093"
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == (
        "SASL_SSL",
        "SCRAM-SHA-256",
    )
    assert (credentials.username, credentials.password) == ("app", PASSWORD)
    assert credentials.ssl_context.check_hostname
    assert PASSWORD not in repr(credentials)


def test_sasl_plaintext_and_mutual_tls(pki: Pki) -> None:
    plain = Config().replace(
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl_mechanism="PLAIN",
        kafka__sasl_username="app",
        kafka__sasl_password=PASSWORD,
    )
    rd = librdkafka_settings(plain.kafka)
    assert (rd["security.protocol"], rd["sasl.mechanism"]) == ("sasl_plaintext", "PLAIN")
    assert not any(key.startswith("ssl.") for key in rd)
    credentials = faust_settings(plain.kafka)["broker_credentials"]
    assert (credentials.protocol.value, credentials.ssl_context) == ("SASL_PLAINTEXT", None)

    mtls = Config().replace(
        kafka__security_protocol="SSL",
        kafka__ssl_ca_file=pki.ca_cert,
        kafka__ssl_cert_file=pki.directory / "client.pem",
        kafka__ssl_key_file=pki.directory / "client.key",
        kafka__ssl_check_hostname=False,
    )
    rd = librdkafka_settings(mtls.kafka)
    assert rd["security.protocol"] == "ssl"
    assert rd["ssl.certificate.location"] == str(pki.directory / "client.pem")
    assert rd["ssl.key.location"] == str(pki.directory / "client.key")
    assert rd["ssl.endpoint.identification.algorithm"] == "none"
    assert "sasl.username" not in rd
    credentials = faust_settings(mtls.kafka)["broker_credentials"]
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.context.verify_mode == ssl.CERT_REQUIRED
    assert not credentials.context.check_hostname


def test_tls_context_trusts_the_ca_and_presents_the_client_certificate(pki: Pki) -> None:
    """The context Faust gets completes a real handshake with a server of that CA (over a
    socket pair, no network), and a context of another CA refuses it."""
    kafka = (
        Config()
        .replace(
            kafka__security_protocol="SSL",
            kafka__ssl_ca_file=pki.ca_cert,
            kafka__ssl_cert_file=pki.directory / "client.pem",
            kafka__ssl_key_file=pki.directory / "client.key",
        )
        .kafka
    )
    assert _handshake(ssl_context(kafka), pki) == "test-client"

    other = Pki(pki.directory / "other")
    other.directory.mkdir(exist_ok=True)
    make_ca(other.directory, "ca", "another CA")
    untrusted = Config().replace(kafka__security_protocol="SSL", kafka__ssl_ca_file=other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ssl_context(untrusted.kafka), pki)


def _handshake(client_context: ssl.SSLContext, pki: Pki) -> str | None:
    """Handshake ``client_context`` with a server of ``pki``'s broker certificate that
    asks for a client certificate; returns the client certificate's common name."""
    import socket
    import threading

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    server_context.load_cert_chain(
        str(pki.directory / "broker.pem"), str(pki.directory / "broker.key")
    )
    server_context.verify_mode = ssl.CERT_OPTIONAL
    left, right = socket.socketpair()
    peer: list[str | None] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(right, server_side=True) as tls:
                cert = tls.getpeercert()
                subject = dict(item[0] for item in cert["subject"]) if cert else {}
                peer.append(subject.get("commonName"))
        except (ssl.SSLError, OSError):
            peer.append(None)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(left, server_hostname="127.0.0.1"):
            pass
    finally:
        thread.join(10)
    return peer[0]


def test_secrets_never_show_in_reprs_or_in_tune_output(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "STREAM_KNN_KAFKA__SASL_USERNAME": "app",
            "STREAM_KNN_KAFKA__SASL_PASSWORD": PASSWORD,
            "STREAM_KNN_HTTP_TOKEN": "http-token-value",
            "STREAM_KNN_PRIVACY__PSEUDONYMISE_USER_IDS": "true",
            "STREAM_KNN_PRIVACY__PSEUDONYM_KEY": "pseudonym-key-value",
        }
    )
    assert config.kafka.sasl_password.reveal() == PASSWORD
    assert config.worker.http_token == Secret("http-token-value")
    text = dump_toml(config) + repr(config) + str(config) + f"{config.kafka}"
    for secret in (PASSWORD, "http-token-value", "pseudonym-key-value"):
        assert secret not in text
    assert "# sasl_password: a secret, not written; set STREAM_KNN_KAFKA__SASL_PASSWORD" in text
    # What tune writes is a valid config: read back, everything but the secrets is there.
    path = tmp_path / "tuned.toml"
    path.write_text(dump_toml(config))
    env = {"STREAM_KNN_KAFKA__SASL_PASSWORD": PASSWORD, "STREAM_KNN_HTTP_TOKEN": "http-token-value"}
    env["STREAM_KNN_PRIVACY__PSEUDONYM_KEY"] = "pseudonym-key-value"
    assert load_config(path, environ=env) == config


def test_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # a mounted Secret often ends with a line break
    config = Config().replace(
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl_username="app",
        kafka__sasl_password_file=secret,
    )
    assert librdkafka_settings(config.kafka)["sasl.password"] == PASSWORD
    # Read when a client is made: a rotated file is picked up by the next client.
    secret.write_text("rotated")
    assert librdkafka_settings(config.kafka)["sasl.password"] == "rotated"
    secret.unlink()
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password_file = .* is not valid"):
        read_secret("kafka.sasl_password", Secret(), secret)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "TLS"},
            "kafka.security_protocol = 'TLS' is not valid; valid values: 'PLAINTEXT', 'SSL', "
            "'SASL_PLAINTEXT', 'SASL_SSL'",
        ),
        (
            {"STREAM_KNN_KAFKA__SASL_MECHANISM": "GSSAPI"},
            "kafka.sasl_mechanism = 'GSSAPI' is not valid; valid values: 'PLAIN', "
            "'SCRAM-SHA-256', 'SCRAM-SHA-512'",
        ),
        (
            {"STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"},
            "kafka.sasl_username = '' is not valid; valid values: a user name, required with "
            "kafka.security_protocol = 'SASL_SSL'",
        ),
        (
            {
                "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                "STREAM_KNN_KAFKA__SASL_USERNAME": "app",
            },
            "kafka.sasl_password = Secret('') is not valid; valid values: a password (or "
            "kafka.sasl_password_file)",
        ),
        (
            {
                "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                "STREAM_KNN_KAFKA__SASL_USERNAME": "app",
                "STREAM_KNN_KAFKA__SASL_PASSWORD": "x",
                "STREAM_KNN_KAFKA__SASL_PASSWORD_FILE": "/etc/hostname",
            },
            "kafka.sasl_password and kafka.sasl_password_file are both set",
        ),
        (
            {"STREAM_KNN_KAFKA__SASL_USERNAME": "app"},
            "kafka.sasl_username = 'app' is not valid; valid values: unset with "
            "kafka.security_protocol = 'PLAINTEXT'",
        ),
        (
            {"STREAM_KNN_KAFKA__SSL_CA_FILE": "/etc/hostname"},
            "kafka.ssl_ca_file is set but kafka.security_protocol = 'PLAINTEXT' does not use "
            "TLS; valid values of kafka.security_protocol with it: 'SSL', 'SASL_SSL'",
        ),
        (
            {
                "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SSL",
                "STREAM_KNN_KAFKA__SSL_CA_FILE": "/nowhere/ca.pem",
            },
            "kafka.ssl_ca_file = '/nowhere/ca.pem' is not valid; valid values: a readable file",
        ),
        (
            {
                "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SSL",
                "STREAM_KNN_KAFKA__SSL_CERT_FILE": "/etc/hostname",
            },
            "kafka.ssl_cert_file and kafka.ssl_key_file go together",
        ),
        (
            {"STREAM_KNN_PRIVACY__PSEUDONYMISE_USER_IDS": "yes"},
            "privacy.pseudonym_key = Secret('') is not valid; valid values: a secret of at "
            "least 16 characters",
        ),
        (
            {"STREAM_KNN_PRIVACY__PSEUDONYM_KEY": "short"},
            "privacy.pseudonym_key = Secret('***') is not valid; valid values: a secret of at "
            "least 16 characters",
        ),
        (
            {"STREAM_KNN_EVENTS__DLQ_RAW": "partial"},
            "events.dlq_raw = 'partial' is not valid; valid values: 'full', 'truncated', 'none'",
        ),
    ],
)
def test_bad_security_settings_stop_start_up_naming_the_setting(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert message in str(info.value)


def test_verify_connection_leaves_plaintext_alone() -> None:
    # No broker at this address, and nothing is tried: PLAINTEXT cannot be refused.
    verify_connection("127.0.0.1:1", timeout_s=0.0)


def test_verify_connection_goes_on_when_no_broker_answers(pki: Pki) -> None:
    """Silence is not a refusal: the check gives up waiting and leaves the retries to the
    clients (a broker that starts later is still used)."""
    kafka = _sasl_ssl(pki, bootstrap_servers="127.0.0.1:1")
    verify_connection(kafka, timeout_s=0.5)
