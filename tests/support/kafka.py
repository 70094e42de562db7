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
        self,
        topics: Iterable[str],
        *,
        expect: int | None = None,
        timeout_s: float = 30.0,
        settle_s: float = 0.5,
    ) -> list[confluent_kafka.Message]:
        """Every message of `topics`, read by partition from the beginning to the end.

        With `expect`, keeps reading until that many arrived (or timeout), then `settle_s` more
        to catch duplicates beyond the expected count.
        """
        consumer = self.consumer()
        try:
            partitions = []
            for topic in topics:
                md = consumer.list_topics(topic, timeout=10).topics[topic]
                if (
                    md.error is not None
                    and md.error.code() != confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART
                ):
                    raise confluent_kafka.KafkaException(md.error)
                partitions += [
                    confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                    for p in md.partitions
                ]
            consumer.assign(partitions)
            out: list[confluent_kafka.Message] = []
            deadline = time.monotonic() + timeout_s
            settle_until: float | None = None
            while time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.1):
                    if msg.error():
                        if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                            continue
                        raise confluent_kafka.KafkaException(msg.error())
                    out.append(msg)
                if expect is None:
                    if self._at_end(consumer, partitions):
                        break
                elif len(out) >= expect:
                    settle_until = settle_until or time.monotonic() + settle_s
                    if time.monotonic() >= settle_until:
                        break
            return out
        finally:
            consumer.close()

    @staticmethod
    def _at_end(
        consumer: confluent_kafka.Consumer, partitions: list[confluent_kafka.TopicPartition]
    ) -> bool:
        positions = consumer.position(partitions)
        for tp in positions:
            low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            if high > low and (tp.offset < 0 or tp.offset < high):
                return False
        return True


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
