"""Kafka producer: records in, messages to Kafka, delivery reports counted.

`produce()` and `poll(0)` are called on the trio thread (both non-blocking), by the task that
cut the batch (`KafkaSink.offer`, from a connection's task: no task hop, docs/performance.md §7).
Delivery reports are served by `poll(0)` after every batch and, while messages are in flight, by
a reaper task every millisecond; with nothing in flight it sleeps on an event. (A poller thread
blocking in `poll()` was measured 3.5x slower here: every delivery callback takes the GIL from
the trio thread, and the two threads ping-pong it.) A full local queue (BufferError) becomes
backpressure: `offer` returns what it took, the caller waits in `put` for room, and the
WebSocket reader slows instead of memory growing. A permanently failed message is logged,
counted and dead-lettered. On end of input (`run_producer`) the producer is flushed (bounded by
`flush_timeout_s`) and a per-topic summary of accepted/delivered/failed is kept for the log.
With a spool (marketd/ingest/spooling.py) the sink keeps every record until it is acknowledged
(`unacked`, by produce sequence number), so the spooling stage can make them durable when Kafka
stops answering, and records librdkafka gives up on (message.timeout.ms) are collected in
`returned` for the spool instead of being dead-lettered.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import confluent_kafka
import msgspec
import trio

from marketd.ingest.batch import Batch
from marketd.ingest.decode import dlq_record
from marketd.logs import Throttle, get_logger
from marketd.metrics import FastCounter, FastHistogramCollector, MetricsFactory
from marketd.spool import SpoolEntry

log = get_logger(__name__)
_encode = msgspec.json.Encoder().encode

# Delivery errors meaning "librdkafka gave the message back unsent (or gave up waiting)": with a
# spool these go to disk and are replayed; without one they are delivery failures. (Purges happen
# only in `abandon`, once the spool holds everything: a request on the wire may still be written
# by the broker, so purging in flight earlier would publish twice.)
_RETURNED: frozenset[int] = frozenset(
    {
        confluent_kafka.KafkaError._PURGE_QUEUE,
        confluent_kafka.KafkaError._PURGE_INFLIGHT,
        confluent_kafka.KafkaError._MSG_TIMED_OUT,
    }
)


# `produce()`'s partition argument for "let librdkafka's partitioner choose" (RD_KAFKA_PARTITION_UA,
# the default when the argument is left out).
_ANY_PARTITION: Final = -1

RunBlocking = Callable[[Callable[[], Any]], Awaitable[Any]]
# Stands in for the accepted counter when a batch was counted before (never registered).
_UNCOUNTED = FastCounter("uncounted", "records counted as accepted elsewhere", "topic")


async def _in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@attrs.define
class ProduceStats:
    """Per-topic counts for metrics and the shutdown summary."""

    accepted: FastCounter
    delivered: FastCounter
    failed: FastCounter
    latency: FastHistogramCollector  # receipt -> delivery ack, seconds
    returned: FastCounter  # given back unsent by librdkafka, for the spool

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
            m.fast_counter(
                "kafka_returned", "records librdkafka gave back unsent, moved to the spool", "topic"
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
        clock: Callable[[], float] = time.monotonic,
        run_blocking: RunBlocking | None = None,
    ) -> None:
        self._producer = producer_factory({**settings, "error_cb": self._on_error})
        self._clock = clock
        # Blocking librdkafka calls (metadata, flush) run in worker threads; a test with a
        # scripted producer on virtual time passes an inline runner instead.
        self.run_blocking: RunBlocking = run_blocking or _in_thread
        # Outage signals read by the spooling stage: when an ack last came (or the queue last
        # went from empty to busy), and whether librdkafka reported every broker down.
        self.progress_at = clock()
        self.brokers_down = False
        # For the health watch: when Kafka last acknowledged a record (clock), and the last
        # client-level error librdkafka reported ("Connect to ... failed: Connection refused").
        self.acked_at: float | None = None
        self.last_error: str | None = None
        # With a spool (see `track`): records not yet acknowledged, by produce sequence number;
        # those librdkafka gave up on; and a hook told of every resolution (seq, delivered),
        # which answers True when it took care of a failed record itself.
        self.unacked: dict[int, Any] | None = None
        self.returned: list[tuple[int, SpoolEntry]] | None = None
        self.on_resolved: Callable[[int, bool], bool] | None = None
        self._seq = 0  # produce order of every message handed to librdkafka
        self._abandoned = False  # everything still in librdkafka is in the spool (`abandon`)
        self.dlq_topic = dlq_topic
        self.stats = stats
        self.flush_timeout_s = flush_timeout_s
        self.dlq_max_raw_bytes = dlq_max_raw_bytes
        self._in_flight = trio.Event()  # set when something was produced since the last drain
        self._throttle = Throttle(60.0)
        self._latency = stats.latency.labels()
        self.backpressure_waits = 0

    # -- delivery reports (trio thread; the flush thread at shutdown) ------------------------

    def _on_error(self, err: confluent_kafka.KafkaError) -> None:
        code = err.code()
        if code == confluent_kafka.KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        self.last_error = err.str()
        suppressed = self._throttle.should_log(f"error:{code}", time.monotonic())
        if suppressed is not None:
            log.warning(
                "kafka.error", error=err.str(), fatal=err.fatal(), suppressed_since_last=suppressed
            )

    def track(self, on_resolved: Callable[[int, bool], bool]) -> None:
        """Keep every record until acknowledged, and report each resolution (the spool's use)."""
        self.unacked = {}
        self.returned = []
        self.on_resolved = on_resolved

    def _on_delivery(
        self,
        topic: str,
        recv_ns: int,
        seq: int,
        err: confluent_kafka.KafkaError | None,
        msg: Any,
    ) -> None:
        # One call per delivery report (served by poll() on the trio thread, or by the flush
        # thread at shutdown). The topic is bound in at produce time rather than asked of the
        # report (each `msg.topic()` builds a new string in C); docs/performance.md §3.
        if self._abandoned:
            return  # purged by `abandon`: kept in the spool, not a failure
        unacked = self.unacked
        if unacked is not None:
            unacked.pop(seq, None)
        hook = self.on_resolved
        if err is None:
            delivered = self.stats.delivered.values  # FastCounter.inc, inlined
            delivered[topic] = delivered.get(topic, 0) + 1
            self._latency.observe((time.time_ns() - recv_ns) / 1e9)
            self.progress_at = self.acked_at = self._clock()
            self.brokers_down = False
            if hook is not None:
                hook(seq, True)
            return
        if self.returned is not None and self.is_returned(err):
            self.stats.returned.inc(topic)
            if hook is None or not hook(seq, False):
                self.returned.append(
                    (
                        seq,
                        SpoolEntry(topic, msg.key(), msg.value() or b"", recv_ns, msg.headers()),
                    )
                )
            return
        self.delivery_failed(msg, err)
        if hook is not None:
            hook(seq, True)  # dead-lettered: handled, nothing to send again

    def is_returned(self, err: confluent_kafka.KafkaError) -> bool:
        """Given back unsent (purged or timed out): safe to send again, not a failure."""
        return err.code() in _RETURNED

    def delivered_replay(self, topic: str) -> None:
        """A spooled record was acknowledged (no latency sample: it waited out an outage)."""
        self.stats.delivered.inc(topic)
        self.progress_at = self.acked_at = self._clock()
        self.brokers_down = False

    def delivery_failed(self, msg: Any, err: confluent_kafka.KafkaError) -> None:
        """Kafka refused `msg` for good: count, log (throttled) and dead-letter it."""
        topic = msg.topic()
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

    def produce_now(self, batch: Batch, *, counted: bool = False) -> int:
        """Hand records of `batch` to librdkafka, in order, until its local queue is full;
        returns how many it took (all of them unless BufferError). Never waits: the ingest
        path calls it from the connection task that decoded the batch (docs/performance.md §7).
        `counted`: the records were counted as accepted already (the spooling stage)."""
        producer = self._producer
        produce = producer.produce
        counts = (_UNCOUNTED if counted else self.stats.accepted).values
        report = self._on_delivery
        partial = functools.partial
        if not len(producer):
            self.progress_at = self._clock()  # idle until now: the ack clock starts here
        seq = self._seq
        unacked = self.unacked
        taken = 0
        try:
            for out in batch:
                # Positional arguments (partition -1: librdkafka's partitioner) and headers only
                # when the record has some: keyword parsing measured ~0.3 us per call
                # (docs/performance.md §3).
                topic = out.topic
                if out.headers is None:
                    produce(
                        topic,
                        out.value,
                        out.key,
                        _ANY_PARTITION,
                        partial(report, topic, out.recv_ns, seq),
                    )
                else:
                    produce(
                        topic,
                        out.value,
                        out.key,
                        _ANY_PARTITION,
                        partial(report, topic, out.recv_ns, seq),
                        headers=out.headers,
                    )
                if unacked is not None:
                    unacked[seq] = out
                seq += 1
                taken += 1
                counts[topic] = counts.get(topic, 0) + 1  # FastCounter.inc, inlined
        except BufferError:
            pass  # local queue full: the caller waits for room (`room`), then offers the rest
        finally:
            self._seq = seq
        producer.poll(0)
        self._in_flight.set()
        return taken

    # The ingest path's sink protocol (marketd/ingest/intake.py): `offer` now, `put` to wait.
    offer = produce_now

    async def put(self, rest: Batch) -> int:
        """`offer` did not take `rest` (queue full): wait for room. Takes nothing itself (the
        caller offers again), so a cancellation here loses nothing."""
        await self.room()
        return 0

    async def produce_batch(
        self,
        batch: Batch,
        give_up: Callable[[], object] | None = None,
        *,
        counted: bool = False,
    ) -> Batch:
        """Hand `batch` to librdkafka, waiting for room when its queue is full; returns the part
        not handed over (only when `give_up()` turned true while waiting: the caller spools
        it). `counted`: the records were counted as accepted already (the spooling stage)."""
        while batch:
            taken = self.produce_now(batch, counted=counted)
            if taken == len(batch):
                break
            batch = batch[taken:]
            # Local queue full: Kafka is slower than we read. Wait for room; upstream then slows
            # the reader (backpressure, not a drop).
            with trio.CancelScope(shield=True):  # never leave a batch half-produced
                room = await self.room(give_up)
            if not room:
                return batch
        await trio.lowlevel.checkpoint()
        return []

    def produce_spooled(self, entry: SpoolEntry, on_delivery: Callable[..., None]) -> None:
        """Send one spooled record again (raises BufferError when the local queue is full)."""
        if not len(self._producer):
            self.progress_at = self._clock()
        self._producer.produce(
            entry.topic, entry.value, entry.key, on_delivery=on_delivery, headers=entry.headers
        )
        self._in_flight.set()

    async def room(self, give_up: Callable[[], object] | None = None) -> bool:
        """Wait until librdkafka's queue has room again; False when `give_up()` turned true."""
        # Whichever limit was hit (messages or kbytes), wait until a tenth of the queue has been
        # delivered before retrying, so we do not spin on BufferError one message at a time.
        self.backpressure_waits += 1
        target = int(len(self._producer) * 0.9)
        delay = 0.001
        while len(self._producer) > target:
            self._producer.poll(0)
            if give_up is not None and give_up():
                return False
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return True

    def poll(self) -> int:
        """Serve waiting delivery reports now (trio thread)."""
        served: int = self._producer.poll(0)
        return served

    def take_returned(self) -> list[tuple[int, SpoolEntry]]:
        """Records given back since the last call, with their sequence numbers, in produce order
        (reports of different partitions come interleaved)."""
        if not self.returned:
            return []
        taken, self.returned = self.returned, []
        taken.sort(key=lambda r: r[0])
        return taken

    def abandon(self) -> None:
        """Drop everything librdkafka still holds, in flight included: the caller has it in the
        spool (or has given up on it), and a retry from this producer later (a component
        restart keeps the process) would publish it a second time."""
        self._abandoned = True
        self._producer.purge(in_queue=True, in_flight=True, blocking=True)
        self._producer.poll(0)

    def close(self) -> None:
        """Abandon, then destroy the producer now: its delivery callbacks and error_cb refer back
        to this sink, a cycle through C that the garbage collector cannot break, so without
        this it would live on with its connections."""
        if self._producer is not None:
            self.abandon()
            self._producer = None

    def take_unacked(self) -> list[tuple[int, Any]]:
        """Every record handed to librdkafka and not resolved yet, in produce order."""
        if not self.unacked:
            return []
        return sorted(self.unacked.items())

    async def probe(self, timeout_s: float) -> bool:
        """Does a broker answer a metadata request within `timeout_s`? (worker thread)"""

        producer = self._producer  # close() may drop it while an abandoned probe still runs

        def ask() -> bool:
            if producer is None:
                return False
            try:
                producer.list_topics(timeout=timeout_s)
            except confluent_kafka.KafkaException:
                return False
            return True

        ok: bool = await self.run_blocking(ask)
        return ok

    def ack_age_s(self) -> float | None:
        """Seconds since Kafka last acknowledged a record; None before the first (health)."""
        return None if self.acked_at is None else self._clock() - self.acked_at

    def in_flight(self) -> int:
        return len(self._producer)

    async def flush(self, timeout_s: float | None = None) -> int:
        """Flush in a thread, bounded; returns how many messages were still undelivered."""
        remaining: int = await self.run_blocking(
            functools.partial(
                self._producer.flush, self.flush_timeout_s if timeout_s is None else timeout_s
            )
        )
        return remaining


async def run_producer(
    batches_rx: trio.MemoryReceiveChannel[Batch],
    sink: KafkaSink,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Produce every batch until the channel closes, then flush and stop the poller. (In the
    daemon the connections' tasks call `sink.offer` themselves and the channel carries no batch:
    its closing is the end of input.)"""
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
