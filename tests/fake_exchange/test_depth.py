"""Order books of the fake exchange: the seeded book, diff and partial streams, REST snapshots
with their weights, depth faults, and marketd.books keeping a book exactly equal to the
exchange's at every update id through them. docs/books.md."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from marketd.books import (
    Applied,
    BookSync,
    Command,
    DepthSnapshot,
    Level,
    OrderBook,
    RequestSnapshot,
    compare,
    parse_diff,
    parse_partial,
    parse_snapshot,
)
from marketd.testing.fake_exchange import FakeExchange
from marketd.testing.fake_exchange.book import MAX_CHANGES, MIN_CHANGES, BookSim, merge_steps
from marketd.testing.fake_exchange.market import spec_for
from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import RawClient, collect, http_url, ws_url

# -- the book simulator (pure) --------------------------------------------------------------------


def _sim(seed: int = 3, symbol: str = "BTCUSDT", history: int = 500) -> BookSim:
    return BookSim(spec_for(symbol), seed, start_us=0, history=history)


@pytest.mark.parametrize("symbol", ["BTCUSDT", "SHIBUSDT", "XRPUSDT"])
def test_steps_change_10_to_30_levels_and_never_cross(symbol: str) -> None:
    sim = _sim(symbol=symbol)
    last = sim.last_id
    for _ in range(300):
        sim.generate(1, 0)
        step = sim.history[-1]
        assert step.first_id == last + 1 and step.last_id - step.first_id + 1 == len(step.changes)
        assert MIN_CHANGES <= len({(s, p) for s, p, _, _ in step.changes}) == len(step.changes)
        assert len(step.changes) <= MAX_CHANGES + 4  # + levels the mid moved onto, + band trims
        assert max(sim.bids) < min(sim.asks)
        assert all(q > 0 for q in (*sim.bids.values(), *sim.asks.values()))
        last = step.last_id


def test_same_seed_same_book_and_the_mid_moves() -> None:
    a, b = _sim(seed=9), _sim(seed=9)
    start_mid = a.mid_t
    a.generate(400, 0)
    b.generate(400, 0)
    assert (a.bids, a.asks, a.last_id) == (b.bids, b.asks, b.last_id)
    assert a.mid_t != start_mid or a.bids != _sim(seed=9).bids
    assert _sim(seed=10).bids != _sim(seed=9).bids


def test_book_at_any_id_replays_the_steps() -> None:
    sim = _sim(history=50)
    start = sim.last_id
    books = {start: (dict(sim.bids), dict(sim.asks))}
    for _ in range(40):
        sim.generate(1, 0)
        books[sim.last_id] = (dict(sim.bids), dict(sim.asks))
    for uid, book in books.items():
        assert sim.book_at(uid) == book
    # Inside a step: the changes up to that id, in order.
    step = sim.history[10]
    mid_id = step.first_id + 3
    bids, asks = sim.book_at(step.first_id - 1)
    for side, price, new, _old in step.changes[:4]:
        target = bids if side == 0 else asks
        if new:
            target[price] = new
        else:
            target.pop(price, None)
    assert sim.book_at(mid_id) == (bids, asks)
    sim.generate(30, 0)  # the oldest steps leave the history
    with pytest.raises(LookupError):
        sim.book_at(start)


def test_merged_steps_are_the_last_quantity_of_each_level() -> None:
    sim = _sim()
    sim.generate(20, 0)
    steps = list(sim.history)[-20:]
    before = sim.book_at(steps[0].first_id - 1)
    bids, asks = merge_steps(steps)
    b, a = dict(before[0]), dict(before[1])
    for price, qty in bids:
        b[price] = qty
    for price, qty in asks:
        a[price] = qty
    assert {p: q for p, q in b.items() if q} == sim.bids
    assert {p: q for p, q in a.items() if q} == sim.asks


def test_paced_steps_follow_the_clock_and_skip_long_pauses() -> None:
    sim = BookSim(spec_for("BTCUSDT"), 1, start_us=0)
    assert sim.advance_to(550_000) == 5
    assert sim.advance_to(560_000) == 0
    assert sim.advance_to(60_000_000) == 10  # 1 s of steps, the rest of the pause skipped
    assert sim.advance_to(60_100_000) == 1


# -- WebSocket and REST ---------------------------------------------------------------------------


def _levels(raw: list[list[str]]) -> list[tuple[str, str]]:
    return [(p, q) for p, q in raw]


async def test_rest_depth_top_levels_and_weights(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT", "MATICUSDT"))
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        used = 0
        for limit, weight in (
            (None, 5),
            (5, 5),
            (100, 5),
            (101, 25),
            (500, 25),
            (1000, 50),
            (5000, 250),
        ):
            params = {"symbol": "BTCUSDT"} | ({"limit": str(limit)} if limit else {})
            r = await c.get("/api/v3/depth", params=params)
            used += weight
            assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == str(used)
            body = r.json()
            assert set(body) == {"lastUpdateId", "bids", "asks"}
            n = limit or 100
            bids, asks = ex.state.books.book_at("BTCUSDT", body["lastUpdateId"])
            assert _levels(body["bids"]) == bids[:n] and _levels(body["asks"]) == asks[:n]
            assert len(body["bids"]) == min(n, len(bids))
        for params, code in (
            ({"symbol": "BTCUSDT", "limit": "5001"}, -1130),
            ({"symbol": "BTCUSDT", "limit": "0"}, -1130),
            ({"symbol": "NOPEUSDT"}, -1121),
            ({}, -1102),
        ):
            r = await c.get("/api/v3/depth", params=params)
            assert r.status_code == 400 and r.json()["code"] == code
        r = await c.get("/api/v3/depth", params={"symbol": "MATICUSDT"})
        assert r.json() == {"lastUpdateId": 0, "bids": [], "asks": []}


async def test_diff_events_continue_each_other(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",))
    url = ws_url(ex, "/stream?streams=btcusdt@depth@100ms/btcusdt@depth")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: sum(m["stream"] == "btcusdt@depth" for m in ms) >= 2)
    fast = [m["data"] for m in msgs if m["stream"] == "btcusdt@depth@100ms"]
    slow = [m["data"] for m in msgs if m["stream"] == "btcusdt@depth"]
    assert len(fast) >= 8
    for events in (fast, slow):
        for prev, cur in itertools.pairwise(events):
            assert cur["U"] == prev["u"] + 1
        for e in events:
            d = parse_diff(e, symbol="BTCUSDT")  # the core's validation accepts every event
            assert d.bids or d.asks
            assert list(e) == ["e", "E", "s", "U", "u", "b", "a"]
    # A 100 ms event is one book step: 10 to 30 changes.
    assert all(MIN_CHANGES <= e["u"] - e["U"] + 1 <= MAX_CHANGES + 4 for e in fast[1:])
    # Each 1000 ms event covers about ten of them.
    assert slow[1]["u"] - slow[1]["U"] + 1 > 3 * MAX_CHANGES


async def test_partial_depth_streams(start: Start) -> None:
    ex = await start(symbols=("ETHUSDT",))
    url = ws_url(ex, "/stream?streams=ethusdt@depth5@100ms/ethusdt@depth20")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 6)
    seen = set()
    for m in msgs:
        depth = 5 if m["stream"] == "ethusdt@depth5@100ms" else 20
        seen.add(depth)
        data = m["data"]
        assert set(data) == {"lastUpdateId", "bids", "asks"}  # no e, E, s
        p = parse_partial(data, symbol="ETHUSDT", depth=depth)
        assert len(p.bids) == len(p.asks) == depth
        bids, asks = ex.state.books.book_at("ETHUSDT", p.last_update_id)
        assert _levels(data["bids"]) == bids[:depth] and _levels(data["asks"]) == asks[:depth]
    assert seen == {5, 20}


# -- a real book kept by marketd.books against the exchange -------------------------------------


class Follower:
    """BookSync driven by a WebSocket and REST on the real clock; checks every applied id
    against the exchange's own book."""

    def __init__(self, ex: FakeExchange, symbol: str, *, limit: int = 1000) -> None:
        self.ex = ex
        self.symbol = symbol
        self.sync = BookSync(symbol, snapshot_limit=limit, max_levels=5000)
        self.limit = limit
        self.requests: list[RequestSnapshot] = []
        self.checked = 0
        self.snapshot_ids: list[int] = []

    def handle(self, cmds: list[Command]) -> None:
        for cmd in cmds:
            if isinstance(cmd, RequestSnapshot):
                self.requests.append(cmd)
        if self.sync.in_sync and any(isinstance(c, Applied) for c in cmds):
            self.check()

    def check(self) -> None:
        book = self.sync.book
        assert book.last_update_id is not None
        bids, asks = self.ex.state.books.book_at(self.symbol, book.last_update_id)
        truth = OrderBook()
        truth.load(
            DepthSnapshot(
                symbol=self.symbol,
                last_update_id=book.last_update_id,
                bids=tuple(Level(p, q) for p, q in bids),
                asks=tuple(Level(p, q) for p, q in asks),
                limit=10**6,
            )
        )
        result = compare(book, truth, symbol=self.symbol)
        assert result.ok and result.matching > 100, result
        self.checked += 1

    async def run(
        self, client: httpx.AsyncClient, ws: trio_websocket.WebSocketConnection, until: Any
    ) -> None:
        while not until(self):
            msg = json.loads(await ws.get_message())
            self.handle(
                self.sync.on_diff(parse_diff(msg["data"], symbol=self.symbol), trio.current_time())
            )
            while self.requests:
                req = self.requests.pop(0)
                r = await client.get(
                    "/api/v3/depth", params={"symbol": self.symbol, "limit": req.limit}
                )
                snap = parse_snapshot(r.json(), symbol=self.symbol, limit=req.limit)
                self.snapshot_ids.append(snap.last_update_id)
                self.handle(self.sync.on_snapshot(snap, trio.current_time()))


