"""Well-formed sample records for benchmarks and demos (realistic values, chosen times)."""

from __future__ import annotations

from marketd.records import SCHEMA_VERSION, SOURCE, TickerRecord

# Ten liquid symbols of docs/contract.md §1 (MATICUSDT, which never trades, left out): the
# benches' tape.
BENCH_SYMBOLS = (
    "btcusdt",
    "ethusdt",
    "bnbusdt",
    "solusdt",
    "xrpusdt",
    "adausdt",
    "dogeusdt",
    "avaxusdt",
    "dotusdt",
    "linkusdt",
)


def ticker_record(symbol: str, event_time: int, trades_count: int = 18051) -> TickerRecord:
    """A raw_tickers record for `symbol` whose 24 h window ends at `event_time` (ms)."""
    return TickerRecord(
        symbol, "100.5", "0.1", "-1.2", "-0.5", "100.1", "101.2", "110.0", "90.0", "12345.6",
        "1456789012.3", "100.4", "1.0", "100.6", "2.0", event_time - 86_400_000, event_time, 1,
        trades_count, trades_count, event_time, event_time, SOURCE, f"{symbol.lower()}@ticker",
        SCHEMA_VERSION,
    )  # fmt: skip
