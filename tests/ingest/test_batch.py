"""Batches on the ingest path (intake.py): size-bounded, in tape order, never held back, handed
over without a task hop; a full sink makes the tasks that hand it records wait (backpressure to
the readers) without losing or reordering anything, whichever task was cancelled."""

from __future__ import annotations

import time

import msgspec
import pytest
import trio
import trio.testing

from marketd.ingest.batch import Batch, split_batches
from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.ingest.intake import Outbox, Sink, TapeIntake
from marketd.ingest.tape import TapeKeeper
from marketd.records import TradeRecord
from tests.ingest import frames as f

TOPICS = Topics("raw_trades", "raw_klines", "raw_tickers", "raw_dlq", {})


def rec(i: int) -> Outgoing:
    return Outgoing("t", b"k", str(i).encode(), 0)


def frame(trade_id: int) -> Frame:
    return Frame(f.trade(trade_id), time.time_ns(), 0)


def trade_ids(batch: Batch) -> list[int]:
    return [msgspec.json.decode(o.value)["trade_id"] for o in batch if o.topic == "raw_trades"]


@pytest.mark.parametrize(("n", "size"), [(0, 5), (1, 5), (5, 5), (6, 5), (35, 10), (7, 1)])
def test_split_batches_bounds_size_and_keeps_order(n: int, size: int) -> None:
    records = [rec(i) for i in range(n)]
    batches = split_batches(records, size)
    assert all(1 <= len(b) <= size for b in batches)
    assert [o for b in batches for o in b] == records
    assert len(batches) == -(-n // size)


def test_split_batches_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_batches([rec(1)], 0)


class ListSink:
    """Takes batches at once (or, `open` False, takes nothing and waits in `put`)."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.open = True
        self.opened = trio.Event()
        self.puts = 0

    def offer(self, batch: Batch) -> int:
        if not self.open:
            return 0
        self.batches.append(list(batch))
        return len(batch)

    async def put(self, rest: Batch) -> int:
        self.puts += 1
        await self.opened.wait()
        return 0

    def let_through(self) -> None:
        self.open = True
        self.opened.set()


def intake(sink: Sink, batch_size: int, *, limit: int = 100) -> TapeIntake:
    keeper = TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=lambda _r: False,
        gap_grace_s=0.0,
    )
    return TapeIntake(Decoder(TOPICS), keeper, Outbox(sink, batch_size, limit=limit))


def frames(*ids: int) -> list[str]:
    return [f.trade(i) for i in ids]


def tape(sink: ListSink) -> list[int]:
    return [i for b in sink.batches for i in trade_ids(b)]


async def test_a_batch_goes_out_at_once_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    sink = ListSink()
    t = intake(sink, batch_size=100)
    t0 = trio.current_time()
    t.take(frames(1, 2, 3), time.time_ns(), 0)
    assert t.settle_now()
    assert tape(sink)[:2] == [1, 2]  # the newest id may wait for the next trade (outlier screen)
    assert trio.current_time() == t0  # no added latency, no task hop


async def test_batches_never_exceed_size_and_keep_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ListSink()
    t = intake(sink, batch_size=10)
    for start in range(1, 36, 7):
        t.take(frames(*range(start, start + 7)), time.time_ns(), 0)
        await t.settle()
    t.flush()
    await t.settle()
    assert all(1 <= len(b) <= 10 for b in sink.batches)
    assert tape(sink) == list(range(1, 36))


async def test_end_of_input_flushes_what_the_keeper_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ListSink()
    t = intake(sink, batch_size=1000)
    t.take(frames(1), time.time_ns(), 0)
    t.flush()
    await t.settle()
    assert tape(sink) == [1]


async def test_a_full_sink_is_backpressure_past_the_outbox_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ListSink()
    sink.open = False
    t = intake(sink, batch_size=5, limit=10)
    t.take(frames(1, 2, 3), time.time_ns(), 0)
    assert not t.settle_now()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.settle)  # the drainer: waits in put
        await trio.testing.wait_all_tasks_blocked()
        t.take(frames(4, 5), time.time_ns(), 1)
        with trio.move_on_after(1) as waited:
            await t.settle()  # under the limit: another task drains, this one goes on
        assert not waited.cancelled_caught
        t.take(frames(*range(6, 16)), time.time_ns(), 1)
        with trio.move_on_after(1) as waited:
            await t.settle()  # past the limit: waits for the drainer
        assert waited.cancelled_caught
        sink.let_through()
    await t.settle()
    t.flush()
    await t.settle()
    assert tape(sink) == list(range(1, 16))  # keeper order, across tasks


async def test_a_drain_cancelled_while_waiting_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ListSink()
    sink.open = False
    t = intake(sink, batch_size=4)
    t.take(frames(*range(1, 11)), time.time_ns(), 0)
    with trio.move_on_after(1):
        await t.settle()
    assert sink.puts == 1 and sink.batches == []
    sink.let_through()
    t.flush()
    await t.settle()
    assert tape(sink) == list(range(1, 11))
    assert all(1 <= len(b) <= 4 for b in sink.batches)


class HalfSink(ListSink):
    """Takes at most 3 records per offer (librdkafka's queue filling up)."""

    def offer(self, batch: Batch) -> int:
        self.batches.append(list(batch[:3]))
        return min(3, len(batch))


async def test_a_partly_taken_batch_goes_on_where_it_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = HalfSink()
    sink.opened.set()
    t = intake(sink, batch_size=5)
    t.take(frames(*range(1, 13)), time.time_ns(), 0)
    t.flush()
    await t.settle()
    assert tape(sink) == list(range(1, 13))


async def test_the_final_settle_waits_for_a_drainer_that_was_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = ListSink()
    sink.open = False
    t = intake(sink, batch_size=4)
    t.take(frames(1, 2, 3), time.time_ns(), 0)
    drainer = trio.CancelScope()

    async def drain() -> None:  # e.g. the tick task, draining when shutdown cancels it
        with drainer:
            await t.settle()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        drainer.cancel()  # delivered at its next checkpoint, not yet
        sink.let_through()
        t.flush()
        await t.settle(complete=True)  # must not return while records wait in the outbox
        assert len(t.outbox) == 0
    assert tape(sink) == [1, 2, 3]
