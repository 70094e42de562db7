"""The producer stage with the Kafka-outage spool, against a mock cluster in a child process that
the tests freeze (SIGSTOP) and thaw: records go to the spool while the broker hangs, come back in
order when it answers, and a spool left by a stopped stage is replayed by the next one first.

These need a broker the test can hang, so they always use the mock cluster child (with
MARKETD_TEST_KAFKA set they still do: a shared real broker cannot be paused from here).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import confluent_kafka
import pytest
import trio

from marketd.config import SpoolConfig
from marketd.ingest.decode import Outgoing
from marketd.ingest.produce import KafkaSink, ProduceStats
from marketd.ingest.spooling import SpoolingProducer
from marketd.kafka.tail import trade_tail
from marketd.metrics import MetricsFactory
from marketd.spool import Spool, SpoolEntry
from marketd.testing.kafka_cluster import KafkaClusterProcess

pytestmark = [pytest.mark.kafka]

KEYS = [f"K{i}" for i in range(6)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaClusterProcess]:
    with KafkaClusterProcess() as c:
        yield c


_SINKS: list[KafkaSink] = []


@pytest.fixture(autouse=True)
def _close_sinks() -> Iterator[None]:
    yield
    while _SINKS:
        _SINKS.pop().close()  # no producer outlives its test (and its cluster)


@pytest.fixture
def topic() -> str:
    return f"spooled-{uuid.uuid4().hex[:8]}"


class Seq:
    """Trades numbered per key (the key is the symbol), so order, gaps and duplicates can be
    checked per key; a spool left behind is de-duplicated against the topic by trade id."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.next = dict.fromkeys(KEYS, 0)

    def batch(self, n: int) -> list[Outgoing]:
        out = []
        for i in range(n):
            key = KEYS[i % len(KEYS)]
            value = json.dumps({"symbol": key, "trade_id": self.next[key]}).encode()
            out.append(Outgoing(self.topic, key.encode(), value, 0))
            self.next[key] += 1
        return out


def make_stage(
    cluster: KafkaClusterProcess, spool: Spool, topic: str, **spool_cfg: object
) -> SpoolingProducer:
    metrics = MetricsFactory()
    read = functools.partial(
        trade_tail, {"bootstrap.servers": cluster.bootstrap_servers}, topic, timeout_s=10
    )

    async def read_tail() -> dict[str, int]:
        return await trio.to_thread.run_sync(read)

    sink = KafkaSink(
        {
            "bootstrap.servers": cluster.bootstrap_servers,
            "linger.ms": 0,
            "enable.idempotence": True,
            "socket.nagle.disable": True,
        },
        dlq_topic="dlq-unused",
        stats=ProduceStats.create(metrics),
        flush_timeout_s=5.0,
    )
    _SINKS.append(sink)
    cfg = SpoolConfig(**{"outage_after_s": 1.0, "probe_interval_s": 0.2, **spool_cfg})  # type: ignore[arg-type]
    return SpoolingProducer(
        sink,
        spool,
        cfg,
        trades_topic=topic,
        read_tail=read_tail,
        replay_deadline_s=10.0,
        metrics=metrics,
    )


def open_spool(path: Path, max_bytes: int = 64 << 20) -> Spool:
    spool = Spool(path, max_bytes, min(max_bytes, 1 << 20))
    spool.open()
    return spool


def read_topic(cluster: KafkaClusterProcess, topic: str, expect: int) -> dict[str, list[int]]:
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": cluster.bootstrap_servers,
            "group.id": f"t-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([topic])
    seen: dict[str, list[int]] = {k: [] for k in KEYS}
    got = 0
    deadline = time.monotonic() + 30
    settle: float | None = None
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    continue
                trade = json.loads(msg.value())
                seen[trade["symbol"]].append(trade["trade_id"])
                got += 1
            if got >= expect:
                settle = settle or time.monotonic() + 1.0
                if time.monotonic() > settle:
                    break
    finally:
        consumer.close()
    return seen


def assert_complete(seen: dict[str, list[int]], seq: Seq) -> None:
    for key in KEYS:
        got, want = seen[key], list(range(seq.next[key]))
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want)
            )
            raise AssertionError(
                f"{key}: {len(got)} records, want 0..{len(want) - 1} in order; from index "
                f"{first}: {got[max(0, first - 3) : first + 12]}"
            )


