"""Trade aggregation: raw_trades -> OHLCV bars per symbol for 1m, 5m and 15m tumbling windows.

Each window is emitted once, with its final values, when the watermark (max trade time - the
watermark delay) passes its end; trades for a window still open update it, later ones are counted
(per symbol and interval) and dropped. Prices, volumes and VWAP are exact decimals end to end.
Sinks: Parquet (date/symbol partitions), PostgreSQL `trade_aggregates`, Redis `<prefix>:agg:*`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from marketd_spark import cli
from marketd_spark.jobs.common import interval_ms, make_sinks, run_main
from marketd_spark.logs import event, get_logger
from marketd_spark.reduce import reduce_windows, windowed
from marketd_spark.sinks import Row, Sink, Table
from marketd_spark.sinks.redis import Latest
from marketd_spark.sources import read_values
from marketd_spark.windows import CTX, WindowAcc, WindowBook

log = get_logger(__name__)

NAME = "trade_aggregation"
VWAP_QUANTUM = Decimal("1e-16")  # VWAP = quote_volume / volume, rounded half-even to 16 places

PRICE_T = pa.decimal128(18, 8)
VOLUME_T = pa.decimal128(38, 8)
QUOTE_T = pa.decimal128(38, 16)
SCHEMA = pa.schema(
    [
        ("symbol", pa.string()),
        ("interval", pa.string()),
        ("window_start", pa.int64()),
        ("window_end", pa.int64()),
        ("open", PRICE_T),
        ("high", PRICE_T),
        ("low", PRICE_T),
        ("close", PRICE_T),
        ("volume", VOLUME_T),
        ("quote_volume", QUOTE_T),
        ("vwap", QUOTE_T),
        ("trades_count", pa.int64()),
        ("taker_buy_volume", VOLUME_T),
        ("taker_sell_volume", VOLUME_T),
    ]
)
COLUMNS = tuple(SCHEMA.names)

TABLE = Table(
    name="trade_aggregates",
    schema=SCHEMA,
    time_column="window_start",
    pg_columns=COLUMNS,
    pg_conflict="(symbol, interval, window_start)",
    to_pg=lambda r: [r[c] for c in COLUMNS],
)


def parser() -> argparse.ArgumentParser:
    p = cli.base_parser(__doc__.splitlines()[0])
    p.add_argument("--watermark-seconds", type=float, default=10.0)
    p.add_argument(
        "--intervals", default="1m,5m,15m", help="comma-separated window lengths (1m,5m,15m)"
    )
    p.add_argument(
        "--max-future-ms",
        type=int,
        default=5_000,
        help="reject trades stamped further than this ahead of their ingested_at",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = cli.check(p, p.parse_args(argv))
    try:
        args.interval_labels = [s.strip() for s in args.intervals.split(",") if s.strip()]
        args.intervals_ms = [interval_ms(s) for s in args.interval_labels]
    except argparse.ArgumentTypeError as exc:
        p.error(f"--intervals: {exc}")
    if args.watermark_seconds < 0:
        p.error("--watermark-seconds must be >= 0")
    return args


def vwap(quote_volume: Decimal, volume: Decimal) -> Decimal | None:
    if volume == 0:
        return None
    return CTX.divide(quote_volume, volume).quantize(VWAP_QUANTUM, rounding=ROUND_HALF_EVEN)


def window_row(symbol: str, label: str, size_ms: int, start: int, acc: WindowAcc) -> Row:
    return {
        "symbol": symbol,
        "interval": label,
        "window_start": start,
        "window_end": start + size_ms,
        "open": acc.first.price,
        "high": acc.high,
        "low": acc.low,
        "close": acc.last.price,
        "volume": acc.volume,
        "quote_volume": acc.quote_volume,
        "vwap": vwap(acc.quote_volume, acc.volume),
        "trades_count": acc.count,
        "taker_buy_volume": acc.taker_buy_volume,
        "taker_sell_volume": acc.taker_sell_volume,
    }


def redis_latest(prefix: str) -> Any:
    def latest(rows: list[Row]) -> Iterable[Latest]:
        for r in rows:
            yield f"{prefix}:agg:{r['symbol']}:{r['interval']}", r["window_start"], r

    return latest


class TradeAggregation:
    name = NAME

    def __init__(self, args: argparse.Namespace, sinks: list[Sink]) -> None:
        self.delay_ms = round(args.watermark_seconds * 1000)
        self.intervals_ms: list[int] = args.intervals_ms
        # Every interval is a whole number of base windows (epoch-aligned): Spark reduces each
        # trade once, into its base window, and the driver unions base windows exactly.
        self.base_ms = math.gcd(*self.intervals_ms)
        self.labels = dict(zip(args.intervals_ms, args.interval_labels, strict=True))
        self.max_future_ms: int = args.max_future_ms
        self.sinks = sinks
        self.stats: dict[str, Any] = {}  # the counters after the last batch (tests, logs)

    def process(self, batch: DataFrame, batch_id: int, state: dict[str, Any]) -> dict[str, Any]:
        book = WindowBook(self.delay_ms)
        book.load(state.get("book", {}))
        counters = state.get(
            "counters", {"accepted": 0, "late": {}, "rejected": {}, "windows_emitted": 0}
        )
        watermark = book.watermark_ms  # the one left by the previous batches
        reduced = reduce_windows(windowed(batch, self.base_ms, self.max_future_ms), self.base_ms)
        late: dict[tuple[str, int], int] = {}
        for part in reduced.partials:
            counters["accepted"] += part.acc.count
            for size in self.intervals_ms:
                start = part.window_start - part.window_start % size
                if watermark is not None and start + size <= watermark:
                    late[(part.symbol, size)] = late.get((part.symbol, size), 0) + part.acc.count
                    continue
                book.add((part.symbol, size, start), part.acc.copy())
            book.observe(part.max_time_ms)
        rows = [
            window_row(sym, self.labels[size], size, start, acc)
            for (sym, size, start), acc in book.close_ready()
        ]
        for sink in self.sinks:
            sink.write(batch_id, rows)
        for (sym, size), n in sorted(late.items()):
            key = f"{sym}|{self.labels[size]}"
            counters["late"][key] = counters["late"].get(key, 0) + n
            event(
                log,
                "trades.late_dropped",
                level=logging.WARNING,
                batch=batch_id,
                symbol=sym,
                interval=self.labels[size],
                count=n,
                watermark_ms=book.watermark_ms,
            )
        for kind, n in reduced.rejected.items():
            counters["rejected"][kind] = counters["rejected"].get(kind, 0) + n
            event(log, "trades.rejected", level=logging.WARNING, batch=batch_id, kind=kind, count=n)
        counters["windows_emitted"] += len(rows)
        self.stats = counters
        event(
            log,
            "aggregation.batch",
            batch=batch_id,
            windows=len(rows),
            open_windows=len(book.open),
            watermark_ms=book.watermark_ms,
        )
        return {"book": book.to_json(), "counters": counters}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build(spark: SparkSession, args: argparse.Namespace) -> tuple[DataFrame, TradeAggregation]:
    values = read_values(spark, args, cli.topic("TOPIC_RAW_TRADES", "raw_trades"))
    sinks = make_sinks(args, TABLE, latest=redis_latest(args.redis_prefix))
    return values, TradeAggregation(args, sinks)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, parse_args(argv), build)
