from __future__ import annotations

import pytest
import trio
import trio.testing

from marketd.ingest.batch import Batch, BatchPolicy, run_batcher
from marketd.ingest.decode import Outgoing


def rec(i: int) -> Outgoing:
    return Outgoing("t", b"k", str(i).encode(), 0)


async def start(policy: BatchPolicy, nursery: trio.Nursery):
    chunks_tx, chunks_rx = trio.open_memory_channel[list[Outgoing]](100)
    batches_tx, batches_rx = trio.open_memory_channel[Batch](100)
    await nursery.start(lambda **kw: run_batcher(chunks_rx, batches_tx, policy, **kw))
    return chunks_tx, batches_rx


async def test_partial_batch_goes_out_at_once_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        chunks_tx, batches_rx = await start(BatchPolicy(100, 10.0, 0.01), nursery)
        t0 = trio.current_time()
        await chunks_tx.send([rec(1), rec(2)])
        batch = await batches_rx.receive()
        assert [o.value for o in batch] == [b"1", b"2"]
        assert trio.current_time() == t0  # no added latency on an idle pipeline
        nursery.cancel_scope.cancel()


async def test_batches_never_exceed_size_and_keep_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        chunks_tx, batches_rx = await start(BatchPolicy(10, 1.0, 0.01), nursery)
        for c in range(5):
            chunks_tx.send_nowait([rec(c * 7 + i) for i in range(7)])
        await chunks_tx.aclose()
        got: list[Outgoing] = []
        async for batch in batches_rx:
            assert 1 <= len(batch) <= 10
            got += batch
        assert [int(o.value) for o in got] == list(range(35))


async def test_drain_flushes_pending_batch_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        chunks_tx, batches_rx = await start(BatchPolicy(1000, 60.0, 0.01), nursery)
        await chunks_tx.send([rec(1)])
        await chunks_tx.aclose()
        batches = [b async for b in batches_rx]
        assert sum(len(b) for b in batches) == 1


async def test_backpressure_when_producer_is_slow(autojump_clock: trio.testing.MockClock) -> None:
    chunks_tx, chunks_rx = trio.open_memory_channel[list[Outgoing]](2)
    batches_tx, _batches_rx = trio.open_memory_channel[Batch](0)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: run_batcher(chunks_rx, batches_tx, BatchPolicy(5, 1.0, 0.01), **kw)
        )
        sent = 0
        with trio.move_on_after(5):
            while True:
                await chunks_tx.send([rec(sent)])
                sent += 1
        # Nobody consumes batches: the batcher holds one, the channel two; then the sender blocks.
        assert sent <= 10
        nursery.cancel_scope.cancel()


def test_deadline_rounds_up_to_check_interval() -> None:
    policy = BatchPolicy(100, 0.1, 0.03)
    assert policy.deadline(1.0) == pytest.approx(1.11)
