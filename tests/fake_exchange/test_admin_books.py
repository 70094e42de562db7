"""The admin endpoints end-to-end tests of order books drive a fake exchange subprocess with:
`GET /fake/book` (the exchange's own book at an update id), `POST /fake/disconnect` (abort the
connections of one stream), the depth faults through `POST /fake/faults`, and the books part of
`GET /fake/stats`."""

from __future__ import annotations

import itertools
import json

import httpx
import trio_websocket

from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import RawClient, collect, http_url, ws_url


async def test_book_endpoint_answers_the_book_at_an_update_id(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT", "MATICUSDT"))
    url = ws_url(ex, "/ws/btcusdt@depth@100ms")
    async with trio_websocket.open_websocket_url(url) as ws:
        events = await collect(ws, lambda ms: len(ms) >= 3)
    at = events[1]["u"]
    async with httpx.AsyncClient(base_url=http_url(ex)) as http:
        r = await http.get("/fake/book", params={"symbol": "btcusdt", "update_id": at, "limit": 5})
        now = await http.get("/fake/book", params={"symbol": "BTCUSDT"})
        old = await http.get("/fake/book", params={"symbol": "BTCUSDT", "update_id": 1})
        silent = await http.get("/fake/book", params={"symbol": "MATICUSDT"})
        bad = await http.get("/fake/book", params={"symbol": "BTCUSDT", "update_id": "x"})
        missing = await http.get("/fake/book")
    assert r.status_code == 200
    body = r.json()
    bids, asks = ex.state.books.book_at("BTCUSDT", at)
    assert body["symbol"] == "BTCUSDT" and body["update_id"] == at
    assert [tuple(x) for x in body["bids"]] == bids[:5]
    assert [tuple(x) for x in body["asks"]] == asks[:5]
    assert body["first_known_id"] <= at <= body["last_update_id"]
    # Without an id: the book now, every level.
    current = now.json()
    assert current["update_id"] == current["last_update_id"] >= events[-1]["u"]
    assert len(current["bids"]) > 100
    assert old.status_code == 404 and "outside the known" in old.json()["error"]
    assert silent.status_code == 404  # listed, never trades: no book
    assert bad.status_code == 400 and missing.status_code == 400


async def test_disconnect_aborts_only_the_connections_of_the_stream(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT", "ETHUSDT"))
    assert ex.port is not None
    depth = await RawClient.connect(ex.port, "/stream?streams=btcusdt@depth@100ms/btcusdt@trade")
    other = await RawClient.connect(ex.port, "/stream?streams=ethusdt@depth@100ms")
    try:
        await depth.pump(lambda: len(depth.messages) >= 2)
        async with httpx.AsyncClient(base_url=http_url(ex)) as http:
            r = await http.post("/fake/disconnect", json={"stream": "BTCUSDT@depth@100ms"})
            bad = await http.post("/fake/disconnect", json={"stream": 3})
        assert r.json() == {"connections": 1} and bad.status_code == 400
        await depth.pump(lambda: depth.eof or depth.closed is not None)
        seen = len(other.messages)
        await other.pump(lambda: len(other.messages) >= seen + 2)
    finally:
        await depth.aclose()
        await other.aclose()
    assert depth.eof and depth.closed is None  # a network failure: no close frame
    assert other.closed is None and not other.eof
    assert ex.counters["disconnect"] == 1


async def test_depth_faults_switched_at_runtime_show_in_stats(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT",))
    async with httpx.AsyncClient(base_url=http_url(ex)) as http:
        r = await http.post("/fake/faults", json={"depth_drop_after": 2})
        assert r.status_code == 200 and r.json()["depth_drop_after"] == 2
        async with trio_websocket.open_websocket_url(ws_url(ex, "/ws/btcusdt@depth@100ms")) as ws:
            events = await collect(ws, lambda ms: len(ms) >= 5)
        await http.post("/fake/faults", json={"stale_depth_snapshot": 5})
        snap = (await http.get("/api/v3/depth", params={"symbol": "BTCUSDT"})).json()
        fresh = (await http.get("/api/v3/depth", params={"symbol": "BTCUSDT"})).json()
        stats = (await http.get("/fake/stats")).json()
    jumps = [(a["u"], b["U"]) for a, b in itertools.pairwise(events) if b["U"] != a["u"] + 1]
    (withheld,) = stats["books"]["BTCUSDT"]["withheld"]
    assert jumps == [(withheld[0] - 1, withheld[1] + 1)]
    assert snap["lastUpdateId"] < fresh["lastUpdateId"]
    assert stats["books"]["BTCUSDT"]["stale_snapshots"] == [snap["lastUpdateId"]]
    assert stats["faults_injected"] == {"depth_drop": 1, "stale_depth_snapshot": 1}
    assert stats["books"]["BTCUSDT"]["last_update_id"] >= fresh["lastUpdateId"]
    assert json.dumps(stats)  # JSON all the way
