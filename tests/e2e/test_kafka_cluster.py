"""The mock cluster in a child process: paused, it acks nothing; resumed, the waiting produce
is acked and the record is on the topic once."""

from __future__ import annotations

from collections.abc import Iterator

import confluent_kafka
import pytest

from marketd.testing.kafka_cluster import KafkaClusterProcess
from tests.support.kafka import unique_topic

pytestmark = pytest.mark.kafka


@pytest.fixture
def cluster() -> Iterator[KafkaClusterProcess]:
    with KafkaClusterProcess() as c:
        yield c


def produce(producer: confluent_kafka.Producer, topic: str, value: bytes) -> list[object]:
    """Produce one record; the returned list receives its delivery error (None = acked)."""
    reports: list[object] = []
    producer.produce(topic, value, on_delivery=lambda err, _msg: reports.append(err))
    return reports


def test_a_paused_broker_acks_nothing_until_resumed(cluster: KafkaClusterProcess) -> None:
    topic = unique_topic("paused")
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": cluster.bootstrap_servers, "linger.ms": 0}
    )
    # Connected, topic created and leader known before the pause: what follows waits on the
    # broker alone, not on metadata.
    first = produce(producer, topic, b"before")
    assert producer.flush(10) == 0 and first == [None]

    cluster.pause()
    waiting = produce(producer, topic, b"during")
    assert producer.flush(1.0) == 1 and waiting == []

    cluster.resume()
    assert producer.flush(10) == 0 and waiting == [None]

    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": cluster.bootstrap_servers,
            "group.id": unique_topic("reader"),
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in partitions
            ]
        )
        values: list[bytes] = []
        for _ in range(50):
            values += [m.value() for m in consumer.consume(10, 0.1) if not m.error()]
            if len(values) >= 2:
                break
        values += [m.value() for m in consumer.consume(10, 0.3) if not m.error()]
    finally:
        consumer.close()
    assert sorted(values) == [b"before", b"during"]


def test_close_stops_a_paused_cluster() -> None:
    c = KafkaClusterProcess()
    c.pause()
    c.close()
    assert c.returncode == 0 and not c.paused
