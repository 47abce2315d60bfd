"""What makes the local broker a secured one: a CA and certificates, SCRAM users, ACLs.

``stream-knn broker start --secure`` and the test fixtures share it. The broker then has
three listeners: ``SASL_SSL`` on ``broker.port`` for clients (SCRAM-SHA-256/512 and PLAIN
over TLS), ``SSL`` with client certificates on ``broker.ssl_port`` (mutual TLS; also the
inter-broker listener) and the controller's, TLS with client certificates too. The
standard KRaft authorizer denies everything no ACL allows; the broker's own certificate
principal and the ``admin`` user are super users.

Files (``<broker.data_dir>/secure``, private to the user): ``ca.pem`` (the CA clients
trust), ``ca.key``, ``broker.pem``/``broker.key``/``broker.p12`` (the broker's TLS
identity, valid for 127.0.0.1 and localhost), ``<user>.password`` for each SCRAM user,
and ``client.env``, the ``STREAM_KNN_KAFKA__*`` settings of the application user.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

# confluent_kafka.admin re-exports these without `as`, which mypy --strict does not accept.
from confluent_kafka.admin import (  # type: ignore[attr-defined,unused-ignore]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from stream_knn.config import Config
from stream_knn.errors import BrokerError

__all__ = [
    "ADMIN_USER",
    "APP_USER",
    "BROKER_PRINCIPAL",
    "Pki",
    "admin_settings",
    "app_acls",
    "client_env",
    "create_acls",
    "issue_certificate",
    "make_ca",
    "secret_file",
    "secure_properties",
    "upsert_users",
]

logger = logging.getLogger(__name__)

#: The super user of a secured local broker, and the application user it grants ACLs.
ADMIN_USER = "admin"
APP_USER = "stream-knn"
#: The broker's certificate subject, its principal on the TLS listeners (a super user).
BROKER_CN = "stream-knn-broker"
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"
#: Groups of ``stream-knn tail`` and ``stream-knn recommend`` (a random suffix each run).
_CLI_GROUP_PREFIX = "stream-knn-"
_SCRAM_ITERATIONS = 8192
_DAYS = 3650
_OPENSSL_MISSING = "openssl not found: install it (apt-get install openssl)"
_ADMIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Pki:
    """The TLS files of a secured broker, in one directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.directory / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.directory / "broker.key"

    @property
    def keystore(self) -> Path:
        """PKCS#12 keystore of the broker's key and certificate chain."""
        return self.directory / "broker.p12"

    @property
    def keystore_password_file(self) -> Path:
        return self.directory / "broker.p12.password"

    def password_file(self, user: str) -> Path:
        return self.directory / f"{user}.password"

    def ensure(self, host: str) -> Pki:
        """Create the CA, the broker's certificate and keystore and the passwords of
        :data:`ADMIN_USER` and :data:`APP_USER` unless they exist."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for user in (ADMIN_USER, APP_USER):
            secret_file(self.password_file(user))
        if not self.ca_cert.exists():
            make_ca(self.directory, "ca", "stream-knn local CA")
        if not self.keystore.exists():
            issue_certificate(self, "broker", BROKER_CN, hosts=(host, "localhost"))
            password = secret_file(self.keystore_password_file)
            _openssl(
                "pkcs12",
                "-export",
                "-in",
                str(self.broker_cert),
                "-inkey",
                str(self.broker_key),
                "-certfile",
                str(self.ca_cert),
                "-name",
                "broker",
                "-out",
                str(self.keystore),
                "-passout",
                f"file:{password}",
            )
        return self


def secret_file(path: Path) -> Path:
    """``path``, holding a random secret (made once, readable by the owner only)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return path


