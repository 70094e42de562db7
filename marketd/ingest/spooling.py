"""The producer stage with a Kafka-outage spool: batches in, Kafka or the on-disk spool out.

This module is the thin driver: it receives batches, performs the commands of the delivery state
machine (`ingest/delivery.py`, pure: where the bookkeeping and its invariants live) against
librdkafka (through `KafkaSink`) and the spool files, and feeds results and delivery reports back
to it. What the stage does, as a whole:

Batches come from the connections' tasks through `offer` (marketd/ingest/intake.py): while the
state machine is live and the stage's task holds nothing, `offer` hands them to librdkafka at once
(no task hop), which keeps each record until its ack; what `offer` does not take (spooling, or
librdkafka's queue full) goes to the stage's task through its channel (`put`), in order.
When Kafka stops answering (records in flight and no ack for `spool.outage_after_s`, every broker
reported down, librdkafka's queue past `spool.queue_threshold`, or librdkafka giving records up),
the stage appends a copy of every unacknowledged record to the spool (a "shadow": librdkafka still
holds and retries the original), then every later batch, fsync'd per append: from then on a kill -9
loses nothing. A metadata probe finds Kafka back; the spool is replayed in append order behind the
originals (librdkafka keeps produce order per partition), a shadow is sent only if its original
failed, and entries are acked as a contiguous prefix; the stage goes live once the spool is empty. A
full spool stops taking batches: its channel fills, `put` waits, and so do the connections' tasks,
whose WebSocket queues fill (the continuity tracker backfills later what a reader could not take).

A spool left by an earlier run is replayed before any new data. Its trades already in the topic
(a crash can leave a record both written by the broker and spooled) are skipped by comparing
with the topic's tail, so the trade tape stays duplicate-free; other record kinds are at least
once (their consumers de-duplicate by event time and kline identity).

On end of input: live -> flush; whatever Kafka has not acknowledged goes to the spool. Spooling
-> the rest is appended; the replay goes on while Kafka takes it (bounded by kafka.flush_timeout_s,
or until a probe fails when Kafka is down) and what remains stays on disk (`spool.retained`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import confluent_kafka
import trio

from marketd.config import SpoolConfig
from marketd.errors import KafkaUnavailable
from marketd.ingest.batch import Batch
from marketd.ingest.delivery import (
    AckPosition,
    Append,
    Command,
    Delivery,
    GoLive,
    KafkaBack,
    LoadTail,
    OutageReason,
    Outcome,
    Policy,
    Probe,
    Produce,
    Read,
    ReplayStalled,
    Rewind,
    Send,
    SkippedDuplicates,
    StartSpooling,
    Stop,
    TakenOver,
)
from marketd.ingest.produce import KafkaSink
from marketd.logs import get_logger
from marketd.metrics import MetricsFactory
from marketd.records import trade_identity
from marketd.spool import Position, Spool, SpoolEntry, SpoolFull

log = get_logger(__name__)

# librdkafka's queue.buffering.max.messages as set in marketd/kafka/client.py.
DEFAULT_QUEUE_MAX_MESSAGES: Final = 200_000
# How often the live loop looks at the outage signals when no batch comes.
LIVE_CHECK_S: Final = 0.25

TailReader = Callable[[], Awaitable[dict[str, int]]]
Cmd = Command[Position, SpoolEntry]


def spool_trade_tail(spool: Spool, trades_topic: str) -> dict[str, int]:
    """The highest trade id per symbol among the spooled (not yet delivered) trades.

    Read once at start-up (blocking: run it in a thread), then the spool is rewound. The trade
    gate is seeded with it, so trades missed while marketd was down are backfilled.
    """
    last: dict[str, int] = {}
    try:
        for _, entry in spool.replay():
            if entry.topic == trades_topic and (t := trade_identity(entry.value)) is not None:
                last[t.symbol] = max(t.trade_id, last.get(t.symbol, -1))
    finally:
        spool.rewind()
    return last


class SpoolingProducer:
    """Drives one `Delivery` state machine (ingest/delivery.py): receives batches, performs its
    commands against librdkafka (through `KafkaSink`) and the spool files, feeds back the
    results and the delivery reports (see the module docstring)."""

    def __init__(
        self,
        sink: KafkaSink,
        spool: Spool,
        cfg: SpoolConfig,
        *,
        trades_topic: str | None = None,
        topic_tail: dict[str, int] | None = None,
        read_tail: TailReader | None = None,
        replay_deadline_s: float = 10.0,
        queue_max_messages: int = DEFAULT_QUEUE_MAX_MESSAGES,
        metrics: MetricsFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.spool = spool
        # The topic's last trade ids (for skipping a crashed run's spooled trades that reached
        # the topic anyway) come from the pipeline when Kafka answered at start-up, else
        # `read_tail` is asked when the backlog is replayed.
        self.core: Delivery[Position, SpoolEntry] = Delivery(
            Policy(
                outage_after_s=cfg.outage_after_s,
                replay_window=cfg.replay_window,
                queue_limit=max(1, int(queue_max_messages * cfg.queue_threshold)),
                replay_deadline_s=replay_deadline_s,
                trades_topic=trades_topic,
            ),
            topic_tail=topic_tail,
        )
        self.probe_interval_s = cfg.probe_interval_s
        self._read_tail = read_tail
        self._clock = clock
        self._probe_wanted = trio.Event()
        # Batches handed to the stage's task by `put` and not handled yet: while any is, `offer`
        # takes nothing (a batch produced directly would overtake them).
        self._queued = 0
        # True only while the task runs its live loop: in the spooling loop the state machine
        # may already be live (GoLive issued) while its task still performs the commands before
        # it and produces what came in meanwhile; a direct produce then would overtake them.
        self._direct = False
        self._batches_tx: trio.MemorySendChannel[Batch] | None = None
        sink.track(self.core.on_original)
        m = metrics or MetricsFactory()
        self._m_outages = m.counter(
            "kafka_outages", "times the producer switched to the spool", ["reason"]
        )
        self._m_active = m.gauge("spool_active", "1 while accepted records go to the spool")
        self._m_skipped = m.counter(
            "spool_skipped_duplicates", "spooled trades found in the topic already (after a crash)"
        )

    @property
    def spooling(self) -> bool:
        return self.core.spooling

    @property
    def kafka_up(self) -> bool:
        return self.core.kafka_up

    # -- the ingest path's entry (marketd/ingest/intake.py) -------------------------------------

    def connect(self, batches_tx: trio.MemorySendChannel[Batch]) -> None:
        """The send end of the channel `run` receives from, for `put`."""
        self._batches_tx = batches_tx

    def offer(self, batch: Batch) -> int:
        """Called by whichever task cut `batch` (no task hop): while the stage's task is in its
        live loop and holds nothing, produce it at once; returns how many records librdkafka
        took (all unless its queue is full). Otherwise 0: the caller uses `put`."""
        if self._queued or not self._direct or self.core.spooling:
            return 0
        produce = self.core.on_batch(batch)  # live: Produce(batch), the same list
        assert isinstance(produce, Produce) and produce.records is batch
        return self.sink.produce_now(batch)

    async def put(self, rest: Batch) -> int:
        """What `offer` did not take goes to the stage's task (it waits for room in
        librdkafka's queue watching the outage signals, or spools); waits while the channel is
        full (backpressure to the WebSocket). Returns len(rest): the task owns it now (a send
        that is cancelled sends nothing: trio's channels are atomic)."""
        tx = self._batches_tx
        assert tx is not None, "connect() the batch channel first"
        self._queued += 1
        try:
            await tx.send(rest)
        except BaseException:
            self._queued -= 1
            raise
        return len(rest)

    def _handled(self) -> None:
        """The task is done with one batch from its channel."""
        if self._queued:
            self._queued -= 1

    # -- the stage ------------------------------------------------------------------------------

    async def run(
        self,
        batches_rx: trio.MemoryReceiveChannel[Batch],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sink.run_reaper)
            nursery.start_soon(self._probe_loop)
            if self.spool.pending:
                log.warning(
                    "spool.replay_pending",
                    pending=self.spool.pending,
                    size_bytes=self.spool.size_bytes,
                    detail="records spooled by an earlier run go to Kafka before any new data",
                )
            backlog = self.spool.appended if self.spool.pending else 0  # a past run's ordinals
            self._apply_all(self.core.start(self._clock(), backlog=backlog))
            task_status.started()
            async with batches_rx:
                ended = False
                while not ended:
                    if self.core.spooling:
                        ended = await self._run_spooling(batches_rx)
                    else:
                        ended = await self._run_live(batches_rx)
            nursery.cancel_scope.cancel()
        await self._finish()

    async def _run_live(self, batches_rx: trio.MemoryReceiveChannel[Batch]) -> bool:
        """Produce batches until the input ends (True) or Kafka stops taking them (False).

        The outage signals are watched by a sibling task every LIVE_CHECK_S, which cancels the
        receive; the batch loop itself stays as lean as `run_producer`'s (a timed receive per
        batch measured +20 % CPU at 10k msgs/s, where batches are a few records).
        `produce_batch` is safe to cancel: only its last checkpoint is cancellable, after every
        record of the batch was handed over.
        """
        self._direct = True
        try:
            return await self._live_loop(batches_rx)
        finally:
            self._direct = False

    async def _live_loop(self, batches_rx: trio.MemoryReceiveChannel[Batch]) -> bool:
        on_batch = self.core.on_batch
        found: list[OutageReason] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_live, nursery.cancel_scope, found)
            async for batch in batches_rx:
                produce = on_batch(batch)  # live: Produce(batch), the same list
                assert isinstance(produce, Produce) and produce.records is batch
                try:
                    live = await self._produce_live(batch)
                finally:
                    self._handled()  # also when the watcher cancels the final checkpoint
                if not live:
                    nursery.cancel_scope.cancel()
                    return False
            nursery.cancel_scope.cancel()
            return True
        # The watcher found an outage and cancelled the receive.
        self._enter_outage(found[0], [])
        return False

    async def _produce_live(self, batch: Batch, *, counted: bool = False) -> bool:
        """Produce `batch`; False when that showed an outage (entered: the stage spools now)."""
        sink = self.sink
        rest = await sink.produce_batch(batch, self._outage_reason, counted=counted)
        if not (rest or sink.returned):
            return True
        # Queue full past the outage bound, or librdkafka gave up on some records
        # (message.timeout.ms).
        reason = self._outage_reason() or (
            OutageReason.QUEUE_FULL if rest else OutageReason.GAVE_UP
        )
        self._enter_outage(reason, rest, counted=counted)
        return False

    async def _watch_live(self, scope: trio.CancelScope, found: list[OutageReason]) -> None:
        while True:
            await trio.sleep(LIVE_CHECK_S)
            reason = self._outage_reason()
            if reason is not None:
                found.append(reason)
                scope.cancel()
                return

    def _outage_reason(self) -> OutageReason | None:
        sink = self.sink
        return self.core.outage_reason(
            self._clock(),
            in_flight=sink.in_flight(),
            progress_at=sink.progress_at,
            brokers_down=sink.brokers_down,
            returned=len(sink.returned or ()),
        )

    def _enter_outage(self, reason: OutageReason, rest: Batch, *, counted: bool = False) -> None:
        sink = self.sink
        unacked = sink.take_unacked()
        given_up = sink.take_returned()
        if not counted:
            self._accept(rest)
        self._apply_all(
            self.core.on_outage(
                reason, self._clock(), unacked=unacked, given_up=given_up, rest=rest
            )
        )

    async def _run_spooling(self, batches_rx: trio.MemoryReceiveChannel[Batch]) -> bool:
        """Spool batches and replay the spool until it is empty (False: go live) or the input
        ended and the replay is over or cannot go on (True)."""
        core, sink, spool = self.core, self.sink, self.spool
        while True:
            while core.wants_more:  # batches already waiting: one append (one fsync) for all
                try:
                    self._take(batches_rx.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    core.on_input_end()
            late = sink.take_returned()
            if late:
                log.warning("spool.late_returns", records=len(late))
                core.on_returned([entry for _, entry in late])
            sink.poll()
            commands = core.tick(
                self._clock(),
                spool_unread=spool.unread,
                progress_at=sink.progress_at,
            )
            for cmd in commands:
                if isinstance(cmd, Stop):
                    return True
                await self._perform(cmd)
                if isinstance(cmd, GoLive):
                    # What came in since the last append goes to Kafka now (counted on receipt).
                    if cmd.produce:
                        self._queued += 1  # `offer` must not overtake these
                        try:
                            await self._produce_live(list(cmd.produce), counted=True)
                        finally:
                            self._handled()
                    return False
            wait = core.wait_s(spool.unread)
            if not core.takes_batches:
                await trio.sleep(wait)
                continue
            with trio.move_on_after(wait):
                try:
                    self._take(await batches_rx.receive())
                except trio.EndOfChannel:
                    core.on_input_end()

    def _take(self, batch: Batch) -> None:
        self._accept(batch)
        self.core.on_batch(batch)
        self._handled()

    def _accept(self, records: Iterable[Any]) -> None:
        accepted = self.sink.stats.accepted
        for r in records:
            accepted.inc(r.topic)

    # -- performing the core's commands -----------------------------------------------------------

    async def _perform(self, cmd: Cmd) -> None:
        """Perform one command; feed its result back to the core (and perform what follows)."""
        core, spool, blocking = self.core, self.spool, self.sink.run_blocking
        if isinstance(cmd, Append):
            base = await self._append(cmd.records)
            if base is None:
                core.on_full(cmd)
            else:
                core.on_appended(cmd, base)
        elif isinstance(cmd, AckPosition):
            await blocking(functools.partial(spool.ack, cmd.position))
        elif isinstance(cmd, Rewind):
            await blocking(spool.rewind)
        elif isinstance(cmd, Read):
            got = await blocking(functools.partial(spool.read, max_entries=cmd.max_entries))
            for then in core.on_read(got):
                await self._perform(then)
        elif isinstance(cmd, Send):
            self._send(cmd)
        elif isinstance(cmd, LoadTail):
            self._apply_all(core.on_tail(await self._load_tail()))
        else:
            self._apply(cmd)

    def _apply(self, cmd: Cmd) -> None:
        """Perform a command that needs no waiting (logs, metrics, signals)."""
        if isinstance(cmd, Probe):
            self._probe_wanted.set()
        elif isinstance(cmd, StartSpooling):
            self._m_outages.labels(cmd.reason.value).inc()
            self._m_active.set(1)
            if cmd.reason is not OutageReason.BACKLOG:
                log.warning(
                    "spool.outage",
                    reason=cmd.reason.value,
                    in_flight=cmd.in_flight,
                    spool_dir=str(self.spool.dir),
                    detail="Kafka is not taking records: accepted records go to the on-disk spool",
                )
        elif isinstance(cmd, ReplayStalled):
            log.warning(
                "spool.outage",
                reason=OutageReason.NO_ACKS.value,
                in_flight=self.sink.in_flight(),
                detail="Kafka stopped taking the replay",
            )
            self._m_outages.labels(OutageReason.NO_ACKS.value).inc()
        elif isinstance(cmd, KafkaBack):
            self.sink.brokers_down = False
            self.sink.progress_at = self._clock()
            log.info(
                "spool.kafka_back",
                pending=self.spool.pending,
                detail="a broker answers again: replaying the spool",
            )
        elif isinstance(cmd, GoLive):
            log.info(
                "spool.recovered",
                replayed=cmd.replayed,
                outage_s=round(cmd.outage_s, 3),
                detail="spool replayed and empty: records go straight to Kafka again",
            )
            self._m_active.set(0)
        elif isinstance(cmd, TakenOver):
            self._accept(cmd.entries)  # taken over from the spool of an earlier run
        elif isinstance(cmd, SkippedDuplicates):
            self._m_skipped.inc(cmd.count)
        else:
            raise TypeError(f"{cmd!r} needs I/O: perform it with _perform")

    def _apply_all(self, commands: Sequence[Cmd]) -> None:
        for cmd in commands:
            self._apply(cmd)

    async def _probe_loop(self) -> None:
        while True:
            await self._probe_wanted.wait()
            ok = await self.sink.probe(timeout_s=min(2.0, self.core.policy.outage_after_s))
            self._apply_all(self.core.on_probe(ok))
            if ok:
                self._probe_wanted = trio.Event()
            else:
                await trio.sleep(self.probe_interval_s)

    async def _append(self, records: list[Any]) -> int | None:
        """Append durably; the ordinal of the first record, or None when the spool is full
        (the caller keeps the records)."""
        spool = self.spool
        base = spool.appended
        try:
            await self.sink.run_blocking(functools.partial(spool.append, records))
        except SpoolFull as exc:
            if not self.core.full:
                log.error(
                    "spool.full",
                    size_bytes=exc.size_bytes,
                    max_bytes=exc.max_bytes,
                    detail="not taking records until the replay frees room (backpressure)",
                )
            return None
        return base

    def _send(self, cmd: Send[Position, SpoolEntry]) -> None:
        sent = 0
        for pos, entry in cmd.items:
            try:
                self.sink.produce_spooled(entry, functools.partial(self._on_replayed, pos.ordinal))
            except BufferError:
                break  # librdkafka's queue is full: the next tick tries again
            sent += 1
        self.core.on_sent(sent)

    def _on_replayed(self, ordinal: int, err: confluent_kafka.KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery report for a replayed entry (served by `poll`, trio thread)."""
        if err is None:
            self.core.on_replayed(ordinal, Outcome.DELIVERED)
            self.sink.delivered_replay(msg.topic())
        elif self.sink.is_returned(err):
            self.core.on_replayed(ordinal, Outcome.GIVEN_BACK)
        else:
            self.sink.delivery_failed(msg, err)  # dead-lettered: handled, ack it
            self.core.on_replayed(ordinal, Outcome.DEAD_LETTERED)

    async def _load_tail(self) -> dict[str, int] | None:
        """Before replaying a past run's spool: the topic's last trade ids (None: unavailable)."""
        if self._read_tail is None or self.core.policy.trades_topic is None:
            return {}
        try:
            tail = await self._read_tail()
        except KafkaUnavailable as exc:
            log.warning("spool.tail_unavailable", error=str(exc), detail="retrying")
            return None
        log.info("spool.tail_read", symbols=len(tail))
        return tail

    # -- end of input ---------------------------------------------------------------------------

    async def _finish(self) -> None:
        sink, core = self.sink, self.core
        if not core.spooling:
            await sink.flush()
            # Whatever Kafka did not acknowledge is made durable for the next start.
            left = [r for _, r in sorted([*sink.take_unacked(), *sink.take_returned()])]
        else:
            if core.replay_in_flight:  # let what is in flight land, then ack it
                await sink.flush(min(2.0, sink.flush_timeout_s))
                sink.poll()
                ack = core.ack_prefix()
                if ack is not None:
                    await self._perform(ack)
            left = core.leftovers(sink.take_returned())
        if left and await self._append(left) is None:
            log.error("spool.lost_at_shutdown", records=len(left), reason="spool full")
        undelivered = sink.in_flight()
        if self.spool.pending:
            sink.abandon()
        summary = sink.stats.summary()
        if self.spool.pending:
            log.warning(
                "spool.retained",
                pending=self.spool.pending,
                size_bytes=self.spool.size_bytes,
                dir=str(self.spool.dir),
                kafka_in_flight=undelivered,
                detail="Kafka did not take these before shutdown: replayed at the next start",
            )
        log.info(
            "kafka.flushed",
            undelivered=undelivered,
            spooled=self.spool.pending,
            **{t: f"{c['accepted']}/{c['delivered']}/{c['failed']}" for t, c in summary.items()},
        )
