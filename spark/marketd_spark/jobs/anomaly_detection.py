"""Anomaly detection: raw_trades -> volume spikes, price jumps, volatility changes, whale trades.

Trades are bucketed into per-symbol tumbling windows (1 minute by default) with the same watermark
rules as trade aggregation; when a window closes it is scored against the symbol's baseline
(marketd_spark.anomalies) and every anomaly found is written once. Rules, thresholds and baselines
are flags (see --help and spark/README.md). Sinks: Parquet, PostgreSQL `anomalies`, Redis sorted
set `<prefix>:anomalies:<SYMBOL>` (latest 500).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from marketd_spark import cli
from marketd_spark.anomalies import Detector, Rules
from marketd_spark.jobs.common import interval_ms, make_sinks, run_main
from marketd_spark.logs import event, get_logger
from marketd_spark.reduce import (
    mark_late,
    quote_histogram,
    reduce_windows,
    top_trades,
    windowed,
)
from marketd_spark.sinks import Row, Sink, Table
from marketd_spark.sources import read_values
from marketd_spark.windows import WindowBook

log = get_logger(__name__)

NAME = "anomaly_detection"
TYPES = ("volume_spike", "price_jump", "volatility_change", "whale_trade")

SCHEMA = pa.schema(
    [
        ("symbol", pa.string()),
        ("type", pa.string()),
        ("window_start", pa.int64()),
        ("window_end", pa.int64()),
        ("observed", pa.float64()),
        ("baseline", pa.float64()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("detected_at", pa.int64()),
        ("trade_id", pa.int64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
TABLE = Table(
    name="anomalies",
    schema=SCHEMA,
    time_column="window_start",
    pg_columns=COLUMNS,
    pg_conflict="(symbol, type, window_start, anomaly_key)",
    to_pg=lambda r: [r[c] for c in COLUMNS],
)


def _symbol_threshold(text: str) -> tuple[str, float]:
    symbol, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return symbol.strip().upper(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYMBOL=QUOTE_VALUE") from None


def parser() -> argparse.ArgumentParser:
    p = cli.base_parser(__doc__.splitlines()[0])
    p.add_argument("--window", default="1m", help="window length (1m)")
    p.add_argument("--watermark-seconds", type=float, default=10.0)
    p.add_argument("--max-future-ms", type=int, default=5_000)
    p.add_argument("--baseline-windows", type=int, default=30, help="baseline length, windows")
    p.add_argument(
        "--min-baseline-windows", type=int, default=10, help="no verdict on a shorter baseline"
    )
    p.add_argument("--volume-z", type=float, default=3.0, help="volume spike: z-score >= this")
    p.add_argument("--price-z", type=float, default=4.0, help="price jump: |return z| >= this")
    p.add_argument(
        "--volatility-ratio",
        type=float,
        default=5.0,
        help="volatility change: (high-low)/vwap over its baseline mean >= this",
    )
    p.add_argument("--whale-percentile", type=float, default=99.9)
    p.add_argument(
        "--whale-min-trades",
        type=int,
        default=1_000,
        help="baseline trades needed before the percentile applies",
    )
    p.add_argument("--whale-quote-abs", type=float, help="absolute whale quote value, all symbols")
    p.add_argument(
        "--whale-quote-abs-symbol",
        type=_symbol_threshold,
        action="append",
        default=[],
        metavar="SYMBOL=VALUE",
        help="per-symbol absolute whale quote value (repeatable)",
    )
    p.add_argument("--whale-top-k", type=int, default=20, help="whales reported per window, max")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = cli.check(p, p.parse_args(argv))
    try:
        window = interval_ms(args.window)
    except argparse.ArgumentTypeError as exc:
        p.error(f"--window: {exc}")
    if not 0 < args.whale_percentile < 100:
        p.error("--whale-percentile must be between 0 and 100")
    if args.baseline_windows < 2 or not 2 <= args.min_baseline_windows <= args.baseline_windows:
        p.error("need 2 <= --min-baseline-windows <= --baseline-windows")
    if args.whale_top_k < 1:
        p.error("--whale-top-k must be >= 1")
    args.rules = Rules(
        window_ms=window,
        baseline_windows=args.baseline_windows,
        min_baseline_windows=args.min_baseline_windows,
        volume_z=args.volume_z,
        price_z=args.price_z,
        volatility_ratio=args.volatility_ratio,
        whale_percentile=args.whale_percentile,
        whale_min_trades=args.whale_min_trades,
        whale_abs=args.whale_quote_abs,
        whale_abs_by_symbol=dict(args.whale_quote_abs_symbol),
        whale_top_k=args.whale_top_k,
    )
    return args


def redis_events(prefix: str) -> Any:
    def events(rows: list[Row]) -> Iterable[tuple[str, int, Row]]:
        for r in rows:
            yield f"{prefix}:anomalies:{r['symbol']}", r["window_start"], r

    return events


class AnomalyDetection:
    name = NAME

    def __init__(self, args: argparse.Namespace, sinks: list[Sink]) -> None:
        self.rules: Rules = args.rules
        self.delay_ms = round(args.watermark_seconds * 1000)
        self.max_future_ms: int = args.max_future_ms
        self.sinks = sinks
        self.stats: dict[str, Any] = {}

    def process(self, batch: DataFrame, batch_id: int, state: dict[str, Any]) -> dict[str, Any]:
        rules = self.rules
        book = WindowBook(self.delay_ms, top_k=rules.whale_top_k)
        book.load(state.get("book", {}))
        detector = Detector(rules)
        detector.load(state.get("baselines", {}))
        counters = state.get("counters", {"late": {}, "rejected": {}, "anomalies": {}})

        t = windowed(batch, rules.window_ms, self.max_future_ms)
        t = mark_late(t, rules.window_ms, book.watermark_ms)
        # Three small aggregations over the same parsed batch: parse it once.
        t = t.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            reduced = reduce_windows(t, rules.window_ms)
            tops = top_trades(t, rules.whale_top_k)
            hist = quote_histogram(t)
        finally:
            t.unpersist()

        partials = {(p.symbol, p.window_start): p for p in reduced.partials}
        for sym, start, quote, trade_id, trade_time in tops:
            partials[(sym, start)].acc.top.append((quote, trade_id, trade_time))
        for sym, start, b, n in hist:
            partials[(sym, start)].acc.hist[b] = n
        for p in reduced.partials:
            book.add((p.symbol, p.interval_ms, p.window_start), p.acc)
            book.observe(p.max_time_ms)

        now_ms = int(time.time() * 1000)
        rows: list[Row] = []
        for (sym, _size, start), acc in book.close_ready():
            rows.extend(detector.evaluate(sym, start, acc, now_ms))
        for sink in self.sinks:
            sink.write(batch_id, rows)

        for (sym, _size), n in reduced.late.items():
            counters["late"][sym] = counters["late"].get(sym, 0) + n
            event(log, "trades.late_dropped", level=logging.WARNING, batch=batch_id, symbol=sym,
                  count=n)  # fmt: skip
        for kind, n in reduced.rejected.items():
            counters["rejected"][kind] = counters["rejected"].get(kind, 0) + n
        for r in rows:
            counters["anomalies"][r["type"]] = counters["anomalies"].get(r["type"], 0) + 1
            event(log, "anomaly.detected", symbol=r["symbol"], type=r["type"],
                  window_start=r["window_start"], score=round(r["score"], 3))  # fmt: skip
        self.stats = counters
        return {"book": book.to_json(), "baselines": detector.to_json(), "counters": counters}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build(spark: SparkSession, args: argparse.Namespace) -> tuple[DataFrame, AnomalyDetection]:
    values = read_values(spark, args, cli.topic("TOPIC_RAW_TRADES", "raw_trades"))
    sinks = make_sinks(args, TABLE, events=redis_events(args.redis_prefix))
    return values, AnomalyDetection(args, sinks)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, parse_args(argv), build)
