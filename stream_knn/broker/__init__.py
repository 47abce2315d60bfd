"""The local single-node Apache Kafka broker that ``stream-knn broker`` runs."""

from __future__ import annotations

from stream_knn.broker.local import BrokerStatus, LocalBroker, server_properties

__all__ = ["BrokerStatus", "LocalBroker", "server_properties"]
