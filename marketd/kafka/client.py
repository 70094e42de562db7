"""Kafka plumbing: librdkafka config mapping, the embedded mock cluster, error mapping.

Receives the `[kafka]` config; gives out librdkafka property dicts for producers and consumers
pointing at either the configured brokers or the embedded mock cluster (`embedded`), which lives
as long as the `EmbeddedCluster` handle. The only module besides produce/consume that imports
confluent_kafka.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import confluent_kafka

from marketd.config import KafkaConfig
from marketd.errors import KafkaUnavailable
from marketd.logs import get_logger

log = get_logger(__name__)

EMBEDDED = "embedded"


def is_embedded(bootstrap_servers: str) -> bool:
    """Does this `kafka.bootstrap_servers` value ask for the in-process mock cluster?"""
    return bootstrap_servers.strip().lower() == EMBEDDED


def _librdkafka_logger() -> logging.Logger:
    # librdkafka writes to stderr by default; route it through our logs (its own lines carry the
    # facility and client name) so LOG_FORMAT=json stays JSON.
    return logging.getLogger("marketd.librdkafka")


class EmbeddedCluster:
    """librdkafka's in-process Kafka mock cluster: ephemeral, no persistence, ~4-5 MB/partition.

    Topics auto-create (4 partitions) on first use. Other processes (kcat, Spark, a consumer)
    reach it at `bootstrap_servers` while this process runs.
    """

    def __init__(self, brokers: int = 1) -> None:
        self._handle = confluent_kafka.Producer(
            {"test.mock.num.brokers": brokers, "logger": _librdkafka_logger(), "log_level": 3}
        )
        try:
            metadata = self._handle.list_topics(timeout=10)
        except confluent_kafka.KafkaException as exc:
            raise KafkaUnavailable(f"embedded mock cluster did not start: {exc}") from exc
        self.bootstrap_servers = ",".join(
            f"{b.host}:{b.port}" for b in sorted(metadata.brokers.values(), key=lambda b: b.id)
        )

    def close(self) -> None:
        # Dropping the last reference destroys the mock cluster with its client.
        self._handle.flush(0)
        del self._handle

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def producer_settings(cfg: KafkaConfig, bootstrap_servers: str) -> dict[str, Any]:
    """librdkafka producer properties: our defaults, then the `[kafka.producer]` passthrough."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "client.id": "marketd-ingest",
        "enable.idempotence": cfg.idempotence,
        "acks": cfg.acks if not cfg.idempotence else "all",
        "compression.type": cfg.compression,
        "linger.ms": cfg.linger_ms,
        # Local queue bound: BufferError past these turns into backpressure on the pipeline.
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 256 * 1024,
        "message.timeout.ms": 300_000,
        # Latency: do not let Nagle hold small produce requests back on a quiet stream.
        "socket.nagle.disable": True,
        "logger": _librdkafka_logger(),
    }
    if cfg.idempotence and cfg.acks != "all":
        # Idempotence needs acks=all; say so once rather than silently changing semantics.
        log.info(
            "kafka.acks_overridden",
            configured=cfg.acks,
            effective="all",
            reason="enable.idempotence requires acks=all",
        )
    settings.update(cfg.producer)
    return settings


def consumer_settings(
    cfg: KafkaConfig, bootstrap_servers: str, group_id: str, **overrides: Any
) -> dict[str, Any]:
    """librdkafka consumer properties: latency-tuned defaults, then `[kafka.consumer]`."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # docs/performance.md §4 and §7: the default 1 s fetch queue backoff stalls a fast
        # consumer, and the mock broker answers a fetch only when fetch.wait.max.ms expires.
        "fetch.queue.backoff.ms": 10,
        "fetch.wait.max.ms": 5,
        "logger": _librdkafka_logger(),
    }
    settings.update(overrides)
    settings.update(cfg.consumer)
    return settings


def admin_settings(cfg: KafkaConfig, bootstrap_servers: str) -> dict[str, Any]:
    """Admin/metadata client properties: connection and security from the producer table."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "logger": _librdkafka_logger(),
    }
    for key, value in cfg.producer.items():
        if key.startswith(("security.", "sasl.", "ssl.", "client.", "socket.")):
            settings[key] = value
    return settings


def is_retriable(err: confluent_kafka.KafkaError) -> bool:
    return bool(err.retriable()) or err.code() in (
        confluent_kafka.KafkaError._TRANSPORT,
        confluent_kafka.KafkaError._ALL_BROKERS_DOWN,
        confluent_kafka.KafkaError._TIMED_OUT,
    )
