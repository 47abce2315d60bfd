"""Kafka client settings, built in one place for every client stream-knn runs.

:func:`librdkafka_settings` feeds confluent-kafka (the output producer, ``produce``,
``tail``, ``recommend``, the vector replica, the admin client), :func:`faust_settings`
feeds Faust and its aiokafka clients; both read the same :class:`~stream_knn.config.KafkaConfig`,
so the clients cannot disagree. :func:`verify_connection` turns a broker's refusal of the
credentials or of the TLS handshake into one clear error at start-up.
"""

from stream_knn.kafka.clients import (
    Connection,
    access_denied,
    faust_settings,
    kafka_config,
    librdkafka_settings,
    ssl_context,
    verify_connection,
)

__all__ = [
    "Connection",
    "access_denied",
    "faust_settings",
    "kafka_config",
    "librdkafka_settings",
    "ssl_context",
    "verify_connection",
]
