"""Everything agrees with the tape: WS trades = REST trades, klines and tickers = their trades."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import trio
import trio_websocket

from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import collect, data_of, http_url, ws_url


def _finals(msgs: list[Any], stream: str) -> list[dict[str, Any]]:
    return [d["k"] for d in data_of(msgs, stream) if d["k"]["x"]]


async def _trades(client: httpx.AsyncClient, first: int, last: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while first <= last:
        r = await client.get(
            "/api/v3/historicalTrades",
            params={"symbol": "BTCUSDT", "fromId": first, "limit": min(1000, last - first + 1)},
        )
        r.raise_for_status()
        out += r.json()
        first = out[-1]["id"] + 1
    return out


async def test_rest_historical_trades_equal_what_the_websocket_sent(start: Start) -> None:
    ex = await start(rate=3000)
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws/btcusdt@trade")) as ws:
        sent = await collect(ws, lambda ms: len(ms) >= 1500)
    async with httpx.AsyncClient(base_url=http_url(ex)) as client:
        rest = await _trades(client, sent[0]["t"], sent[-1]["t"])
    assert [(t["id"], t["price"], t["qty"], t["time"], t["isBuyerMaker"]) for t in rest] == [
        (d["t"], d["p"], d["q"], d["T"], d["m"]) for d in sent
    ]
    for t in rest[:50]:
        assert Decimal(t["quoteQty"]) == (Decimal(t["price"]) * Decimal(t["qty"])).quantize(
            Decimal("1e-8"), rounding="ROUND_DOWN"
        )


async def test_final_klines_match_their_trades_and_rest_klines(start: Start) -> None:
    ex = await start(rate=1500)
    url = ws_url(ex, "/stream?streams=btcusdt@trade/btcusdt@kline_1s")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: len(_finals(ms, "btcusdt@kline_1s")) >= 2, timeout=8)
    final = _finals(msgs, "btcusdt@kline_1s")[-1]
    assert final["T"] == final["t"] + 999 and final["n"] == final["L"] - final["f"] + 1
    # The final frame comes after the window closed (E a few ms after T).
    final_event = next(d for d in data_of(msgs, "btcusdt@kline_1s") if d["k"] is final)
    assert final_event["E"] > final["T"]
    async with httpx.AsyncClient(base_url=http_url(ex)) as client:
        trades = await _trades(client, final["f"], final["L"])
        r = await client.get(
            "/api/v3/klines",
            params={"symbol": "BTCUSDT", "interval": "1s", "startTime": final["t"], "limit": 1},
        )
    prices = [Decimal(t["price"]) for t in trades]
    assert all(final["t"] <= t["time"] <= final["T"] for t in trades)
    assert Decimal(final["o"]) == prices[0] and Decimal(final["c"]) == prices[-1]
    assert Decimal(final["h"]) == max(prices) and Decimal(final["l"]) == min(prices)
    assert Decimal(final["v"]) == sum(Decimal(t["qty"]) for t in trades)
    assert Decimal(final["V"]) == sum(Decimal(t["qty"]) for t in trades if not t["isBuyerMaker"])
    # The WS trades inside the window are exactly the kline's ids.
    ws_ids = [d["t"] for d in data_of(msgs, "btcusdt@trade") if final["t"] <= d["T"] <= final["T"]]
    assert ws_ids == list(range(final["f"], final["L"] + 1))
    [row] = r.json()
    assert row == [
        final["t"], final["o"], final["h"], final["l"], final["c"], final["v"], final["T"],
        final["q"], final["n"], final["V"], final["Q"], "0",
    ]  # fmt: skip


async def test_kline_boundary_with_the_simulated_clock(start: Start) -> None:
    ex = await start(rate=200)
    url = ws_url(ex, "/stream?streams=btcusdt@kline_1m/btcusdt@kline_1m@+08:00")
    async with trio_websocket.open_websocket_url(url) as ws:
        first = (await collect(ws, lambda ms: len(ms) >= 1))[0]["data"]["k"]
        assert first["x"] is False
        ex.advance_clock(60)
        msgs = await collect(
            ws,
            lambda ms: bool(
                _finals(ms, "btcusdt@kline_1m") and _finals(ms, "btcusdt@kline_1m@+08:00")
            ),
        )
        msgs += await collect(ws, lambda ms: any(not m["data"]["k"]["x"] for m in ms))
    final = _finals(msgs, "btcusdt@kline_1m")[0]
    assert final["t"] == first["t"] and final["T"] == first["t"] + 59_999
    later = [m["data"]["k"] for m in msgs if not m["data"]["k"]["x"]]
    assert later[-1]["t"] > final["t"]
    # +08:00 minute windows coincide with UTC minutes.
    assert _finals(msgs, "btcusdt@kline_1m@+08:00")[0]["t"] == final["t"]


async def test_ticker_figures_match_the_trades(start: Start) -> None:
    ex = await start(rate=500)
    url = ws_url(ex, "/stream?streams=btcusdt@ticker")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 2, timeout=5)
    tick = msgs[-1]["data"]
    assert tick["n"] == tick["L"] - tick["F"] + 1
    async with httpx.AsyncClient(base_url=http_url(ex)) as client:
        trades = await _trades(client, tick["F"], tick["L"])
    prices = [Decimal(t["price"]) for t in trades]
    assert Decimal(tick["c"]) == prices[-1] and Decimal(tick["o"]) == prices[0]
    assert Decimal(tick["h"]) == max(prices) and Decimal(tick["l"]) == min(prices)
    assert Decimal(tick["v"]) == sum(Decimal(t["qty"]) for t in trades)
    assert Decimal(tick["p"]) == prices[-1] - prices[0]
    assert tick["C"] - tick["O"] == 86_400_000


async def test_aggtrades_rest_equals_websocket(start: Start) -> None:
    ex = await start(rate=1000)
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws/btcusdt@aggTrade")) as ws:
        sent = await collect(ws, lambda ms: len(ms) >= 200)
    async with httpx.AsyncClient(base_url=http_url(ex)) as client:
        by_id = await client.get(
            "/api/v3/aggTrades", params={"symbol": "BTCUSDT", "fromId": sent[0]["a"], "limit": 200}
        )
        by_time = await client.get(
            "/api/v3/aggTrades",
            params={"symbol": "BTCUSDT", "startTime": sent[0]["T"], "endTime": sent[-1]["T"],
                    "limit": 1000},
        )  # fmt: skip
    keys = ("a", "p", "q", "f", "l", "T", "m", "M")
    want = [{k: d[k] for k in keys} for d in sent]
    for got_one, want_one in zip(by_id.json(), want, strict=True):
        assert got_one == want_one
    got = [a for a in by_time.json() if sent[0]["a"] <= a["a"] <= sent[-1]["a"]]
    assert got == want
    await trio.lowlevel.checkpoint()
