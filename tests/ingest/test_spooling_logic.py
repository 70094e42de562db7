"""The spooling producer's bookkeeping against a scripted producer, on virtual time: out-of-order
acknowledgements, a second outage in the middle of a replay, and what a rewind sends again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka
import trio
import trio.testing

from marketd.config import SpoolConfig
from marketd.ingest.decode import Outgoing
from marketd.ingest.intake import Outbox
from marketd.ingest.produce import KafkaSink, ProduceStats
from marketd.ingest.spooling import SpoolingProducer
from marketd.metrics import MetricsFactory
from marketd.spool import Spool, SpoolEntry


class Msg:
    def __init__(self, topic: str, value: bytes, key: bytes | None, headers: Any) -> None:
        self._t, self._v, self._k, self._h = topic, value, key, headers

    def topic(self) -> str:
        return self._t

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes | None:
        return self._k

    def headers(self) -> Any:
        return self._h


class ScriptedProducer:
    """Holds every produced message until the test says what happens to it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.up = True
        self.auto_ack = True  # deliver everything at the next poll while up
        self.held: list[tuple[Msg, Callable[..., None]]] = []
        self.ready: list[tuple[Callable[..., None], Any, Msg]] = []
        self.written: list[bytes] = []  # what "Kafka" has, in order

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: Callable[..., None] | None = None,  # librdkafka's positional `callback`
        **kw: Any,
    ) -> None:
        assert on_delivery is not None
        self.held.append((Msg(topic, value, key, kw.get("headers")), on_delivery))

    def __len__(self) -> int:
        return len(self.held) + len(self.ready)

    def deliver(self, pick: Callable[[Msg], bool] = lambda m: True) -> None:
        keep = []
        for msg, cb in self.held:
            if pick(msg):
                self.written.append(msg.value())
                self.ready.append((cb, None, msg))
            else:
                keep.append((msg, cb))
        self.held = keep

    def poll(self, timeout: float = 0) -> int:
        if self.up and self.auto_ack:
            self.deliver()
        ready, self.ready = self.ready, []
        for cb, err, msg in ready:
            cb(err, msg)
        return len(ready)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        err = confluent_kafka.KafkaError(confluent_kafka.KafkaError._PURGE_QUEUE)
        self.ready += [(cb, err, msg) for msg, cb in self.held]
        self.held = []

    def give_up(self) -> None:
        """message.timeout.ms ran out for everything held."""
        err = confluent_kafka.KafkaError(confluent_kafka.KafkaError._MSG_TIMED_OUT)
        self.ready += [(cb, err, msg) for msg, cb in self.held]
        self.held = []

    def list_topics(self, timeout: float = -1) -> object:
        if not self.up:
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(confluent_kafka.KafkaError._TIMED_OUT)
            )
        return object()

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return len(self)


async def inline(fn: Callable[[], Any]) -> Any:
    await trio.lowlevel.checkpoint()
    return fn()


def stage(tmp_path: Path) -> tuple[SpoolingProducer, ScriptedProducer, Spool]:
    made: list[ScriptedProducer] = []

    def factory(settings: dict[str, Any]) -> ScriptedProducer:
        made.append(ScriptedProducer(settings))
        return made[0]

    metrics = MetricsFactory()
    sink = KafkaSink(
        {},
        dlq_topic="dlq",
        stats=ProduceStats.create(metrics),
        producer_factory=factory,
        clock=trio.current_time,
        run_blocking=inline,
    )
    spool = Spool(tmp_path, 1 << 24, 1 << 20)
    spool.open()
    cfg = SpoolConfig(outage_after_s=1.0, probe_interval_s=0.5, replay_window=100)
    producer = SpoolingProducer(sink, spool, cfg, metrics=metrics, clock=trio.current_time)
    return producer, made[0], spool


def records(prefix: str, n: int, key: bytes = b"A") -> list[Outgoing]:
    return [Outgoing("t", key, f"{prefix}{i}".encode(), 0) for i in range(n)]


async def test_live_outage_spools_then_replays_once_each(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sp, kafka, spool = stage(tmp_path)
    tx, rx = trio.open_memory_channel[list[Outgoing]](4)
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run, rx)
        await tx.send(records("a", 5))
        await trio.sleep(0.1)
        assert kafka.written == [f"a{i}".encode() for i in range(5)]
        kafka.up = False
        await tx.send(records("b", 5))
        await trio.sleep(2)  # no ack for longer than outage_after_s
        assert sp.spooling and spool.pending == 5  # shadows of what librdkafka still holds
        await tx.send(records("c", 5))
        await trio.sleep(1)
        assert spool.pending == 10
        kafka.up = True
        await trio.sleep(2)
        assert not sp.spooling and spool.pending == 0
        await tx.send(records("d", 2))
        await tx.aclose()
    want = [
        f"{p}{i}".encode() for p, n in (("a", 5), ("b", 5), ("c", 5), ("d", 2)) for i in range(n)
    ]
    assert kafka.written == want


