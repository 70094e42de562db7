"""TapeIntake: frames, reconnect notices and backfill results all go through the one tape keeper,
applied by whichever task has them, and come out in keeper order."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio
import trio.testing

from marketd.ingest.backfill import TradeBackfill
from marketd.ingest.batch import Batch
from marketd.ingest.continuity import RequestBackfill
from marketd.ingest.decode import Decoder, Topics
from marketd.ingest.intake import Outbox, TapeIntake
from marketd.ingest.streams import parse_stream
from marketd.ingest.tape import Reconnected, Request, TapeKeeper
from marketd.records import SCHEMA_VERSION, SOURCE, TradeRecord
from tests.ingest import frames as f

TOPICS = Topics("raw_trades", "raw_klines", "raw_tickers", "raw_dlq", {})
TICK_S = 0.25
S = "BTCUSDT"


def recovered(trade_id: int) -> TradeRecord:
    return TradeRecord(
        S, trade_id, "1.0", "1.0", 1, 1, False, 0, SOURCE, "btcusdt@trade", SCHEMA_VERSION, True
    )


class Collect:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def offer(self, batch: Batch) -> int:
        self.records += batch
        return len(batch)

    async def put(self, rest: Batch) -> int:
        raise AssertionError("never full")

    def tape(self) -> tuple[list[tuple[int, bool]], list[tuple[int, int, bool]]]:
        tape, gaps = [], []
        for o in self.records:
            value = msgspec.json.decode(o.value)
            if o.topic == "gaps":
                gaps.append((value["from_id"], value["to_id"], value["repaired"]))
            else:
                tape.append((value["trade_id"], value.get("backfill", False)))
        return tape, gaps


def make(requested: list[Request], gap_grace_s: float = 0.0) -> tuple[TapeIntake, Collect]:
    def request(r: Request) -> bool:
        requested.append(r)
        return True

    keeper = TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=request,
        gap_grace_s=gap_grace_s,
    )
    sink = Collect()
    return TapeIntake(Decoder(TOPICS), keeper, Outbox(sink, 100)), sink


async def test_backfill_pages_applied_by_the_backfill_task_fill_the_gap_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    requested: list[Request] = []
    intake, sink = make(requested)
    intake.take([f.trade(i) for i in (1, 2, 5)], time.time_ns(), 0)
    await intake.settle()
    assert requested == [RequestBackfill(S, 3, 4, "trades", "id_jump")]
    page_of = requested[0]
    assert isinstance(page_of, RequestBackfill)
    await intake.deliver_backfill(TradeBackfill(page_of, [recovered(3), recovered(4)]))
    await intake.deliver_backfill(TradeBackfill(page_of, [], final=True))
    intake.take([f.trade(6)], time.time_ns(), 0)
    intake.flush()
    await intake.settle()
    tape, gaps = sink.tape()
    assert tape == [(1, False), (2, False), (3, True), (4, True), (5, False), (6, False)]
    assert gaps == [(3, 4, True)]


async def test_a_reconnect_notice_is_taken_before_the_new_sockets_first_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # After a reconnect the next id jump is requested at once, without the gap grace: the
    # notice must reach the keeper before that socket's first frame, which the connection task
    # guarantees by calling on_reconnect before it reads.
    requested: list[Request] = []
    intake, _ = make(requested, gap_grace_s=10.0)
    intake.take([f.trade(1), f.trade(2)], time.time_ns(), 0)
    intake.on_reconnect(Reconnected(0, (parse_stream("btcusdt@trade"),)))
    intake.take([f.trade(5)], time.time_ns(), 0)
    assert [(r.from_id, r.to_id) for r in requested if isinstance(r, RequestBackfill)] == [(3, 4)]
    quiet: list[Request] = []
    intake2, _ = make(quiet, gap_grace_s=10.0)
    intake2.take([f.trade(1), f.trade(2), f.trade(5)], time.time_ns(), 0)
    assert quiet == []  # without the notice the jump waits for the grace


async def test_the_tick_task_runs_the_gap_grace_timers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    requested: list[Request] = []
    intake, _ = make(requested, gap_grace_s=1.0)
    intake.take([f.trade(i) for i in (1, 2, 5)], time.time_ns(), 0)
    await intake.settle()
    async with trio.open_nursery() as nursery:
        await nursery.start(intake.run_ticks, TICK_S)
        await trio.sleep(3.0)  # no traffic at all: the ticks alone expire the grace
        nursery.cancel_scope.cancel()
    assert requested, "the grace ran out on the tick task, without any frame"
