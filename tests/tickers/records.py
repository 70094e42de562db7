"""Ticker records and runtimes for the hot-path tests (tickers/ and api/)."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from marketd.config import Value, load_config
from marketd.metrics import MetricsFactory
from marketd.records import SCHEMA_VERSION, TickerRecord
from marketd.runtime import Runtime


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ticker(symbol: str = "BTCUSDT", event_time: int | None = None, **over: Any) -> TickerRecord:
    t = now_ms() if event_time is None else event_time
    fields: dict[str, Any] = {
        "symbol": symbol,
        "last_price": "118234.56000000",
        "last_qty": "0.00100000",
        "price_change": "-12.50000000",
        "price_change_pct": "-0.011",
        "weighted_avg_price": "118000.10000000",
        "open": "118247.06000000",
        "high": "119000.00000000",
        "low": "117000.00000000",
        "volume": "12345.60000000",
        "quote_volume": "1456789012.30000000",
        "best_bid": "118234.55000000",
        "best_bid_qty": "1.20000000",
        "best_ask": "118234.57000000",
        "best_ask_qty": "0.50000000",
        "open_time": t - 86_400_000,
        "close_time": t,
        "first_trade_id": 100,
        "last_trade_id": 200,
        "trades_count": 101,
        "event_time": t,
        "ingested_at": t + 1,
        "source": "binance",
        "stream": f"{symbol.lower()}@ticker",
        "schema_version": SCHEMA_VERSION,
    }
    fields.update(over)
    return TickerRecord(**fields)


def encode(record: TickerRecord) -> bytes:
    return msgspec.json.encode(record)


def as_dict(record: TickerRecord) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(record)
    return out


def runtime(
    *,
    kafka: str = "127.0.0.1:1",
    redis_url: str | None = None,
    env: dict[str, str] | None = None,
    consumer: dict[str, str] | None = None,
) -> Runtime:
    """A Runtime as the daemon builds it; `consumer` = the [kafka.consumer] passthrough table."""
    environ = {"KAFKA_BOOTSTRAP_SERVERS": kafka, **(env or {})}
    # The tests' mock cluster is reached by address, so the consumer cannot tell it is the mock:
    # give it the mock's fetch wait (it answers fetches only when that expires).
    table = {"fetch.wait.max.ms": "1", **(consumer or {})}
    overrides = {"kafka.consumer": Value(table, "test")}
    cfg = load_config(environ=environ, dotenv=None, overrides=overrides).config
    return Runtime(cfg, MetricsFactory(), kafka, redis_url)
