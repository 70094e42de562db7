"""BookIntake: depth frames to the book keeper, everything else to the tape intake unchanged,
one outbox, reconnects to both."""

from __future__ import annotations

import json
from collections.abc import Sequence

import trio
import trio.testing

from marketd.books.intake import BookIntake
from marketd.books.keeper import BookKeeper
from marketd.ingest.decode import Outgoing
from marketd.ingest.tape import Reconnected
from marketd.metrics import MetricsFactory
from marketd.streams import parse_stream
from tests.books.test_keeper import RECV_NS, diff

STREAMS = tuple(parse_stream(n) for n in ("btcusdt@trade", "btcusdt@depth@100ms", "btcusdt@depth5"))


class Tape:
    def __init__(self) -> None:
        self.taken: list[str | bytes] = []
        self.notices: list[Reconnected] = []

    def take(self, messages: Sequence[str | bytes], recv_ns: int, conn: int) -> None:
        self.taken.extend(messages)

    def on_reconnect(self, notice: Reconnected) -> None:
        self.notices.append(notice)

    def settle_now(self) -> bool:
        return True

    async def settle(self) -> None:
        return None


class Box:
    def __init__(self) -> None:
        self.records: list[Outgoing] = []

    def add(self, records: list[Outgoing]) -> None:
        self.records.extend(records)


def wrap(stream: str, data: object) -> str:
    return json.dumps({"stream": stream, "data": data})


async def test_depth_frames_go_to_the_keeper_and_the_rest_to_the_tape(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keeper = BookKeeper(STREAMS, metrics=MetricsFactory())
    tape, box = Tape(), Box()
    intake = BookIntake(keeper, tape, box, STREAMS)
    trade = wrap("btcusdt@trade", {"e": "trade"})
    partial = {"lastUpdateId": 3, "bids": [["1.0", "1"]], "asks": [["1.1", "1"]]}
    other_depth = wrap("ethusdt@depth", diff(1, 2))  # not subscribed: the tape refuses it
    messages: list[str | bytes] = [
        trade,
        wrap("btcusdt@depth@100ms", diff(5, 9)).encode(),
        wrap("btcusdt@depth5", partial),
        '{"result": null, "id": 1}',
        other_depth,
        '{"stream": "btcusdt@depth@100ms", "data": ',  # broken: the tape dead-letters it
    ]
    intake.take(messages, RECV_NS, 0)
    assert tape.taken == [trade, '{"result": null, "id": 1}', other_depth, messages[-1]]
    assert [r.topic for r in box.records] == ["raw_depth", "raw_depth_partial"]
    assert keeper.books["BTCUSDT"].buffered == 1
    intake.on_reconnect(Reconnected(0, STREAMS))
    assert tape.notices and keeper.books["BTCUSDT"].buffered == 0
    assert intake.settle_now()