async def test_a_second_outage_mid_replay_resends_only_what_was_given_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sp, kafka, spool = stage(tmp_path)
    # A spool left by an earlier run: two keys (two partitions in real Kafka).
    spool.append(
        SpoolEntry("t", key, f"{key.decode()}{i}".encode(), 0)
        for i in range(20)
        for key in (b"A", b"B")
    )
    kafka.auto_ack = False
    tx, rx = trio.open_memory_channel[list[Outgoing]](4)
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run, rx)
        await trio.sleep(0.6)  # the probe finds Kafka; the replay sends all 40
        assert len(kafka.held) == 40
        # Partition A is acknowledged (out of order with B), then B's broker hangs.
        kafka.deliver(lambda m: m.key() == b"A")
        kafka.up = False
        await trio.sleep(2)  # no more acks: a second outage; B's records wait in librdkafka
        assert sp.spooling and not sp.kafka_up
        assert [m.key() for m, _ in kafka.held] == [b"B"] * 20
        kafka.up = kafka.auto_ack = True  # the broker is back
        await trio.sleep(3)
        assert not sp.spooling and spool.pending == 0
        await tx.aclose()
    a = [v for v in kafka.written if v.startswith(b"A")]
    b = [v for v in kafka.written if v.startswith(b"B")]
    assert a == [f"A{i}".encode() for i in range(20)]  # not sent twice after the rewind
    assert b == [f"B{i}".encode() for i in range(20)]


async def test_shutdown_while_kafka_is_down_keeps_the_spool(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sp, kafka, spool = stage(tmp_path)
    tx, rx = trio.open_memory_channel[list[Outgoing]](4)
    kafka.up = False
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sp.run, rx)
            await tx.send(records("a", 3))
            await trio.sleep(2)
            await tx.send(records("b", 3))
            await tx.aclose()
    assert kafka.written == []
    assert spool.pending == 6  # safe on disk for the next start
    assert [e.value for _, e in spool.read()] == [
        *(f"a{i}".encode() for i in range(3)),
        *(f"b{i}".encode() for i in range(3)),
    ]


async def test_originals_librdkafka_gives_up_on_go_out_from_their_shadows(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sp, kafka, spool = stage(tmp_path)
    tx, rx = trio.open_memory_channel[list[Outgoing]](4)
    kafka.up = False
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run, rx)
        await tx.send(records("a", 5))
        await trio.sleep(2)  # outage: shadows of a0..a4 in the spool, originals still held
        await tx.send(records("b", 3))
        await trio.sleep(1)
        assert spool.pending == 8 and len(kafka.held) == 5
        kafka.give_up()  # message.timeout.ms: librdkafka fails the originals
        await trio.sleep(1)
        kafka.up = True
        await trio.sleep(3)
        assert not sp.spooling and spool.pending == 0
        await tx.aclose()
    assert kafka.written == [*(f"a{i}".encode() for i in range(5)), b"b0", b"b1", b"b2"]


async def test_an_original_given_up_after_its_shadow_was_read_is_sent_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sp, kafka, spool = stage(tmp_path)
    tx, rx = trio.open_memory_channel[list[Outgoing]](4)
    kafka.up = False
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run, rx)
        await tx.send(records("a", 3))
        await trio.sleep(2)  # outage: shadows of a0..a2 spooled behind the held originals
        kafka.auto_ack = False
        kafka.up = True  # metadata answers, produce acks do not: the replay reads the shadows
        await trio.sleep(1)
        assert sp.core.stashed == 3  # white-box: the path under test, not the early one
        kafka.up = False
        kafka.give_up()  # the originals fail: their copies go out instead
        kafka.up = kafka.auto_ack = True
        await trio.sleep(3)
        assert not sp.spooling and spool.pending == 0
        await tx.aclose()
    assert kafka.written == [b"a0", b"a1", b"a2"]


async def test_direct_offers_never_overtake_what_the_stage_holds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The ingest path offers every batch from the connection's task (no hop) and hands the stage
    # only what `offer` refuses. Through an outage, the replay and the return to live, records
    # reach Kafka exactly once and in the order they were offered: in particular, not while the
    # stage, live again, still performs the commands before GoLive (a spool ack in a thread).
    sp, kafka, _ = stage(tmp_path)

    async def slow(fn: Callable[[], Any]) -> Any:
        await trio.sleep(0.05)  # spool I/O and probes take time in their threads
        return fn()

    sp.sink.run_blocking = slow
    tx, rx = trio.open_memory_channel[list[Outgoing]](2)
    sp.connect(tx)
    outbox = Outbox(sp, 3)
    sent = 0

    async def feed() -> None:
        nonlocal sent
        while True:
            outbox.add([Outgoing("t", b"A", f"r{sent + i}".encode(), 0) for i in range(2)])
            sent += 2
            await outbox.drain()
            await trio.sleep(0.013)

    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run, rx)
        feeder = trio.CancelScope()

        async def fed() -> None:
            with feeder:
                await feed()

        nursery.start_soon(fed)
        await trio.sleep(0.5)
        kafka.up = False
        await trio.sleep(3)  # an outage: spooling
        assert sp.spooling
        kafka.up = True
        await trio.sleep(3)  # replayed, live again, offers go direct
        assert not sp.spooling
        feeder.cancel()
        await outbox.drain()
        await tx.aclose()
    assert kafka.written == [f"r{i}".encode() for i in range(sent)]
