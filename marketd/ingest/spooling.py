"""The producer stage with a Kafka-outage spool: batches in, Kafka or the on-disk spool out.

Receives batches from the batcher, like `run_producer`. While Kafka acknowledges, batches go
straight to the producer (live), which keeps each record until its ack. When Kafka stops
answering (records in flight and no ack for `spool.outage_after_s`, every broker reported down,
librdkafka's queue past `spool.queue_threshold`, or librdkafka giving records up), the stage
appends a copy of every unacknowledged record to the spool (a "shadow": librdkafka still holds
and retries the original), then every later batch, fsync'd per append: from then on a kill -9
loses nothing. A metadata probe finds Kafka back; the spool is replayed in append order behind
the originals (librdkafka keeps produce order per partition), a shadow is sent only if its
original failed, and entries are acked as a contiguous prefix; the stage goes live once the
spool is empty. A full spool stops taking batches, so the bounded channels upstream slow the
WebSocket reader (the continuity tracker backfills later what the reader could not take).

A spool left by an earlier run is replayed before any new data. Its trades already in the topic
(a crash can leave a record both written by the broker and spooled) are skipped by comparing
with the topic's tail, so the trade tape stays duplicate-free; other record kinds are at least
once (their consumers de-duplicate by event time and kline identity).

On end of input: live -> flush; whatever Kafka has not acknowledged goes to the spool. Spooling
-> the rest is appended; the replay goes on while Kafka takes it (bounded by kafka.flush_timeout_s,
or until a probe fails when Kafka is down) and what remains stays on disk (`spool.retained`).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import confluent_kafka
import trio

from marketd.config import SpoolConfig
from marketd.errors import KafkaUnavailable
from marketd.ingest.batch import Batch
from marketd.ingest.produce import KafkaSink
from marketd.logs import get_logger
from marketd.metrics import MetricsFactory
from marketd.records import trade_identity
from marketd.spool import Position, Spool, SpoolEntry, SpoolFull

log = get_logger(__name__)

# librdkafka's queue.buffering.max.messages as set in marketd/kafka/client.py.
DEFAULT_QUEUE_MAX_MESSAGES: Final = 200_000
# While spooling, records taken from the batch channel per append (one fsync each).
APPEND_MAX_RECORDS: Final = 5000
# How often the live loop looks at the outage signals when no batch comes.
LIVE_CHECK_S: Final = 0.25
# Replay service interval while spooled records are in flight (delivery reports, acks).
REPLAY_TICK_S: Final = 0.005

TailReader = Callable[[], Awaitable[dict[str, int]]]


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
    """Owns the live/spooling state of one producer stage (see the module docstring)."""

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
        self.outage_after_s = cfg.outage_after_s
        self.probe_interval_s = cfg.probe_interval_s
        self.replay_window = cfg.replay_window
        self.queue_limit = max(1, int(queue_max_messages * cfg.queue_threshold))
        self.replay_deadline_s = replay_deadline_s
        self.trades_topic = trades_topic
        self._read_tail = read_tail
        self._clock = clock
        sink.track(self._on_resolved)
        self.spooling = False
        self.kafka_up = True
        self._probe_wanted = trio.Event()
        self._probes_failed = 0
        self._outage_started = 0.0
        self._full = False  # the last append was refused: take no batches until one succeeds
        # Shadows waiting to be appended: (seq of the original in librdkafka, record).
        self._carry: list[tuple[int, Any]] = []
        # Originals whose shadow is (or is about to be) spooled: seq -> shadow ordinal (None
        # until appended), and what became of those resolved before their shadow was appended.
        self._shadow_of: dict[int, int | None] = {}
        self._early: dict[int, bool] = {}
        self._awaiting: set[int] = set()  # shadow ordinals whose original is unresolved
        # Read shadows, sent if their original fails.
        self._stash: dict[int, tuple[Position, SpoolEntry]] = {}
        # Replay bookkeeping, by spool ordinal (position in append order since open).
        self._outstanding: collections.deque[Position] = collections.deque()  # read, in order
        self._unsent: collections.deque[tuple[Position, SpoolEntry]] = collections.deque()
        self._done: set[int] = set()  # delivered (or dead-lettered, or skipped), not yet acked
        self._given_back: set[int] = set()  # replayed, timed out: sent again after a rewind
        self._backlog_end = spool.appended if spool.pending else 0  # ordinals of a past run
        # The topic's last trade ids, for skipping a crashed run's spooled trades that reached
        # the topic anyway: read at start-up by the pipeline when Kafka answered, else here.
        self._tail: dict[str, int] | None = topic_tail
        self._backlog_counted = 0  # backlog ordinals below this were counted as accepted
        self._sent_in_outage = 0
        m = metrics or MetricsFactory()
        self._m_outages = m.counter(
            "kafka_outages", "times the producer switched to the spool", ["reason"]
        )
        self._m_active = m.gauge("spool_active", "1 while accepted records go to the spool")
        self._m_skipped = m.counter(
            "spool_skipped_duplicates", "spooled trades found in the topic already (after a crash)"
        )

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
                self._start_spooling("backlog")
            task_status.started()
            async with batches_rx:
                ended = False
                while not ended:
                    if self.spooling:
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
        sink = self.sink
        found: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_live, nursery.cancel_scope, found)
            async for batch in batches_rx:
                rest = await sink.produce_batch(batch, self._outage_reason)
                if rest or sink.returned:
                    # Queue full past the outage bound, or librdkafka gave up on some records
                    # (message.timeout.ms).
                    found.append(self._outage_reason() or ("queue_full" if rest else "gave_up"))
                    self._enter_outage(found[0], rest)
                    nursery.cancel_scope.cancel()
                    return False
            nursery.cancel_scope.cancel()
            return True
        # The watcher found an outage and cancelled the receive.
        self._enter_outage(found[0], [])
        return False

    async def _watch_live(self, scope: trio.CancelScope, found: list[str]) -> None:
        while True:
            await trio.sleep(LIVE_CHECK_S)
            reason = self._outage_reason()
            if reason is not None:
                found.append(reason)
                scope.cancel()
                return

    async def _run_spooling(self, batches_rx: trio.MemoryReceiveChannel[Batch]) -> bool:
        """Spool batches and replay the spool until it is empty (False: go live) or the input
        ended and the replay is over or cannot go on (True)."""
        pending: list[Any] = []
        input_done = False
        deadline = float("inf")
        probes_failed_at_end = 0
        while True:
            if self._carry and await self._append_shadows():
                self._carry = []
            if not input_done and not self._full:
                input_done = self._take_waiting(batches_rx, pending)
            late = self.sink.take_returned()
            if late:
                # Given up by librdkafka without a shadow (produced live, failed since): older
                # than what is spooled already, so per-symbol order may break here. Never lost.
                log.warning("spool.late_returns", records=len(late))
                pending[:0] = [entry for _, entry in late]
            if pending and not self._carry and await self._append(pending):
                pending = []
            await self._service_replay()
            drained = not (
                pending or self._carry or self._outstanding or self._unsent or self.spool.pending
            )
            if drained and input_done:
                return True
            if drained and self.kafka_up:
                self._go_live()
                return False
            if input_done and not pending:
                # Draining: replay on while Kafka takes it, within the bound; when it is down,
                # one more failed probe ends the wait (the records are safe on disk).
                if deadline == float("inf"):
                    deadline = self._clock() + self.replay_deadline_s
                    probes_failed_at_end = self._probes_failed
                if self._clock() >= deadline:
                    return True
                if not self.kafka_up and self._probes_failed > probes_failed_at_end:
                    return True
            busy = self.kafka_up and (self._outstanding or self.spool.unread)
            wait = REPLAY_TICK_S if busy else LIVE_CHECK_S
            if input_done or self._full:
                await trio.sleep(wait)
                continue
            with trio.move_on_after(wait):
                try:
                    batch = await batches_rx.receive()
                except trio.EndOfChannel:
                    input_done = True
                else:
                    self._accept(batch)
                    pending.extend(batch)

    # -- outage detection and the switch --------------------------------------------------------

    def _outage_reason(self) -> str | None:
        sink = self.sink
        in_flight = sink.in_flight()
        if not in_flight:
            return None
        idle_s = self._clock() - sink.progress_at
        if sink.brokers_down and idle_s > min(1.0, self.outage_after_s):
            return "brokers_down"
        if in_flight >= self.queue_limit:
            return "queue_full"
        if idle_s > self.outage_after_s:
            return "no_acks"
        return None

    def _start_spooling(self, reason: str) -> None:
        self.spooling = True
        self.kafka_up = False
        self._outage_started = self._clock()
        self._sent_in_outage = 0
        self._m_outages.labels(reason).inc()
        self._m_active.set(1)
        self._probe_wanted.set()

    def _enter_outage(self, reason: str, rest: Batch) -> None:
        sink = self.sink
        unacked = sink.take_unacked()
        log.warning(
            "spool.outage",
            reason=reason,
            in_flight=len(unacked),
            spool_dir=str(self.spool.dir),
            detail="Kafka is not taking records: accepted records go to the on-disk spool",
        )
        self._start_spooling(reason)
        # Shadows of what librdkafka still holds, then what it gave up on, then the unsent rest
        # of the last batch: produce order.
        given_up = sink.take_returned()
        for seq, _ in unacked:
            self._shadow_of[seq] = None
        merged = sorted([*unacked, *given_up], key=lambda r: r[0])
        self._accept(rest)
        self._carry = [*merged, *((-1, r) for r in rest)]

    def _go_live(self) -> None:
        took_s = self._clock() - self._outage_started
        log.info(
            "spool.recovered",
            replayed=self._sent_in_outage,
            outage_s=round(took_s, 3),
            detail="spool replayed and empty: records go straight to Kafka again",
        )
        self.spooling = False
        self._full = False
        self._done.clear()
        self._m_active.set(0)

    async def _probe_loop(self) -> None:
        while True:
            await self._probe_wanted.wait()
            if await self.sink.probe(timeout_s=min(2.0, self.outage_after_s)):
                self._probe_wanted = trio.Event()
                self.kafka_up = True
                self.sink.brokers_down = False
                self.sink.progress_at = self._clock()
                log.info(
                    "spool.kafka_back",
                    pending=self.spool.pending,
                    detail="a broker answers again: replaying the spool",
                )
            else:
                self._probes_failed += 1
                await trio.sleep(self.probe_interval_s)

    def _on_resolved(self, seq: int, delivered: bool) -> bool:
        """An original in librdkafka was acknowledged (or failed for good: True) or given up
        (False). Returns True when a shadow covers a given-up record."""
        if seq not in self._shadow_of:
            return False
        ordinal = self._shadow_of.pop(seq)
        if ordinal is None:  # its shadow is not appended yet
            self._early[seq] = delivered
            return True
        self._awaiting.discard(ordinal)
        if delivered:
            self._done.add(ordinal)
        elif ordinal in self._stash:  # read already: send the copy now
            self._unsent.append(self._stash.pop(ordinal))
        return True

    # -- spool I/O ------------------------------------------------------------------------------

    def _take_waiting(self, batches_rx: trio.MemoryReceiveChannel[Batch], into: list[Any]) -> bool:
        """Move batches already waiting into `into` (bounded); True when the input has ended."""
        while len(into) < APPEND_MAX_RECORDS:
            try:
                batch = batches_rx.receive_nowait()
            except trio.WouldBlock:
                return False
            except trio.EndOfChannel:
                return True
            self._accept(batch)
            into.extend(batch)
        return False

    def _accept(self, records: Iterable[Any]) -> None:
        accepted = self.sink.stats.accepted
        for r in records:
            accepted.inc(r.topic)

    async def _append_shadows(self) -> bool:
        base = self.spool.appended
        if not await self._append([r for _, r in self._carry]):
            return False
        for i, (seq, _) in enumerate(self._carry):
            if seq < 0 or (seq not in self._shadow_of and seq not in self._early):
                continue  # not a shadow (given up already, or the batch rest)
            ordinal = base + i
            early = self._early.pop(seq, None)
            if early is None:
                self._shadow_of[seq] = ordinal
                self._awaiting.add(ordinal)
            elif early:
                self._done.add(ordinal)  # the original got through meanwhile
            # else: the original was given up meanwhile: the shadow is sent like any entry
        return True

    async def _append(self, entries: list[Any]) -> bool:
        """Append durably; False when the spool is full (the caller keeps the records)."""
        try:
            await self.sink.run_blocking(functools.partial(self.spool.append, entries))
        except SpoolFull as exc:
            if not self._full:
                log.error(
                    "spool.full",
                    size_bytes=exc.size_bytes,
                    max_bytes=exc.max_bytes,
                    detail="not taking records until the replay frees room (backpressure)",
                )
                self._full = True
            return False
        self._full = False
        return True

    # -- replay ---------------------------------------------------------------------------------

    async def _ack_prefix(self) -> None:
        """Ack the delivered prefix (what was delivered out of order waits in _done)."""
        acked: Position | None = None
        outstanding = self._outstanding
        while outstanding and outstanding[0].ordinal in self._done:
            acked = outstanding.popleft()
            self._done.discard(acked.ordinal)
        if acked is not None:
            await self.sink.run_blocking(functools.partial(self.spool.ack, acked))

    async def _service_replay(self) -> None:
        sink = self.sink
        sink.poll()
        await self._ack_prefix()
        outstanding = self._outstanding
        if self._given_back:
            if all(
                p.ordinal in self._done
                or p.ordinal in self._given_back
                or p.ordinal in self._awaiting
                for p in outstanding
            ):
                # Every replayed record has its report: read again from the first unacked
                # entry; what was delivered meanwhile stays in _done and is skipped.
                self._given_back.clear()
                outstanding.clear()
                self._unsent.clear()
                self._stash.clear()
                await sink.run_blocking(self.spool.rewind)
            return
        if not self.kafka_up:
            return
        if outstanding and self._clock() - sink.progress_at > self.outage_after_s:
            log.warning(
                "spool.outage",
                reason="no_acks",
                in_flight=sink.in_flight(),
                detail="Kafka stopped taking the replay",
            )
            self.kafka_up = False
            self._m_outages.labels("no_acks").inc()
            self._probe_wanted.set()
            return
        if self._backlog_end and self._tail is None and not await self._load_tail():
            return
        room = self.replay_window - len(outstanding)
        if room > 0 and self.spool.unread:
            got = await sink.run_blocking(functools.partial(self.spool.read, max_entries=room))
            accepted = sink.stats.accepted
            for pos, entry in got:
                outstanding.append(pos)
                o = pos.ordinal
                if self._backlog_counted <= o < self._backlog_end:
                    accepted.inc(entry.topic)  # taken over from the spool of an earlier run
                    self._backlog_counted = o + 1
                if o in self._done:
                    continue
                if o in self._awaiting:
                    self._stash[o] = (pos, entry)
                elif o < self._backlog_end and self._already_in_topic(entry):
                    self._done.add(o)
                else:
                    self._unsent.append((pos, entry))
        self._send_unsent()

    async def _load_tail(self) -> bool:
        """Before replaying a past run's spool: the topic's last trade ids (see module doc)."""
        if self._read_tail is None or self.trades_topic is None:
            self._tail = {}
            return True
        try:
            self._tail = await self._read_tail()
        except KafkaUnavailable as exc:
            log.warning("spool.tail_unavailable", error=str(exc), detail="retrying")
            self.kafka_up = False
            self._probe_wanted.set()
            return False
        log.info("spool.tail_read", symbols=len(self._tail), backlog=self._backlog_end)
        return True

    def _already_in_topic(self, entry: SpoolEntry) -> bool:
        if entry.topic != self.trades_topic or not self._tail:
            return False
        t = trade_identity(entry.value)
        if t is None or t.trade_id > self._tail.get(t.symbol, -1):
            return False
        self._m_skipped.inc()
        return True

    def _send_unsent(self) -> None:
        unsent = self._unsent
        while unsent:
            pos, entry = unsent[0]
            try:
                self.sink.produce_spooled(entry, functools.partial(self._on_replayed, pos.ordinal))
            except BufferError:
                return  # librdkafka's queue is full: the next tick tries again
            unsent.popleft()
            self._sent_in_outage += 1

    def _on_replayed(self, ordinal: int, err: confluent_kafka.KafkaError | None, msg: Any) -> None:
        if err is None:
            self._done.add(ordinal)
            self.sink.delivered_replay(msg.topic())
        elif self.sink.is_returned(err):
            self._given_back.add(ordinal)
        else:
            self.sink.delivery_failed(msg, err)  # dead-lettered: handled, ack it
            self._done.add(ordinal)

    # -- end of input ---------------------------------------------------------------------------

    async def _finish(self) -> None:
        sink = self.sink
        if not self.spooling:
            await sink.flush()
            # Whatever Kafka did not acknowledge is made durable for the next start.
            left = [r for _, r in sorted([*sink.take_unacked(), *sink.take_returned()])]
        else:
            if self._outstanding or self._awaiting:  # let what is in flight land, then ack it
                await sink.flush(min(2.0, sink.flush_timeout_s))
                sink.poll()
                await self._ack_prefix()
            # Shadows cover the originals still unresolved; only the rest needs appending.
            left = [e for s, e in sink.take_returned() if s not in self._shadow_of]
            left += [r for s, r in self._carry]
        if left and not await self._append(left):
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
