"""run_decoder: every item that reaches the decode stage goes through the tape keeper."""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec
import trio
import trio.testing

from marketd.ingest.backfill import TradeBackfill
from marketd.ingest.continuity import RequestBackfill
from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.ingest.pipeline import Inbound, run_decoder
from marketd.ingest.tape import Request, TapeKeeper
from marketd.records import SCHEMA_VERSION, SOURCE, TradeRecord
from tests.ingest import frames as f

TOPICS = Topics("raw_trades", "raw_klines", "raw_tickers", "raw_dlq", {})
TICK_S = 0.25
S = "BTCUSDT"


def recovered(trade_id: int) -> TradeRecord:
    return TradeRecord(
        S, trade_id, "1.0", "1.0", 1, 1, False, 0, SOURCE, "btcusdt@trade", SCHEMA_VERSION, True
    )


async def test_a_backfill_page_received_as_the_tick_falls_due_is_not_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The CI flake of tests/e2e/test_tape_e2e.py: a page of a backfill that the decoder was
    # woken for just before a tick, but that only ran after it (one scheduler round on a loaded
    # machine), was thrown away; the final result then declared its ids not_on_rest, and
    # `marketd verify tape` found the hole.
    requested: list[Request] = []

    def request(r: Request) -> bool:
        requested.append(r)
        return True

    keeper = TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=request,
        gap_grace_s=0.0,
    )
    frames_tx, frames_rx = trio.open_memory_channel[Inbound](16)
    chunks_tx, chunks_rx = trio.open_memory_channel[list[Outgoing]](16)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()  # the decoder's first tick is due at started + TICK_S
        await nursery.start(
            functools.partial(run_decoder, coalesce_s=0.0, tick_s=TICK_S),
            frames_rx,
            chunks_tx,
            Decoder(TOPICS),
            keeper,
        )
        for trade_id in (1, 2, 5):
            await frames_tx.send(Frame(f.trade(trade_id), time.time_ns(), 0))
        await trio.testing.wait_all_tasks_blocked()
        assert requested == [RequestBackfill(S, 3, 4, "trades", "id_jump")]
        page_of = requested[0]
        assert isinstance(page_of, RequestBackfill)

        await trio.sleep_until(started + TICK_S - 0.001)
        # The decoder, waiting on the channel, is handed the page now...
        frames_tx.send_nowait(TradeBackfill(page_of, [recovered(3), recovered(4)]))
        # ...and the tick falls due before it gets to run.
        autojump_clock.jump(0.002)
        frames_tx.send_nowait(TradeBackfill(page_of, [], final=True))
        await frames_tx.aclose()

    tape: list[tuple[int, bool]] = []
    gaps: list[Any] = []
    async with chunks_rx:
        async for chunk in chunks_rx:
            for o in chunk:
                value = msgspec.json.decode(o.value)
                if o.topic == "gaps":
                    gaps.append((value["from_id"], value["to_id"], value["repaired"]))
                else:
                    tape.append((value["trade_id"], value.get("backfill", False)))
    assert tape == [(1, False), (2, False), (3, True), (4, True), (5, False)]
    assert gaps == [(3, 4, True)]
