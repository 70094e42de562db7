"""BookKeeper end to end against the fake exchange: a real WebSocket, a real REST client and the
shared weight budget, on the real clock. The kept book is checked level by level against the
exchange's own book at every applied update id through a dropped diff, a stale snapshot and a
disconnect, and the records it hands to the sink rebuild the exact book (docs/books.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import trio
import trio_websocket

from marketd.books import DepthSnapshot, DepthUpdate, Level, OrderBook, compare
from marketd.books.board import BookBoard
from marketd.books.keeper import BookKeeper, BookSettings
from marketd.ingest.decode import Outgoing
from marketd.metrics import MetricsFactory
from marketd.records import BookSnapshotRecord, DepthRecord, GapRecord
from marketd.rest.budget import WeightBudget
from marketd.rest.client import BinanceRest
from marketd.streams import parse_stream
from marketd.testing.fake_exchange import ExchangeConfig, FakeExchange

SYMBOL = "BTCUSDT"
STREAM = "btcusdt@depth@100ms"
LIMIT = 500  # weight 25: snapshots every 0.25 s at the test's pace


@pytest.fixture
async def exchange(nursery: trio.Nursery) -> FakeExchange:
    ex = FakeExchange(ExchangeConfig(rate=50, symbols=(SYMBOL,)))
    await nursery.start(ex.serve)
    return ex


def truth_book(ex: FakeExchange, update_id: int, limit: int = 10**6) -> OrderBook:
    """The exchange's book at `update_id`, cut at `limit` levels per side."""
    bids, asks = ex.state.books.book_at(SYMBOL, update_id)
    book = OrderBook()
    book.load(
        DepthSnapshot(
            symbol=SYMBOL,
            last_update_id=update_id,
            bids=tuple(Level(p, q) for p, q in bids[:limit]),
            asks=tuple(Level(p, q) for p, q in asks[:limit]),
            limit=limit,
        )
    )
    return book


class Harness:
    """Feeds frames to the keeper, captures every record in sink order, checks the book."""

    def __init__(self, ex: FakeExchange) -> None:
        self.ex = ex
        self.board = BookBoard()
        self.keeper = BookKeeper(
            [parse_stream(STREAM)],
            settings=BookSettings(
                snapshot_limit=LIMIT,
                snapshot_interval_s=0.2,
                audit_interval_s=0.5,
                snapshot_weight_per_min=6000,
            ),
            board=self.board,
            metrics=MetricsFactory(),
        )
        self.records: list[Outgoing] = []
        self.checked = 0
        self.reconnects = 0

    @property
    def sync(self) -> Any:
        return self.keeper.books[SYMBOL]

    async def sink(self, records: list[Outgoing]) -> None:
        self.records.extend(records)

    def feed(self, payload: Any) -> None:
        before = self.sync.applied
        self.records.extend(self.keeper.on_frame(parse_stream(STREAM), payload, time.time_ns()))
        if self.sync.in_sync and self.sync.applied > before:
            self.check()

    def check(self) -> None:
        book = self.sync.book
        result = compare(book, truth_book(self.ex, book.last_update_id), symbol=SYMBOL)
        assert result.ok and result.matching > 100, result
        view = self.board.latest(SYMBOL)
        assert view is not None and view.in_sync and view.last_update_id == book.last_update_id
        bids, asks = self.ex.state.books.book_at(SYMBOL, book.last_update_id)
        assert list(view.bids) == bids[: len(view.bids)] and len(view.bids) == 20
        assert list(view.asks) == asks[: len(view.asks)] and len(view.asks) == 20
        self.checked += 1

    async def follow(self, until: Any) -> None:
        """Read the diff stream on one connection until `until(self)`."""
        url = f"ws://127.0.0.1:{self.ex.port}/stream?streams={STREAM}"
        async with trio_websocket.open_websocket_url(url) as ws:
            while not until(self):
                msg = json.loads(await ws.get_message())
                self.feed(msg["data"])

    async def reconnect(self) -> None:
        """The connection is lost for a while (events go by unseen) and replaced.

        The client closes it: trio-websocket 0.12 can leave its socket open when the server
        aborts first (a ResourceWarning), see tests/fake_exchange/test_faults.py.
        """
        await trio.sleep(0.35)  # about three 100 ms events missed
        self.reconnects += 1
        self.records.extend(self.keeper.on_reconnect([SYMBOL]))

    def of(self, topic: str, cls: type[Any]) -> Iterator[Any]:
        for r in self.records:
            if r.topic == topic:
                assert r.key == SYMBOL.encode()
                yield msgspec.json.decode(r.value, type=cls)


