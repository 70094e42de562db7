"""Batching in the decode stage: size-bounded batches, in tape order, never held back, and a
full producer channel stops the stage from taking frames (backpressure to the readers)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import trio
import trio.testing

from marketd.ingest.batch import Batch, split_batches
from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.ingest.pipeline import Inbound, run_decoder
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


async def start(
    nursery: trio.Nursery,
    batch_size: int,
    *,
    frame_buffer: int = 100,
    batch_buffer: int = 100,
    produce: Callable[[Batch], Awaitable[object]] | None = None,
) -> tuple[trio.MemorySendChannel[Inbound], trio.MemoryReceiveChannel[Batch]]:
    keeper = TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=lambda _r: False,
        gap_grace_s=0.0,
    )
    frames_tx, frames_rx = trio.open_memory_channel[Inbound](frame_buffer)
    batches_tx, batches_rx = trio.open_memory_channel[Batch](batch_buffer)
    await nursery.start(
        functools.partial(run_decoder, batch_size=batch_size, produce=produce, coalesce_s=0.0),
        frames_rx,
        batches_tx,
        Decoder(TOPICS),
        keeper,
    )
    return frames_tx, batches_rx


async def test_a_batch_goes_out_at_once_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        frames_tx, batches_rx = await start(nursery, batch_size=100)
        t0 = trio.current_time()
        got: list[int] = []
        for trade_id in (1, 2, 3):
            await frames_tx.send(frame(trade_id))
        while len(got) < 2:  # the newest id may wait for the next trade (outlier screen)
            got += trade_ids(await batches_rx.receive())
        assert got[:2] == [1, 2]
        assert trio.current_time() == t0  # no added latency on an idle pipeline
        nursery.cancel_scope.cancel()


async def test_batches_never_exceed_size_and_keep_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        frames_tx, batches_rx = await start(nursery, batch_size=10)
        for trade_id in range(1, 36):
            frames_tx.send_nowait(frame(trade_id))
        await frames_tx.aclose()
        got: list[int] = []
        async for batch in batches_rx:
            assert 1 <= len(batch) <= 10
            got += trade_ids(batch)
        assert got == list(range(1, 36))


async def test_end_of_input_flushes_everything_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        frames_tx, batches_rx = await start(nursery, batch_size=1000)
        await frames_tx.send(frame(1))
        await frames_tx.aclose()
        batches = [b async for b in batches_rx]
        assert [i for b in batches for i in trade_ids(b)] == [1]


async def test_backpressure_when_the_producer_is_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        frames_tx, _batches_rx = await start(nursery, batch_size=5, frame_buffer=2, batch_buffer=0)
        sent = 0
        with trio.move_on_after(5):
            while True:
                await frames_tx.send(frame(sent + 1))
                sent += 1
        # Nobody takes batches: the stage blocks on its first batch, the frame channel holds two;
        # then the reader's send blocks.
        assert sent <= 10
        nursery.cancel_scope.cancel()


async def test_without_a_spool_the_stage_produces_itself_and_closes_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    produced: list[Batch] = []

    async def produce(batch: Batch) -> None:
        produced.append(batch)
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        frames_tx, batches_rx = await start(nursery, batch_size=4, produce=produce)
        for trade_id in range(1, 11):
            frames_tx.send_nowait(frame(trade_id))
        await frames_tx.aclose()
        assert [b async for b in batches_rx] == []  # end of input only
    assert all(1 <= len(b) <= 4 for b in produced)
    assert [i for b in produced for i in trade_ids(b)] == list(range(1, 11))
