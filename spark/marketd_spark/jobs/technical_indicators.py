"""Technical indicators: closed raw_klines -> SMA, EMA, RSI, MACD, Bollinger bands and VWAP per bar.

One output row per closed kline (is_closed = true; open updates are ignored), per symbol and
interval, with values equal to TA-Lib's for the same close series (marketd_spark.indicators). The
per-series state is saved with every micro-batch, so the series continues across batches, dates
and restarts. A closed kline at or before the last one of its series (a duplicate, or one arriving
after a later bar) is counted and skipped: the series cannot be rewritten without recomputing it.
Sinks: Parquet, PostgreSQL `indicators`, Redis `<prefix>:indicators:<SYMBOL>:<interval>`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pyarrow as pa
from psycopg.types.json import Jsonb
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from marketd_spark import cli
from marketd_spark.indicators import IndicatorSpec, Series
from marketd_spark.jobs.common import make_sinks, run_main
from marketd_spark.logs import event, get_logger
from marketd_spark.records import KLINE_SCHEMA, PRICE, kline_ok, parse
from marketd_spark.sinks import Row, Sink, Table
from marketd_spark.sinks.redis import Latest
from marketd_spark.sources import read_values
from marketd_spark.windows import CTX

log = get_logger(__name__)

NAME = "technical_indicators"
VWAP_QUANTUM = Decimal("1e-16")


def _periods(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: periods must be >= 1")
    return values


def parser() -> argparse.ArgumentParser:
    p = cli.base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--sma", "--sma-periods", type=_periods, default=(7, 25, 99), help="SMA periods (7,25,99)"
    )
    p.add_argument(
        "--ema", "--ema-periods", type=_periods, default=(7, 25, 99), help="EMA periods (7,25,99)"
    )
    p.add_argument("--rsi", "--rsi-period", type=int, default=14)
    p.add_argument("--macd", type=_periods, default=(12, 26, 9), help="fast,slow,signal")
    p.add_argument("--bb-period", type=int, default=20)
    p.add_argument("--bb-nbdev", type=float, default=2.0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = cli.check(p, p.parse_args(argv))
    try:
        if len(args.macd) != 3:
            raise ValueError("--macd takes fast,slow,signal")
        args.spec = IndicatorSpec(
            sma=args.sma,
            ema=args.ema,
            rsi=args.rsi,
            macd=args.macd,
            bb_period=args.bb_period,
            bb_nbdev=args.bb_nbdev,
        )
    except ValueError as exc:
        p.error(str(exc))
    return args


def table(spec: IndicatorSpec) -> Table:
    schema = pa.schema(
        [
            ("symbol", pa.string()),
            ("interval", pa.string()),
            ("open_time", pa.int64()),
            ("close", pa.decimal128(18, 8)),
            *((c, pa.float64()) for c in spec.columns),
            ("vwap", pa.decimal128(38, 16)),
        ]
    )
    return Table(
        name="indicators",
        schema=schema,
        time_column="open_time",
        pg_columns=("symbol", "interval", "open_time", "close", "vwap", '"values"'),
        pg_conflict="(symbol, interval, open_time)",
        to_pg=lambda r: [
            r["symbol"],
            r["interval"],
            r["open_time"],
            r["close"],
            r["vwap"],
            Jsonb({c: r[c] for c in spec.columns}),
        ],
    )


VWAP_LIMIT = Decimal(10) ** 22  # decimal(38,16) holds 22 integer digits


def kline_vwap(quote_volume: Decimal, volume: Decimal) -> Decimal | None:
    if volume == 0:
        return None
    vwap = CTX.divide(quote_volume, volume)
    if vwap >= VWAP_LIMIT:
        # Only a corrupt bar (a huge quote volume over a dust volume) gets here; its vwap is no
        # price and must not fail the batch's Parquet write.
        return None
    return vwap.quantize(VWAP_QUANTUM, rounding=ROUND_HALF_EVEN, context=CTX)


def closed_klines(batch: DataFrame) -> DataFrame:
    """Closed klines of the batch, one row per (symbol, interval, open_time); bad ones counted."""
    k = parse(batch, KLINE_SCHEMA).withColumn("ok", kline_ok())
    k = k.filter(~F.col("ok") | F.col("is_closed"))
    key_ok = F.col("ok")
    # Duplicates of one closed bar carry the same values; min() picks one deterministically.
    payload = F.struct(
        F.col("close").try_cast(PRICE).alias("close"),
        F.col("volume").alias("volume"),
        F.col("quote_volume").alias("quote_volume"),
    )
    return k.groupBy(
        "ok",
        F.when(key_ok, F.col("symbol")).alias("symbol"),
        F.when(key_ok, F.col("interval")).alias("interval"),
        F.when(key_ok, F.col("open_time")).alias("open_time"),
    ).agg(F.count(F.lit(1)).alias("n"), F.min(payload).alias("bar"))


def redis_latest(prefix: str) -> Any:
    def latest(rows: list[Row]) -> Iterable[Latest]:
        for r in rows:
            yield f"{prefix}:indicators:{r['symbol']}:{r['interval']}", r["open_time"], r

    return latest


class TechnicalIndicators:
    name = NAME

    def __init__(self, args: argparse.Namespace, sinks: list[Sink]) -> None:
        self.spec: IndicatorSpec = args.spec
        self.sinks = sinks
        self.stats: dict[str, Any] = {}

    def process(self, batch: DataFrame, batch_id: int, state: dict[str, Any]) -> dict[str, Any]:
        series = {
            key: Series.from_json(self.spec, data) for key, data in state.get("series", {}).items()
        }
        counters = state.get("counters", {"bars": 0, "skipped": 0, "invalid": 0, "duplicates": 0})
        bars = closed_klines(batch).collect()
        rows: list[Row] = []
        skipped = 0
        for r in sorted(
            (b for b in bars if b["ok"]), key=lambda b: (b["symbol"], b["interval"], b["open_time"])
        ):
            counters["duplicates"] += r["n"] - 1
            key = f"{r['symbol']}|{r['interval']}"
            s = series.get(key)
            if s is None:
                s = series[key] = Series(self.spec)
            if s.last_open_time is not None and r["open_time"] <= s.last_open_time:
                skipped += 1
                continue
            close: Decimal = r["bar"]["close"]
            values = s.push(float(close))
            s.last_open_time = r["open_time"]
            rows.append(
                {
                    "symbol": r["symbol"],
                    "interval": r["interval"],
                    "open_time": r["open_time"],
                    "close": close,
                    **values,
                    "vwap": kline_vwap(
                        Decimal(r["bar"]["quote_volume"]), Decimal(r["bar"]["volume"])
                    ),
                }
            )
        invalid = sum(b["n"] for b in bars if not b["ok"])
        if invalid:
            event(log, "klines.rejected", level=logging.WARNING, batch=batch_id, count=invalid)
        if skipped:
            event(log, "klines.out_of_order", level=logging.WARNING, batch=batch_id, count=skipped)
        counters["bars"] += len(rows)
        counters["skipped"] += skipped
        counters["invalid"] += invalid
        for sink in self.sinks:
            sink.write(batch_id, rows)
        self.stats = counters
        event(log, "indicators.batch", batch=batch_id, bars=len(rows), series=len(series))
        return {"series": {k: s.to_json() for k, s in series.items()}, "counters": counters}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build(spark: SparkSession, args: argparse.Namespace) -> tuple[DataFrame, TechnicalIndicators]:
    values = read_values(spark, args, cli.topic("TOPIC_RAW_KLINES", "raw_klines"))
    sinks = make_sinks(args, table(args.spec), latest=redis_latest(args.redis_prefix))
    return values, TechnicalIndicators(args, sinks)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, parse_args(argv), build)
