"""The settings of every Kafka client, from ``[kafka]``: librdkafka's and Faust's.

Secrets are read here, when a client is made (``*_file`` settings at that moment, so a
rotated Kubernetes Secret is picked up by the next client), and go nowhere but into the
client's settings.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from stream_knn.config import KafkaConfig, read_secret
from stream_knn.errors import ConfigError

__all__ = [
    "Connection",
    "access_denied",
    "faust_settings",
    "kafka_config",
    "librdkafka_settings",
    "ssl_context",
    "verify_connection",
]

logger = logging.getLogger(__name__)

#: Where to connect: the ``[kafka]`` settings, or a bare bootstrap address (PLAINTEXT).
Connection = KafkaConfig | str

#: How long :func:`verify_connection` waits for a broker that does not answer at all
#: before leaving the retries to the clients (a refusal is reported at once).
_VERIFY_TIMEOUT_S = 20.0
_VERIFY_POLL_S = 1.0
#: librdkafka's own log lines of the check: none, its errors are reported as one message.
_QUIET = 0

#: Broker answers that mean the principal lacks an ACL.
_DENIED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


def kafka_config(connection: Connection) -> KafkaConfig:
    """``connection`` as ``[kafka]`` settings (a bare address means PLAINTEXT)."""
    if isinstance(connection, KafkaConfig):
        return connection
    return KafkaConfig(bootstrap_servers=connection)


def librdkafka_settings(connection: Connection) -> dict[str, Any]:
    """``bootstrap.servers`` and the security settings of a confluent-kafka client.

    Examples
    --------
    >>> librdkafka_settings("127.0.0.1:9092")
    {'bootstrap.servers': '127.0.0.1:9092'}
    >>> from stream_knn.config import Secret
    >>> s = librdkafka_settings(KafkaConfig(bootstrap_servers="b:9093",
    ...     security_protocol="SASL_PLAINTEXT", sasl_username="app",
    ...     sasl_password=Secret("pw")))
    >>> s["security.protocol"], s["sasl.mechanism"], s["sasl.username"]
    ('sasl_plaintext', 'SCRAM-SHA-512', 'app')
    """
    kafka = kafka_config(connection)
    settings: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers}
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return settings
    settings["security.protocol"] = protocol.lower()
    if protocol.startswith("SASL_"):
        settings["sasl.mechanism"] = kafka.sasl_mechanism
        settings["sasl.username"] = kafka.sasl_username
        settings["sasl.password"] = read_secret(
            "kafka.sasl_password", kafka.sasl_password, kafka.sasl_password_file
        )
    if protocol in ("SSL", "SASL_SSL"):
        if kafka.ssl_ca_file is not None:
            settings["ssl.ca.location"] = str(kafka.ssl_ca_file)
        if kafka.ssl_cert_file is not None and kafka.ssl_key_file is not None:
            settings["ssl.certificate.location"] = str(kafka.ssl_cert_file)
            settings["ssl.key.location"] = str(kafka.ssl_key_file)
            password = _key_password(kafka)
            if password:
                settings["ssl.key.password"] = password
        settings["ssl.endpoint.identification.algorithm"] = (
            "https" if kafka.ssl_check_hostname else "none"
        )
    return settings


def ssl_context(kafka: KafkaConfig) -> ssl.SSLContext:
    """The TLS context of Faust's (aiokafka's) connections: the CA file (else the
    system's CAs), the client certificate for mutual TLS, the hostname check."""
    try:
        context = ssl.create_default_context(
            cafile=None if kafka.ssl_ca_file is None else str(kafka.ssl_ca_file)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"kafka.ssl_ca_file = {str(kafka.ssl_ca_file)!r} is not valid; valid values: a PEM "
            f"file of CA certificates ({exc})"
        ) from None
    if kafka.ssl_cert_file is not None and kafka.ssl_key_file is not None:
        try:
            context.load_cert_chain(
                str(kafka.ssl_cert_file), str(kafka.ssl_key_file), _key_password(kafka) or None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"kafka.ssl_cert_file / kafka.ssl_key_file are not valid; valid values: a PEM "
                f"certificate and its private key (and kafka.ssl_key_password for an encrypted "
                f"key) ({exc})"
            ) from None
    context.check_hostname = kafka.ssl_check_hostname
    return context


def faust_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` of a Faust app (its consumer, producer and
    topic admin all use them)."""
    import faust

    settings: dict[str, Any] = {"broker": f"kafka://{kafka.bootstrap_servers}"}
    protocol = kafka.security_protocol
    tls = ssl_context(kafka) if protocol in ("SSL", "SASL_SSL") else None
    if protocol.startswith("SASL_"):
        settings["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=read_secret(
                "kafka.sasl_password", kafka.sasl_password, kafka.sasl_password_file
            ),
            ssl_context=tls,
            mechanism=kafka.sasl_mechanism,
        )
    elif tls is not None:
        settings["broker_credentials"] = faust.SSLCredentials(tls)
    return settings


def _key_password(kafka: KafkaConfig) -> str:
    return read_secret(
        "kafka.ssl_key_password", kafka.ssl_key_password, kafka.ssl_key_password_file
    )


def access_denied(err: KafkaError, kafka: KafkaConfig, what: str) -> str | None:
    """The message for a broker's refusal of ``what`` (e.g. ``"reading topic x"``) for
    lack of an ACL, or None when ``err`` is another error."""
    if err.code() not in _DENIED:
        return None
    who = f"user {kafka.sasl_username!r}" if kafka.sasl_username else "this client's principal"
    return (
        f"Kafka at {kafka.bootstrap_servers} denied {what} to {who}: {err.str()}; an operator "
        "must grant the ACL (kafka-acls --add --allow-principal User:...)"
    )


def verify_connection(connection: Connection, timeout_s: float = _VERIFY_TIMEOUT_S) -> None:
    """Stop at once when the broker refuses these settings: wrong SASL credentials, a
    mechanism it does not enable, a certificate that does not verify either way.

    PLAINTEXT is not checked (nothing to refuse). A broker that does not answer at all is
    waited for up to ``timeout_s``, then left to the clients' own retries (as without
    security): only a refusal is an error here.

    Raises
    ------
    ConfigError
        Naming the setting to check (``kafka.sasl_password``, ``kafka.ssl_ca_file``, ...).
    """
    kafka = kafka_config(connection)
    if kafka.security_protocol == "PLAINTEXT":
        return
    errors: list[KafkaError] = []
    settings: dict[str, Any] = {
        **librdkafka_settings(kafka),
        "error_cb": errors.append,
        "log_level": _QUIET,
    }
    admin = AdminClient(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=_VERIFY_POLL_S)
        except KafkaException as exc:
            errors.append(exc.args[0])
        else:
            return
        admin.poll(0)  # serves error_cb: the refusal itself, not the timeout it caused
        for err in errors:
            problem = _refusal(err, kafka)
            if problem is not None:
                raise ConfigError(problem)
        errors.clear()
        if time.monotonic() >= deadline:
            logger.warning(
                "Kafka at %s did not answer within %.0f s; going on (the clients retry)",
                kafka.bootstrap_servers,
                timeout_s,
            )
            return


def _refusal(err: KafkaError, kafka: KafkaConfig) -> str | None:
    """What the operator should check when ``err`` is a refusal of the settings."""
    text = err.str()
    at = f"Kafka at {kafka.bootstrap_servers}"
    if err.code() == KafkaError.UNSUPPORTED_SASL_MECHANISM:
        return (
            f"{at} does not enable kafka.sasl_mechanism = {kafka.sasl_mechanism!r}: {text}; "
            "valid values: the mechanisms the broker lists in sasl.enabled.mechanisms"
        )
    if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        if kafka.security_protocol.startswith("SASL_"):
            return (
                f"{at} refused the credentials of kafka.sasl_username = "
                f"{kafka.sasl_username!r} (kafka.sasl_mechanism = {kafka.sasl_mechanism!r}): "
                f"{text}; check kafka.sasl_password (or kafka.sasl_password_file) and the "
                "mechanism the broker enables"
            )
        return f"{at} refused this client: {text}; check kafka.ssl_cert_file and kafka.ssl_key_file"
    # A refused client certificate arrives as an alert after the handshake: a transport
    # error whose text is OpenSSL's.
    if err.code() == KafkaError._SSL or "SSL routines" in text or "SSL alert" in text:
        if "verif" in text:
            return (
                f"the TLS handshake with {at} failed: {text}; kafka.ssl_ca_file = "
                f"{str(kafka.ssl_ca_file)!r} must hold the CA that signed the broker's "
                "certificate (and the certificate must name the host, or set "
                "kafka.ssl_check_hostname = false)"
            )
        if "alert" in text and "certificate" in text:
            return (
                f"the TLS handshake with {at} failed: {text}; the broker refused this "
                "client's certificate (or its absence): check kafka.ssl_cert_file and "
                "kafka.ssl_key_file (a certificate its CA signed)"
            )
        return (
            f"the TLS handshake with {at} failed: {text}; check kafka.ssl_ca_file, and "
            "kafka.ssl_cert_file / kafka.ssl_key_file if the broker asks for a client "
            "certificate"
        )
    return None