def make_ca(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    """A self-signed CA, ``<name>.pem`` and ``<name>.key`` in ``directory``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        str(_DAYS),
        "-subj",
        f"/CN={subject}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    os.chmod(key, 0o600)
    return cert, key


def issue_certificate(
    pki: Pki, name: str, common_name: str, hosts: Iterable[str] = ()
) -> tuple[Path, Path]:
    """A key and a certificate signed by ``pki``'s CA (``<name>.pem``, ``<name>.key``),
    for a server (``hosts`` as subject alternative names) and a client alike."""
    directory = pki.directory
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    names = [f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts]
    lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
    if names:
        lines.append(f"subjectAltName={','.join(names)}")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={common_name}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_cert),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        str(_DAYS),
        "-extfile",
        str(extensions),
    )
    os.chmod(key, 0o600)
    csr.unlink()
    extensions.unlink()
    return cert, key


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError(_OPENSSL_MISSING)
    result = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {result.stderr.strip()[-400:]}")


def secure_properties(
    host: str, port: int, ssl_port: int, controller_port: int, pki: Pki
) -> list[str]:
    """The ``server.properties`` lines of the secured listeners and the authorizer."""
    keystore_password = pki.keystore_password_file.read_text().strip()
    plain_users = " ".join(
        f'user_{user}="{pki.password_file(user).read_text().strip()}"'
        for user in (ADMIN_USER, APP_USER)
    )
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain = f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
    return [
        f"listeners=SASL_SSL://{host}:{port},SSL://{host}:{ssl_port},"
        f"CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=SASL_SSL://{host}:{port},SSL://{host}:{ssl_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=SSL",
        "listener.security.protocol.map=CONTROLLER:SSL,SSL:SSL,SASL_SSL:SASL_SSL",
        "ssl.keystore.type=PKCS12",
        f"ssl.keystore.location={_escape(pki.keystore)}",
        f"ssl.keystore.password={keystore_password}",
        f"ssl.key.password={keystore_password}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={_escape(pki.ca_cert)}",
        # Certificates on the TLS listeners; SCRAM or PLAIN on the SASL_SSL one.
        "ssl.client.auth=required",
        "listener.name.sasl_ssl.ssl.client.auth=none",
        "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN",
        f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}",
        f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
        f"listener.name.sasl_ssl.plain.sasl.jaas.config={plain}",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        f"super.users={BROKER_PRINCIPAL};User:{ADMIN_USER}",
    ]


def _escape(path: Path) -> str:
    return str(path).replace("\\", "\\\\")


def admin_settings(pki: Pki, host: str, ssl_port: int) -> dict[str, Any]:
    """librdkafka settings of an admin client that is the broker itself (its certificate
    on the mutual-TLS listener: a super user)."""
    return {
        "bootstrap.servers": f"{host}:{ssl_port}",
        "security.protocol": "ssl",
        "ssl.ca.location": str(pki.ca_cert),
        "ssl.certificate.location": str(pki.broker_cert),
        "ssl.key.location": str(pki.broker_key),
        "log_level": 3,
    }


def upsert_users(settings: Mapping[str, Any], users: Mapping[str, str]) -> None:
    """Create (or reset) SCRAM-SHA-256 and -512 credentials of ``users`` (name:
    password) through an admin client with ``settings``."""
    admin = AdminClient(dict(settings))
    # One request per mechanism: a request may alter each user once only.
    for mechanism in (ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512):
        upserts: list[UserScramCredentialAlteration] = [
            UserScramCredentialUpsertion(
                user, ScramCredentialInfo(mechanism, _SCRAM_ITERATIONS), password.encode()
            )
            for user, password in users.items()
        ]
        futures = admin.alter_user_scram_credentials(upserts, request_timeout=_ADMIN_TIMEOUT_S)
        for user, future in futures.items():
            try:
                future.result(timeout=_ADMIN_TIMEOUT_S)
            except KafkaException as exc:
                raise BrokerError(f"cannot set the SCRAM credentials of {user}: {exc}") from None


def app_acls(config: Config, principal: str) -> list[AclBinding]:
    """The ACLs a stream-knn deployment's principal needs, and nothing more.

    Everything on its five topics (``[kafka]``: read and write, create and reconfigure
    with ``topics apply``) and on the worker's internal topics (prefix
    ``<worker.app_id>-``: changelogs, item updates); its consumer groups (prefix
    ``<worker.app_id>``) and those of ``tail`` and ``recommend`` (prefix ``stream-knn-``).
    """
    k, app_id = config.kafka, config.worker.app_id
    topics = (
        k.user_events_topic,
        k.item_catalog_topic,
        k.recommendations_topic,
        k.requests_topic,
        k.dlq_topic,
    )

    def allow(kind: Any, name: str, pattern: Any, operation: Any) -> AclBinding:
        return AclBinding(kind, name, pattern, principal, "*", operation, AclPermissionType.ALLOW)

    acls = [
        allow(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, AclOperation.ALL)
        for topic in topics
    ]
    acls.append(
        allow(ResourceType.TOPIC, f"{app_id}-", ResourcePatternType.PREFIXED, AclOperation.ALL)
    )
    for group in sorted({app_id, _CLI_GROUP_PREFIX}):
        acls.append(
            allow(ResourceType.GROUP, group, ResourcePatternType.PREFIXED, AclOperation.ALL)
        )
    return acls


def client_env(pki: Pki, bootstrap: str, user: str = APP_USER) -> dict[str, str]:
    """The ``STREAM_KNN_*`` settings of a client that is ``user`` on the SASL_SSL listener
    at ``bootstrap`` (SCRAM-SHA-512, the password file, the CA)."""
    return {
        "STREAM_KNN_BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_KNN_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "STREAM_KNN_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAM_KNN_KAFKA__SASL_USERNAME": user,
        "STREAM_KNN_KAFKA__SASL_PASSWORD_FILE": str(pki.password_file(user)),
        "STREAM_KNN_KAFKA__SSL_CA_FILE": str(pki.ca_cert),
    }


def create_acls(settings: Mapping[str, Any], acls: list[AclBinding]) -> None:
    """Add ``acls`` through an admin client with ``settings`` (existing ones stay)."""
    admin = AdminClient(dict(settings))
    for acl, future in admin.create_acls(acls, request_timeout=_ADMIN_TIMEOUT_S).items():
        try:
            future.result(timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            raise BrokerError(f"cannot create the ACL {acl}: {exc}") from None
