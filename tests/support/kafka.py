"""Kafka for tests: librdkafka's mock cluster, or a real broker when MARKETD_TEST_KAFKA is set.

Every Kafka test goes through `kafka_bootstrap` (a session fixture in tests/conftest.py), so the
whole suite runs against a real broker with `MARKETD_TEST_KAFKA=host:port pytest -m kafka`.
Topic names are unique per test (`unique_topic`) so a shared real broker needs no cleanup.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable

import confluent_kafka

from marketd.kafka.client import EmbeddedCluster

ENV = "MARKETD_TEST_KAFKA"


class TestKafka:
    """The cluster one test session talks to."""

    __test__ = False

    def __init__(self) -> None:
        real = os.environ.get(ENV, "").strip()
        self._cluster: EmbeddedCluster | None = None
        if real:
            self.bootstrap_servers = real
            self.real = True
        else:
            self._cluster = EmbeddedCluster()
            self.bootstrap_servers = self._cluster.bootstrap_servers
            self.real = False

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()

    def consumer(self, group: str | None = None, **extra: object) -> confluent_kafka.Consumer:
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": group or f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "fetch.queue.backoff.ms": 10,
        }
        conf.update(extra)
        return confluent_kafka.Consumer(conf)

    def producer(self, **extra: object) -> confluent_kafka.Producer:
        conf: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers, "linger.ms": 0}
        conf.update(extra)
        return confluent_kafka.Producer(conf)

    def read_all(
        self, topics: Iterable[str], *, expect: int | None = None, idle_s: float = 2.0,
        timeout_s: float = 30.0,
    ) -> list[confluent_kafka.Message]:
        """Read topics from the beginning until `expect` messages or `idle_s` without any."""
        consumer = self.consumer()
        consumer.subscribe(list(topics))
        out: list[confluent_kafka.Message] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        try:
            while time.monotonic() < deadline:
                batch = consumer.consume(1000, 0.2)
                for msg in batch:
                    if msg.error():
                        if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                            continue
                        if msg.error().code() == confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                            continue
                        raise confluent_kafka.KafkaException(msg.error())
                    out.append(msg)
                if batch:
                    last = time.monotonic()
                if expect is not None and len(out) >= expect:
                    # Linger briefly to catch duplicates beyond the expected count.
                    if time.monotonic() - last > 0.5:
                        break
                elif expect is None and time.monotonic() - last > idle_s:
                    break
        finally:
            consumer.close()
        return out


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