async def test_kept_book_is_exact_through_drop_stale_snapshot_and_disconnect(
    exchange: FakeExchange,
) -> None:
    ex = exchange
    h = Harness(ex)
    ex.set_faults(depth_drop_after=8, stale_depth_snapshot=30)
    async with (
        BinanceRest(f"http://127.0.0.1:{ex.port}", WeightBudget(6000)) as rest,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(h.keeper.run, rest, h.sink)
        with trio.fail_after(40):
            # 1. A diff withheld on the WebSocket (a gap) and one stale snapshot.
            await h.follow(lambda h: h.sync.resyncs and h.checked >= 10 and h.sync.in_sync)
            assert ex.counters["depth_drop"] == 1
            assert ex.counters["stale_depth_snapshot"] == 1
            # 2. The connection is lost: Binance does not replay, the book is rebuilt.
            await h.reconnect()
            checked = h.checked
            await h.follow(lambda h: h.sync.in_sync and h.checked >= checked + 10)
            # 3. At least one audit ran against a fresh snapshot and agreed.
            await h.follow(lambda h: h.sync.audits >= 1)
        nursery.cancel_scope.cancel()

    resyncs = {r.value for r in h.sync.resyncs.elements()}
    assert "gap" in resyncs and "reconnect" in resyncs
    assert resyncs <= {"gap", "reconnect", "stale_snapshot"}
    assert "audit_mismatch" not in resyncs

    # Every diff went to raw_depth exactly as received; every gap to raw_gaps, repaired.
    diffs = list(h.of("raw_depth", DepthRecord))
    assert len(diffs) >= h.sync.applied
    assert all(d.stream == STREAM and d.event_time > 0 for d in diffs)
    gaps = list(h.of("raw_gaps", GapRecord))
    assert {g.reason for g in gaps} >= {"gap", "reconnect"}
    assert all(g.kind == "depth" and g.repaired and g.from_id <= g.to_id for g in gaps)

    # Every in-sync snapshot record equals the exchange's top levels at its update id.
    snaps = list(h.of("book_snapshots", BookSnapshotRecord))
    assert {s.reason for s in snaps} >= {"synced", "resynced", "periodic"}
    for s in snaps:
        if not s.in_sync:
            assert s.bids == () and s.asks == ()
            continue
        bids, asks = ex.state.books.book_at(SYMBOL, s.last_update_id)
        assert [list(x) for x in s.bids] == [list(x) for x in bids[: s.depth]]
        assert [list(x) for x in s.asks] == [list(x) for x in asks[: s.depth]]

    # A consumer rebuilds the exact book (within the snapshot's depth) from the last resynced
    # snapshot plus the raw_depth events from U = last_update_id + 1 on.
    rebuilt = rebuild(h.records, ex)
    assert rebuilt >= 5


def rebuild(records: list[Outgoing], ex: FakeExchange) -> int:
    """Replay the captured records as a consumer would; returns how many ids were checked."""
    start = max(
        i
        for i, r in enumerate(records)
        if r.topic == "book_snapshots"
        and msgspec.json.decode(r.value, type=BookSnapshotRecord).reason == "resynced"
    )
    snap = msgspec.json.decode(records[start].value, type=BookSnapshotRecord)
    assert snap.in_sync and snap.last_update_id is not None
    book = OrderBook()
    book.load(
        DepthSnapshot(
            symbol=SYMBOL,
            last_update_id=snap.last_update_id,
            bids=tuple(Level(p, q) for p, q in snap.bids),
            asks=tuple(Level(p, q) for p, q in snap.asks),
            limit=snap.depth,
        )
    )
    # raw_depth and book_snapshots are separate topics: the consumer reads raw_depth from the
    # first event that continues the snapshot, wherever it was captured.
    diffs = [
        msgspec.json.decode(r.value, type=DepthRecord) for r in records if r.topic == "raw_depth"
    ]
    checked = 0
    for d in diffs:
        local = book.last_update_id
        assert local is not None
        if d.last_update_id <= local:
            continue
        if checked == 0 and not d.first_update_id <= local + 1:
            continue  # before the snapshot's straddling event
        if checked and d.first_update_id != local + 1:
            break  # the stream's next gap: a consumer would wait for the next snapshot
        book.apply(
            DepthUpdate(
                symbol=SYMBOL,
                first_update_id=d.first_update_id,
                last_update_id=d.last_update_id,
                event_time_ms=d.event_time,
                bids=tuple(Level(p, q) for p, q in d.bids),
                asks=tuple(Level(p, q) for p, q in d.asks),
            )
        )
        truth = truth_book(ex, d.last_update_id)
        result = compare(book, truth, symbol=SYMBOL)
        assert result.ok and result.matching >= 10, result
        checked += 1
    return checked
