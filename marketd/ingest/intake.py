"""What a connection's task does with the frames it read: decode, keep the tape, hand to Kafka.

`TapeIntake.take(messages, ...)` decodes a chunk of frames, runs it through the shared tape
keeper (one `admit` per chunk) and appends the keeper's output to the `Outbox`; `settle()` then
hands the outbox to the sink (`KafkaSink`, or `SpoolingProducer` with the outage spool) in batches
of at most `batch.size`. Keeper calls are synchronous and each is followed, before any await, by
the append to the outbox, so the outbox holds the keeper's output in the keeper's order whichever
task (a connection, the backfill worker, the tick task) made the call; one task at a time drains
it. A record leaves the outbox only once the sink took it: a cancelled task loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from marketd.ingest.backfill import BackfillResult
from marketd.ingest.batch import Batch
from marketd.ingest.decode import Decoder, Frame, Outgoing
from marketd.ingest.tape import Reconnected, TapeKeeper
from marketd.metrics import FastHistogramCollector

# Records the outbox holds before a task that wants to add more waits for the one draining it
# (Kafka slower than the WebSocket: backpressure). About what the frames channel between the
# readers and the decode stage held before (8,192 frames).
OUTBOX_LIMIT = 8192


class Sink(Protocol):
    """Where the outbox hands batches: `KafkaSink` or `SpoolingProducer`."""

    def offer(self, batch: Batch) -> int:
        """Take what can be taken now, in order, without waiting; how many records were taken."""
        ...

    async def put(self, rest: Batch) -> int:
        """`offer` did not take all of it: wait (backpressure); how many of `rest` it took
        (0: offer again). Cancellable without losing anything it did not count as taken."""
        ...


class Outbox:
    """The tape keeper's output on its way to the sink, in keeper order (see module docstring)."""

    def __init__(
        self,
        sink: Sink,
        batch_size: int,
        *,
        limit: int = OUTBOX_LIMIT,
        batch_sizes: FastHistogramCollector | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        self.sink = sink
        self.batch_size = batch_size
        self.limit = limit
        self._pending: list[Outgoing] = []
        self._head = 0  # records before this index were taken by the sink
        self._draining = False
        self._changed = trio.Event()  # the drainer took records, or stopped draining
        self._waiting = 0  # tasks waiting for `_changed`
        self._sizes = batch_sizes.labels() if batch_sizes is not None else None

    def __len__(self) -> int:
        return len(self._pending) - self._head

    def add(self, records: list[Outgoing]) -> None:
        """Append the keeper's output (synchronously, right after the keeper call)."""
        if not records:
            return
        if self._head >= len(self._pending):
            self._pending, self._head = records, 0  # the keeper hands over a fresh list
        else:
            self._pending += records

    def drain_now(self) -> bool:
        """Offer what waits, without waiting: True when nothing is left to wait for (the outbox
        is empty, or another task drains it and it is under its limit)."""
        if self._draining:
            return len(self) < self.limit
        return self._offer_all() is None

    async def drain(self, *, complete: bool = False) -> None:
        """Hand everything to the sink; with another task draining, return at once unless the
        outbox is past its limit (then wait for room: backpressure) or `complete` (the end of
        input: return only once the sink took everything). The fast path (the sink takes
        everything at once) never yields."""
        while len(self):
            if self._draining:
                if len(self) < self.limit and not complete:
                    return
                self._waiting += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= 1
                continue
            if self._offer_all() is None:
                return
            self._draining = True
            try:
                while (rest := self._offer_all()) is not None:
                    self._taken(await self.sink.put(rest))  # cancellable: nothing is lost
            finally:
                self._draining = False
                self._signal()

    def _offer_all(self) -> Batch | None:
        """Offer batch after batch until the sink refuses; the part it did not take, or None."""
        sink, size, sizes = self.sink, self.batch_size, self._sizes
        while len(self):
            pending, head = self._pending, self._head
            batch = pending if head == 0 and len(pending) <= size else pending[head : head + size]
            taken = sink.offer(batch)
            if sizes is not None and taken:
                sizes.observe(taken)
            self._taken(taken)
            if taken < len(batch):
                return batch[taken:]
        return None

    def _taken(self, n: int) -> None:
        """The sink took the first `n` records (never mutates a list the sink was handed)."""
        if not n:
            return
        self._head += n
        if self._head >= len(self._pending):
            self._pending, self._head = [], 0
        self._signal()

    def _signal(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()


class TapeIntake:
    """Decode → tape keeper → outbox, called by every task that has input for the tape.

    The keeper is shared by all connections (one tape per symbol whatever socket carries it);
    each call runs to its end without yielding, so no other caller interleaves.
    """

    def __init__(self, decoder: Decoder, keeper: TapeKeeper, outbox: Outbox) -> None:
        self.decoder = decoder
        self.keeper = keeper
        self.outbox = outbox

    def take(self, messages: Sequence[str | bytes], recv_ns: int, conn: int) -> None:
        """One chunk of frames of one connection, in receipt order: decoded, admitted."""
        decode = self.decoder.decode
        decoded: list[Outgoing] = []
        for message in messages:
            decode(Frame(message, recv_ns, conn), decoded)
        if decoded:
            self.outbox.add(self.keeper.admit(decoded, trio.current_time()))

    def on_reconnect(self, notice: Reconnected) -> None:
        """A connection reconnected: taken before its first frame (in order with its frames)."""
        self.keeper.on_reconnect(notice)

    def on_backfill(self, result: BackfillResult) -> None:
        self.outbox.add(self.keeper.on_backfill(result, trio.current_time()))

    def tick(self) -> None:
        """Gap grace timers (the tick task, every `tick_s`)."""
        self.outbox.add(self.keeper.tick(trio.current_time()))

    def flush(self, reason: str = "shutdown") -> None:
        """At drain, after the readers stopped: whatever the keeper still holds, behind gaps."""
        self.outbox.add(self.keeper.flush(reason))

    def settle_now(self) -> bool:
        """Hand the outbox to the sink without waiting; False: call `settle` (it would wait)."""
        return self.outbox.drain_now()

    async def settle(self, *, complete: bool = False) -> None:
        """Hand the outbox to the sink, waiting when it is full; `complete` at the end of input:
        also when another task (a cancelled one, winding down) is the one draining."""
        await self.outbox.drain(complete=complete)

    async def deliver_backfill(self, result: BackfillResult) -> None:
        """The backfill worker's `deliver`: applied at once, handed on like live records."""
        self.on_backfill(result)
        await self.outbox.drain()

    async def run_ticks(
        self,
        tick_s: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The keeper's clock: one wake-up every `tick_s` on absolute deadlines (4 a second by
        default, nothing per frame); it also drains what a task that was cancelled while
        draining left in the outbox."""
        task_status.started()
        deadline = trio.current_time()
        while True:
            # Absolute deadlines; ticks missed while a drain waited on a full sink are skipped.
            deadline = max(deadline + tick_s, trio.current_time())
            await trio.sleep_until(deadline)
            self.tick()
            await self.outbox.drain()
