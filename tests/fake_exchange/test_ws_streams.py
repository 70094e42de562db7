"""WebSocket handshake, paths, and every payload's keys and JSON types (docs/binance.md §1, §4)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio_websocket

from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import collect, data_of, ws_url

DEC = re.compile(r"^-?\d+\.\d{8}$")


class Dec:
    """A decimal string with 8 decimals."""


TRADE = {"e": str, "E": int, "s": str, "t": int, "p": Dec, "q": Dec, "T": int, "m": bool, "M": bool}
AGG = {"e": str, "E": int, "s": str, "a": int, "p": Dec, "q": Dec, "f": int, "l": int, "T": int,
       "m": bool, "M": bool}  # fmt: skip
KLINE_K = {"t": int, "T": int, "s": str, "i": str, "f": int, "L": int, "o": Dec, "c": Dec,
           "h": Dec, "l": Dec, "v": Dec, "n": int, "x": bool, "q": Dec, "V": Dec, "Q": Dec,
           "B": str}  # fmt: skip
TICKER = {"e": str, "E": int, "s": str, "p": Dec, "P": str, "w": Dec, "x": Dec, "c": Dec,
          "Q": Dec, "b": Dec, "B": Dec, "a": Dec, "A": Dec, "o": Dec, "h": Dec, "l": Dec,
          "v": Dec, "q": Dec, "O": int, "C": int, "F": int, "L": int, "n": int}  # fmt: skip
MINI = {"e": str, "E": int, "s": str, "c": Dec, "o": Dec, "h": Dec, "l": Dec, "v": Dec, "q": Dec}
ROLLING = {"e": str, "E": int, "s": str, "p": Dec, "P": str, "o": Dec, "h": Dec, "l": Dec,
           "c": Dec, "w": Dec, "v": Dec, "q": Dec, "O": int, "C": int, "F": int, "L": int,
           "n": int}  # fmt: skip
BOOK = {"u": int, "s": str, "b": Dec, "B": Dec, "a": Dec, "A": Dec}
AVG = {"e": str, "E": int, "s": str, "i": str, "w": Dec, "T": int}


def assert_shape(obj: dict[str, Any], shape: dict[str, type]) -> None:
    assert set(obj) == set(shape), set(obj) ^ set(shape)
    for key, kind in shape.items():
        value = obj[key]
        if kind is Dec:
            assert isinstance(value, str) and DEC.match(value), (key, value)
        elif kind is int:
            assert type(value) is int, (key, value)  # not bool
        else:
            assert isinstance(value, kind), (key, value)


ALL = [
    "btcusdt@trade",
    "btcusdt@aggTrade",
    "btcusdt@kline_1s",
    "btcusdt@kline_1m@+08:00",
    "btcusdt@ticker",
    "btcusdt@miniTicker",
    "!miniTicker@arr",
    "btcusdt@bookTicker",
    "btcusdt@ticker_1h",
    "btcusdt@ticker_4h",
    "btcusdt@ticker_1d",
    "btcusdt@avgPrice",
]


async def test_combined_stream_carries_every_kind_with_binance_keys_and_types(start: Start) -> None:
    ex = await start(rate=300)
    url = ws_url(ex, "/stream?streams=" + "/".join(ALL))
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: {m["stream"] for m in ms} >= set(ALL))
    for m in msgs:
        assert set(m) == {"stream", "data"}
    for d in data_of(msgs, "btcusdt@trade"):
        assert_shape(d, TRADE)
        assert d["e"] == "trade" and d["s"] == "BTCUSDT" and d["E"] >= d["T"]
    for d in data_of(msgs, "btcusdt@aggTrade"):
        assert_shape(d, AGG)
        assert d["e"] == "aggTrade" and d["f"] <= d["l"]
    for name, interval in (("btcusdt@kline_1s", "1s"), ("btcusdt@kline_1m@+08:00", "1m")):
        for d in data_of(msgs, name):
            assert set(d) == {"e", "E", "s", "k"} and d["e"] == "kline"
            assert_shape(d["k"], KLINE_K)
            assert d["k"]["i"] == interval
    for d in data_of(msgs, "btcusdt@ticker"):
        assert_shape(d, TICKER)
        assert d["e"] == "24hrTicker"
        assert d["n"] == d["L"] - d["F"] + 1
    for d in data_of(msgs, "btcusdt@miniTicker"):
        assert_shape(d, MINI)
        assert d["e"] == "24hrMiniTicker"
    for arr in data_of(msgs, "!miniTicker@arr"):
        assert isinstance(arr, list) and arr
        for d in arr:
            assert_shape(d, MINI)
        # MATICUSDT never trades, so it never appears.
        assert "MATICUSDT" not in {d["s"] for d in arr}
    for d in data_of(msgs, "btcusdt@bookTicker"):
        assert_shape(d, BOOK)
        assert d["b"] < d["a"] or len(d["b"]) < len(d["a"])
    for w in ("1h", "4h", "1d"):
        for d in data_of(msgs, f"btcusdt@ticker_{w}"):
            assert_shape(d, ROLLING)
            assert d["e"] == f"{w}Ticker"
            assert d["O"] % 60_000 == 0  # whole minute (docs/binance.md §4.6)
    for d in data_of(msgs, "btcusdt@avgPrice"):
        assert_shape(d, AVG)


@pytest.mark.parametrize("path", ["/ws/btcusdt@trade", "/ws"])
async def test_raw_paths_send_bare_payloads(start: Start, path: str) -> None:
    ex = await start()
    async with trio_websocket.open_websocket_url(ws_url(ex, path)) as ws:
        if path == "/ws":
            await ws.send_message('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
            assert (await collect(ws, lambda ms: len(ms) >= 1))[0] == {"result": None, "id": 1}
        msgs = await collect(ws, lambda ms: len(ms) >= 5)
    for d in msgs:
        assert_shape(d, TRADE)


async def test_microsecond_time_unit(start: Start) -> None:
    ex = await start()
    url = ws_url(ex, "/stream?streams=btcusdt@trade/btcusdt@kline_1s&timeUnit=MICROSECOND")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(
            ws,
            lambda ms: bool(data_of(ms, "btcusdt@kline_1s") and data_of(ms, "btcusdt@trade")),
        )
    trade = data_of(msgs, "btcusdt@trade")[0]
    assert len(str(trade["E"])) == 16 and len(str(trade["T"])) == 16
    k = data_of(msgs, "btcusdt@kline_1s")[0]["k"]
    assert k["t"] % 1_000_000 == 0 and k["T"] == k["t"] + 999_999


async def test_percent_encoded_stream_names_are_decoded(start: Start) -> None:
    ex = await start()
    url = ws_url(ex, "/stream?streams=btcusdt%40trade%2Fbtcusdt%40kline_1m%40%2B08%3A00")
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":9}')
        msgs = await collect(ws, lambda ms: any(m.get("id") == 9 for m in ms))
    reply = next(m for m in msgs if m.get("id") == 9)
    assert reply["result"] == ["btcusdt@trade", "btcusdt@kline_1m@+08:00"]


async def test_unknown_stream_in_url_is_refused(start: Start) -> None:
    # A raw socket: trio-websocket leaks its socket when a handshake is rejected.
    ex = await start()
    assert ex.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", ex.port)
    async with stream:
        await stream.send_all(
            b"GET /stream?streams=btcusdt@nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        with trio.fail_after(5):
            head = await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 400")
    assert b"invalid stream" in head


async def test_silent_and_unknown_symbols_are_accepted_but_never_deliver(start: Start) -> None:
    ex = await start()
    url = ws_url(ex, "/stream?streams=maticusdt@trade/maticusdt@ticker/btcusdt@trade")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 300, timeout=10)
        await trio.sleep(1.2)  # one ticker period
    assert {m["stream"] for m in msgs} == {"btcusdt@trade"}


async def test_trade_ids_are_sequential_per_symbol(start: Start) -> None:
    ex = await start(rate=2000)
    url = ws_url(ex, "/stream?streams=btcusdt@trade/ethusdt@trade")
    async with trio_websocket.open_websocket_url(url) as ws:
        msgs = await collect(ws, lambda ms: len(ms) >= 1000)
    for sym in ("btcusdt", "ethusdt"):
        ids = [d["t"] for d in data_of(msgs, f"{sym}@trade")]
        assert ids and ids == list(range(ids[0], ids[0] + len(ids)))
    led = ex.ledger.trade_id_range("BTCUSDT")
    assert led.start <= data_of(msgs, "btcusdt@trade")[0]["t"]