async def test_book_kept_from_the_stream_equals_the_exchange_at_every_update(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",))
    f = Follower(ex, "BTCUSDT")
    async with (
        httpx.AsyncClient(base_url=http_url(ex)) as client,
        trio_websocket.open_websocket_url(ws_url(ex, "/stream?streams=btcusdt@depth@100ms")) as ws,
    ):
        with trio.fail_after(15):
            await f.run(client, ws, lambda fl: fl.checked >= 15)
    assert f.sync.in_sync and sum(f.sync.resyncs.values()) == 0


async def test_dropped_diff_and_stale_snapshot_are_found_and_repaired(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",))
    ex.set_faults(depth_drop_after=8, stale_depth_snapshot=30)
    f = Follower(ex, "BTCUSDT")
    async with (
        httpx.AsyncClient(base_url=http_url(ex)) as client,
        trio_websocket.open_websocket_url(ws_url(ex, "/stream?streams=btcusdt@depth@100ms")) as ws,
    ):
        with trio.fail_after(20):
            await f.run(
                client, ws, lambda fl: fl.sync.resyncs and fl.checked >= 10 and fl.sync.in_sync
            )
    sync = f.sync
    assert ex.counters["depth_drop"] == 1 and ex.counters["stale_depth_snapshot"] == 1
    (withheld,) = ex.state.books.get("BTCUSDT").withheld  # type: ignore[union-attr]
    # The stale snapshot is refetched when it is older than the first buffered event, or it
    # reaches the book and the next diff's U shows the gap: either way the book is resynced and
    # equal to the exchange's at every checked id (the Follower compares them).
    refetched = [r.value for r in sync.refetches.elements()]
    resyncs = [r.value for r in sync.resyncs.elements()]
    assert refetched in ([], ["stale_snapshot"])
    assert "gap" in resyncs and set(resyncs) <= {"gap", "stale_snapshot"}
    assert sync.book.last_update_id is not None and sync.book.last_update_id > withheld[1]
    assert ex.faults.stale_depth_snapshot is None  # served once


async def test_depth_drop_repeats_and_disconnect_fault(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",))
    ex.set_faults(depth_drop_after=3, depth_drop_repeat=True)
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws/btcusdt@depth@100ms")) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 9, timeout=10)
    jumps = sum(b["U"] != a["u"] + 1 for a, b in itertools.pairwise(msgs))
    assert jumps >= 2 and ex.counters["depth_drop"] >= 2
    ex.set_faults(depth_drop_after=None, drop_after=5)
    assert ex.port is not None
    client = await RawClient.connect(ex.port, "/ws/btcusdt@depth@100ms")
    try:
        await client.pump(lambda: client.eof or client.closed is not None, timeout=10)
    finally:
        await client.aclose()
    assert len(client.messages) == 5 and client.eof and ex.counters["drop"] == 1


async def test_depth_max_sends_one_event_per_step_as_fast_as_read(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",), depth_max=True)
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws/btcusdt@depth@100ms")) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 2000, timeout=20)
    for a, b in itertools.pairwise(msgs):
        assert b["U"] == a["u"] + 1
    sim = ex.state.books.get("BTCUSDT")
    assert sim is not None and sim.last_id >= msgs[-1]["u"]


def test_fault_switches_validate() -> None:
    from marketd.testing.fake_exchange.faults import Faults, apply_changes

    f = apply_changes(
        Faults(), {"depth_drop_after": 4, "depth_drop_repeat": True, "stale_depth_snapshot": 7}, 0.0
    )
    assert (f.depth_drop_after, f.depth_drop_repeat, f.stale_depth_snapshot) == (4, True, 7)
    with pytest.raises(ValueError, match="stale_depth_snapshot"):
        apply_changes(Faults(), {"stale_depth_snapshot": 0}, 0.0)
    with pytest.raises(ValueError, match="depth_drop_after"):
        apply_changes(Faults(), {"depth_drop_after": "x"}, 0.0)


def test_random_is_not_used_unseeded() -> None:
    # The book depends on the seed only, not on the global random state.
    random.seed(1)
    a = _sim(seed=5)
    random.seed(2)
    b = _sim(seed=5)
    assert a.bids == b.bids


def test_cli_depth_flags() -> None:
    import argparse

    from marketd.testing.fake_exchange.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = "--depth-max --book-levels 50 --depth-drop-after 3 --depth-drop-repeat"
    args = parser.parse_args([*flags.split(), "--stale-depth-snapshot", "9"])
    cfg = config_from_args(args)
    assert cfg.depth_max and cfg.book_levels == 50
    f = cfg.faults
    assert (f.depth_drop_after, f.depth_drop_repeat, f.stale_depth_snapshot) == (3, True, 9)