async def wait_until(pred: object, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # type: ignore[operator]
            await trio.sleep(0.02)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_outage_spools_and_replays_in_order(
    cluster: KafkaClusterProcess, topic: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    seq = Seq(topic)
    spool = open_spool(tmp_path / "spool")
    stage = make_stage(cluster, spool, topic)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](8)
    done = trio.Event()

    async def run() -> None:
        await stage.run(batches_rx)
        done.set()

    nursery.start_soon(run)
    with trio.fail_after(60):
        for _ in range(10):
            await batches_tx.send(seq.batch(60))
            await trio.sleep(0.01)
        cluster.pause()
        try:
            for _ in range(40):
                await batches_tx.send(seq.batch(60))
                await trio.sleep(0.02)
            await wait_until(lambda: stage.spooling and spool.pending > 0)
            for _ in range(10):  # still coming in while Kafka hangs: spooled behind the rest
                await batches_tx.send(seq.batch(60))
        finally:
            cluster.resume()
        await wait_until(lambda: not stage.spooling)
        for _ in range(10):  # live again
            await batches_tx.send(seq.batch(60))
        await batches_tx.aclose()
        await done.wait()
    assert spool.pending == 0
    assert list((tmp_path / "spool").iterdir()) == []
    total = sum(seq.next.values())
    stats = stage.sink.stats
    assert stats.accepted.get(topic) == total
    assert stats.delivered.get(topic) == total
    assert_complete(read_topic(cluster, topic, total), seq)


async def test_a_spool_left_behind_goes_out_before_new_records(
    cluster: KafkaClusterProcess, topic: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    seq = Seq(topic)
    left = open_spool(tmp_path / "spool")
    left.append(SpoolEntry(o.topic, o.key, o.value, o.recv_ns) for o in seq.batch(3000))
    left.close()  # the stage of an earlier run stopped with these undelivered

    spool = open_spool(tmp_path / "spool")
    assert spool.pending == 3000
    stage = make_stage(cluster, spool, topic)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](8)
    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            await inner.start(stage.run, batches_rx)
            assert stage.spooling  # replaying the backlog first
            for _ in range(20):
                await batches_tx.send(seq.batch(50))
            await batches_tx.aclose()
    assert spool.pending == 0
    total = sum(seq.next.values())
    assert_complete(read_topic(cluster, topic, total), seq)


async def test_shutdown_during_an_outage_keeps_the_records_for_the_next_start(
    cluster: KafkaClusterProcess, topic: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    seq = Seq(topic)
    spool = open_spool(tmp_path / "spool")
    stage = make_stage(cluster, spool, topic)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](8)
    with trio.fail_after(60):
        await batches_tx.send(seq.batch(100))
        async with trio.open_nursery() as inner:
            inner.start_soon(stage.run, batches_rx)
            await wait_until(lambda: stage.sink.stats.delivered.get(topic) == 100)
            cluster.pause()
            try:
                for _ in range(30):
                    await batches_tx.send(seq.batch(50))
                    await trio.sleep(0.02)
                await wait_until(lambda: stage.spooling)
                await batches_tx.aclose()  # SIGTERM: the stage drains while Kafka still hangs
            except BaseException:
                cluster.resume()
                raise
        retained = spool.pending
        spool.close()
        assert retained > 0
        cluster.resume()  # what the first producer had on the wire may be written now

        again = open_spool(tmp_path / "spool")
        assert again.pending == retained
        second = make_stage(cluster, again, topic)
        tx2, rx2 = trio.open_memory_channel[list[Outgoing]](8)
        async with trio.open_nursery() as inner:
            await inner.start(second.run, rx2)
            assert second.spooling
            await wait_until(lambda: not second.spooling)
            await tx2.aclose()
    assert again.pending == 0
    total = sum(seq.next.values())
    assert_complete(read_topic(cluster, topic, total), seq)


async def test_a_full_spool_stops_taking_batches(
    cluster: KafkaClusterProcess, topic: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    seq = Seq(topic)
    spool = open_spool(tmp_path / "spool", max_bytes=1 << 20)
    stage = make_stage(cluster, spool, topic)
    batches_tx, batches_rx = trio.open_memory_channel[list[Outgoing]](2)
    big = 2000  # ~2 KB values: the 1 MiB spool holds ~500 of them
    nursery.start_soon(stage.run, batches_rx)
    cluster.pause()
    try:
        with trio.fail_after(30):
            await batches_tx.send(seq.batch(1))
            await wait_until(lambda: stage.spooling)
            blocked = False
            for _ in range(200):
                batch = [o._replace(value=o.value + b" " * big) for o in seq.batch(10)]
                with trio.move_on_after(2) as scope:
                    await batches_tx.send(batch)
                if scope.cancelled_caught:
                    blocked = True  # backpressure: the channel is full, nothing was dropped
                    break
            assert blocked
            assert spool.size_bytes <= spool.max_bytes
    finally:
        cluster.resume()
    with trio.fail_after(30):
        await wait_until(lambda: not stage.spooling)
