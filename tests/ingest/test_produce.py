"""The producer stage against a fake confluent_kafka.Producer (no broker): backpressure,
delivery failures to the DLQ, flush on drain, and cancellation never hanging."""

from __future__ import annotations

import json
import threading
from typing import Any

import trio

from marketd.ingest.decode import Outgoing
from marketd.ingest.produce import KafkaSink, ProduceStats, run_producer


class FakeError:
    def __init__(self, text: str) -> None:
        self.text = text

    def str(self) -> str:
        return self.text

    def code(self) -> int:
        return -1

    def retriable(self) -> bool:
        return False


class FakeMsg:
    def __init__(self, topic: str, value: bytes, key: bytes | None) -> None:
        self._t, self._v, self._k = topic, value, key

    def topic(self) -> str:
        return self._t

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes | None:
        return self._k


class FakeProducer:
    """Queue of at most `capacity`; poll() delivers everything queued (failing `fail_topic`)."""

    def __init__(self, capacity: int = 10, fail_topic: str | None = None) -> None:
        self.capacity = capacity
        self.fail_topic = fail_topic
        self.queue: list[tuple[FakeMsg, Any]] = []
        self.produced: list[FakeMsg] = []
        self.headers: list[Any] = []  # per produce() call: the headers argument
        self.lock = threading.Lock()
        self.buffer_errors = 0
        self.deliver = threading.Event()
        self.deliver.set()

    def __len__(self) -> int:
        return len(self.queue)

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: Any = None,  # librdkafka's `callback`, its fifth positional parameter
        headers: Any = None,
    ) -> None:
        with self.lock:
            if len(self.queue) >= self.capacity:
                self.buffer_errors += 1
                raise BufferError("queue full")
            self.headers.append(headers)
            self.queue.append((FakeMsg(topic, value, key), on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if not self.deliver.wait(timeout):
            return 0
        with self.lock:
            batch, self.queue = self.queue, []
        for msg, cb in batch:
            self.produced.append(msg)
            if cb is not None:
                cb(FakeError("broker said no") if msg.topic() == self.fail_topic else None, msg)
        return len(batch)

    def flush(self, timeout: float = 0) -> int:
        # Like librdkafka: serve callbacks until the queue (including what they produce) is empty.
        for _ in range(10):
            if not self.poll(0):
                break
        return len(self.queue)


def sink_with(fake: FakeProducer) -> KafkaSink:
    return KafkaSink(
        {},
        dlq_topic="dlq",
        stats=ProduceStats.create(None),
        producer_factory=lambda _settings: fake,
    )


def out(i: int, topic: str = "t") -> Outgoing:
    return Outgoing(topic, b"BTCUSDT", json.dumps({"i": i}).encode(), 0)


async def test_full_local_queue_is_backpressure_not_loss() -> None:
    fake = FakeProducer(capacity=5)
    sink = sink_with(fake)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_producer, batches_rx, sink)
            async with batches_tx:
                for b in range(20):
                    await batches_tx.send([out(b * 10 + i) for i in range(10)])
    assert fake.buffer_errors > 0  # the queue did fill up
    values = [json.loads(m.value())["i"] for m in fake.produced if m.topic() == "t"]
    assert values == list(range(200))  # all delivered, in order
    assert sink.stats.summary()["t"] == {"accepted": 200, "delivered": 200, "failed": 0}


async def test_permanent_failure_goes_to_the_dlq() -> None:
    fake = FakeProducer(capacity=100, fail_topic="bad")
    sink = sink_with(fake)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_producer, batches_rx, sink)
            async with batches_tx:
                await batches_tx.send([out(1, "bad"), out(2, "good")])
    dlq = [json.loads(m.value()) for m in fake.produced if m.topic() == "dlq"]
    assert len(dlq) == 1 and dlq[0]["reason"] == "delivery_failed"
    assert json.loads(dlq[0]["raw"]) == {"i": 1} and dlq[0]["stream"] == "bad"
    assert sink.stats.failed.get("bad") == 1 and sink.stats.delivered.get("good") == 1


async def test_cancellation_does_not_hang_on_the_poller_thread() -> None:
    fake = FakeProducer()
    fake.deliver.clear()  # poll() blocks for its whole timeout, like an idle librdkafka
    sink = sink_with(fake)
    _tx, batches_rx = trio.open_memory_channel[list[Outgoing]](1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_producer, batches_rx, sink)
            nursery.cancel_scope.cancel()


def test_delivery_reports_count_per_topic_and_headers_go_only_with_records_that_have_them() -> None:
    fake = FakeProducer(capacity=10)
    sink = sink_with(fake)
    backfilled = Outgoing("t", b"BTCUSDT", b"{}", 0, [("marketd-backfill", b"1")])
    assert sink.produce_now([out(1), backfilled, out(2, topic="u")]) == 3
    fake.flush()
    assert fake.headers == [None, [("marketd-backfill", b"1")], None]
    assert sink.stats.accepted.values == {"t": 2, "u": 1}
    assert sink.stats.delivered.values == {"t": 2, "u": 1}
    assert sink.stats.latency.labels().count == 3
