"""Realistic Binance frames (docs/binance.md §4) for ingest tests; times near now (valid)."""

from __future__ import annotations

import json
import time
from typing import Any


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wrap(stream: str, data: Any) -> str:
    return json.dumps({"stream": stream, "data": data}, separators=(",", ":"), ensure_ascii=False)


def trade_data(
    trade_id: int = 1, symbol: str = "BTCUSDT", at: int | None = None, **over: Any
) -> dict[str, Any]:
    at = at or now_ms()
    data = {
        "e": "trade",
        "E": at + 1,
        "s": symbol,
        "t": trade_id,
        "p": "118234.56000000",
        "q": "0.00100000",
        "T": at,
        "m": True,
        "M": True,
    }
    data.update(over)
    return data


def trade(trade_id: int = 1, symbol: str = "BTCUSDT", **over: Any) -> str:
    return wrap(f"{symbol.lower()}@trade", trade_data(trade_id, symbol, **over))


def kline_data(
    symbol: str = "BTCUSDT",
    interval: str = "1m",
    closed: bool = False,
    event_time: int | None = None,
    **over: Any,
) -> dict[str, Any]:
    t = now_ms()
    start = t - t % 60_000
    k = {
        "t": start,
        "T": start + 59_999,
        "s": symbol,
        "i": interval,
        "f": 100,
        "L": 200,
        "o": "0.0018",
        "c": "0.0020",
        "h": "0.0025",
        "l": "0.0015",
        "v": "1000",
        "n": 101,
        "x": closed,
        "q": "1.0000",
        "V": "500",
        "Q": "0.500",
        "B": "123456",
    }
    k.update(over)
    return {"e": "kline", "E": event_time or t, "s": symbol, "k": k}


def kline(symbol: str = "BTCUSDT", interval: str = "1m", **over: Any) -> str:
    return wrap(f"{symbol.lower()}@kline_{interval}", kline_data(symbol, interval, **over))


def ticker_data(symbol: str = "BTCUSDT", **over: Any) -> dict[str, Any]:
    t = now_ms()
    data = {
        "e": "24hrTicker",
        "E": t,
        "s": symbol,
        "p": "-12.50000000",
        "P": "-0.011",
        "w": "118000.10000000",
        "x": "118200.00000000",
        "c": "118234.56000000",
        "Q": "0.00100000",
        "b": "118234.55000000",
        "B": "1.20000000",
        "a": "118234.57000000",
        "A": "0.50000000",
        "o": "118247.06000000",
        "h": "119000.00000000",
        "l": "117000.00000000",
        "v": "12345.60000000",
        "q": "1456789012.30000000",
        "O": t - 86_400_000,
        "C": t,
        "F": 100,
        "L": 200,
        "n": 101,
    }
    data.update(over)
    return data


def ticker(symbol: str = "BTCUSDT", **over: Any) -> str:
    return wrap(f"{symbol.lower()}@ticker", ticker_data(symbol, **over))
