"""The tail of a trade topic: the highest trade id per symbol among its newest records.

Used when a spool left by a crashed run is replayed: a record librdkafka had already written to
a broker when the process died is in both the topic and the spool, and must not be published
twice. Blocking (a confluent_kafka.Consumer by explicit assignment, no group, nothing
committed): run it in a worker thread.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import confluent_kafka

from marketd.errors import KafkaUnavailable
from marketd.records import trade_identity


def trade_tail(
    settings: dict[str, Any], topic: str, *, depth: int = 50_000, timeout_s: float = 15.0
) -> dict[str, int]:
    """Per symbol, the highest trade id in the last `depth` records of every partition.

    Raises KafkaUnavailable when the topic cannot be read to its end within `timeout_s`.
    """
    consumer = confluent_kafka.Consumer(
        {
            **settings,
            "group.id": f"marketd-tail-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        deadline = time.monotonic() + timeout_s
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        except confluent_kafka.KafkaException as exc:
            raise KafkaUnavailable(f"cannot read the tail of {topic}: {exc}") from exc
        if meta.error is not None:
            if meta.error.code() == confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                return {}
            raise KafkaUnavailable(f"cannot read the tail of {topic}: {meta.error}")
        assign: list[confluent_kafka.TopicPartition] = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            if high > low:
                assign.append(confluent_kafka.TopicPartition(topic, p, max(low, high - depth)))
        last: dict[str, int] = {}
        if not assign:
            return last
        consumer.assign(assign)
        open_partitions = {tp.partition for tp in assign}
        while open_partitions:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"reading the tail of {topic} took over {timeout_s:g} s")
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        open_partitions.discard(msg.partition())
                        continue
                    raise KafkaUnavailable(f"cannot read the tail of {topic}: {err}")
                t = trade_identity(msg.value() or b"")
                if t is not None and t.trade_id > last.get(t.symbol, -1):
                    last[t.symbol] = t.trade_id
        return last
    finally:
        consumer.close()
