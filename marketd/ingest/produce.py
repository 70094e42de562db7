"""Kafka producer stage: batches in, messages to Kafka, delivery reports counted.

`produce()` and `poll(0)` are called on the trio thread (both non-blocking). Delivery reports are
served by `poll(0)` after every batch and, while messages are in flight and no batch comes, by a
reaper task every millisecond; with nothing in flight it sleeps on an event. (A poller thread
blocking in `poll()` was measured 3.5x slower here: every delivery callback takes the GIL from
the trio thread, and the two threads ping-pong it.) A full local queue
(BufferError) becomes backpressure: the stage waits for room, the batch channel fills, and the
pipeline slows the WebSocket reader instead of growing memory. A permanently failed message is
logged, counted and dead-lettered. On end of input the producer is flushed (bounded by
`flush_timeout_s`) and a per-topic summary of accepted/delivered/failed is kept for the log.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import attrs
import confluent_kafka
import msgspec
import trio

from marketd.ingest.batch import Batch
from marketd.ingest.decode import dlq_record
from marketd.logs import Throttle, get_logger
from marketd.metrics import FastCounter, FastHistogramCollector, MetricsFactory

log = get_logger(__name__)
_encode = msgspec.json.Encoder().encode


@attrs.define
class ProduceStats:
    """Per-topic counts for metrics and the shutdown summary."""

    accepted: FastCounter
    delivered: FastCounter
    failed: FastCounter
    latency: FastHistogramCollector  # receipt -> delivery ack, seconds

    @classmethod
    def create(cls, metrics: MetricsFactory | None) -> ProduceStats:
        m = metrics or MetricsFactory()
        return cls(
            m.fast_counter("kafka_accepted", "records handed to the Kafka producer", "topic"),
            m.fast_counter("kafka_produced", "records acknowledged by Kafka", "topic"),
            m.fast_counter("kafka_delivery_failed", "records Kafka finally refused", "topic"),
            m.fast_histogram(
                "kafka_delivery_latency_seconds", "frame receipt to Kafka delivery ack"
            ),
        )

    def summary(self) -> dict[str, dict[str, int]]:
        topics = set(self.accepted.values) | set(self.failed.values)
        return {
            t: {
                "accepted": self.accepted.get(t),
                "delivered": self.delivered.get(t),
                "failed": self.failed.get(t),
            }
            for t in sorted(topics)
        }


class KafkaSink:
    """Owns one confluent_kafka.Producer; only `produce_batch` touches it from trio."""

    def __init__(
        self,
        settings: dict[str, Any],
        *,
        dlq_topic: str,
        stats: ProduceStats,
        flush_timeout_s: float = 10.0,
        dlq_max_raw_bytes: int = 8192,
        producer_factory: Callable[[dict[str, Any]], Any] = confluent_kafka.Producer,
    ) -> None:
        self._producer = producer_factory(settings)
        self.dlq_topic = dlq_topic
        self.stats = stats
        self.flush_timeout_s = flush_timeout_s
        self.dlq_max_raw_bytes = dlq_max_raw_bytes
        self._in_flight = trio.Event()  # set when something was produced since the last drain
        self._throttle = Throttle(60.0)
        self._latency = stats.latency.labels()
        self.backpressure_waits = 0

    # -- delivery reports (trio thread; the flush thread at shutdown) ------------------------

    def _on_delivery(self, recv_ns: int, err: confluent_kafka.KafkaError | None, msg: Any) -> None:
        topic = msg.topic()
        if err is None:
            self.stats.delivered.inc(topic)
            self._latency.observe((time.time_ns() - recv_ns) / 1e9)
            return
        self.stats.failed.inc(topic)
        suppressed = self._throttle.should_log(f"delivery:{err.code()}", time.monotonic())
        if suppressed is not None:
            log.error(
                "kafka.delivery_failed",
                topic=topic,
                error=err.str(),
                retriable=err.retriable(),
                suppressed_since_last=suppressed,
            )
        if topic != self.dlq_topic:
            self._dead_letter(msg, err)

    def _dead_letter(self, msg: Any, err: confluent_kafka.KafkaError) -> None:
        record = dlq_record(
            msg.value() or b"",
            "delivery_failed",
            f"{msg.topic()}: {err.str()}",
            msg.topic(),
            int(time.time() * 1000),
            self.dlq_max_raw_bytes,
        )
        try:
            self._producer.produce(self.dlq_topic, _encode(record), msg.key())
        except (BufferError, confluent_kafka.KafkaException) as exc:
            log.error("kafka.dlq_failed", topic=msg.topic(), error=str(exc))

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve delivery reports while messages are in flight and no batch is coming."""
        producer = self._producer
        task_status.started()
        while True:
            await self._in_flight.wait()
            # librdkafka has no awaitable "delivered" signal: poll while anything is in flight.
            while producer.poll(0) or len(producer):  # noqa: ASYNC110
                await trio.sleep(0.001)
            self._in_flight = trio.Event()

    async def produce_batch(self, batch: Batch) -> None:
        producer = self._producer
        accepted = self.stats.accepted
        on_delivery = self._on_delivery
        partial = functools.partial
        for out in batch:
            while True:
                try:
                    producer.produce(
                        out.topic,
                        out.value,
                        out.key,
                        on_delivery=partial(on_delivery, out.recv_ns),
                        headers=out.headers,
                    )
                    break
                except BufferError:
                    # Local queue full: Kafka is slower than we read. Wait for room; the bounded
                    # channels upstream then slow the reader (backpressure, not a drop).
                    await self._wait_for_room()
            accepted.inc(out.topic)
        producer.poll(0)
        self._in_flight.set()
        await trio.lowlevel.checkpoint()

    async def _wait_for_room(self) -> None:
        # Whichever limit was hit (messages or kbytes), wait until a tenth of the queue has been
        # delivered before retrying, so we do not spin on BufferError one message at a time.
        self.backpressure_waits += 1
        target = int(len(self._producer) * 0.9)
        delay = 0.001
        while len(self._producer) > target:
            self._producer.poll(0)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def in_flight(self) -> int:
        return len(self._producer)

    async def flush(self) -> int:
        """Flush in a thread, bounded; returns how many messages were still undelivered."""
        remaining: int = await trio.to_thread.run_sync(
            self._producer.flush, self.flush_timeout_s, abandon_on_cancel=True
        )
        return remaining


async def run_producer(
    batches_rx: trio.MemoryReceiveChannel[Batch],
    sink: KafkaSink,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Produce every batch until the channel closes, then flush and stop the poller."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run_reaper)
        task_status.started()
        async with batches_rx:
            async for batch in batches_rx:
                await sink.produce_batch(batch)
        nursery.cancel_scope.cancel()
    remaining = await sink.flush()
    summary = sink.stats.summary()
    if remaining:
        log.error("kafka.flush_incomplete", undelivered=remaining, timeout_s=sink.flush_timeout_s)
    log.info(
        "kafka.flushed",
        undelivered=remaining,
        **{t: f"{c['accepted']}/{c['delivered']}/{c['failed']}" for t, c in summary.items()},
    )
