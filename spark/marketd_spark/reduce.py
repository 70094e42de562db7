"""Spark side of the trade jobs: one micro-batch of raw_trades -> one partial per base window.

`windowed` parses and validates the batch and assigns every valid trade to its base window;
`reduce_windows` aggregates per (status, symbol, window) in one pass (exact decimals). The result is
small (symbols x windows) and is collected to the driver, which owns the state and the watermark.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from marketd_spark.anomalies import BINS_PER_DECADE
from marketd_spark.records import PRICE, QTY, TRADE_FIELDS, parse, trade_status
from marketd_spark.windows import Tick, WindowAcc


@dataclass(frozen=True)
class Partial:
    symbol: str
    interval_ms: int
    window_start: int
    acc: WindowAcc
    max_time_ms: int


@dataclass
class Reduced:
    partials: list[Partial]
    late: dict[tuple[str, int], int]  # (symbol, interval_ms) -> trades dropped as late
    rejected: dict[str, int]  # "invalid" | "future" -> count


def windowed(batch: DataFrame, base_ms: int, max_future_ms: int) -> DataFrame:
    """Valid trades with their `base_ms` window start and quote value, invalid ones flagged.

    Only the finest window (the gcd of the job's intervals) is computed here: coarser windows are
    unions of whole base windows, so the driver derives them from the base partials exactly, and
    Spark aggregates each trade once instead of once per interval."""
    t = parse(batch, TRADE_FIELDS)
    status = trade_status(max_future_ms)
    ok = status == "ok"
    start = F.col("trade_time") - F.pmod(F.col("trade_time"), F.lit(int(base_ms)))
    t = t.select(
        status.alias("status"),
        F.when(ok, F.col("symbol")).alias("symbol"),
        F.col("trade_id"),
        F.col("trade_time"),
        F.col("is_buyer_maker"),
        F.col("price").try_cast(PRICE).alias("p"),
        F.col("quantity").try_cast(QTY).alias("q"),
        F.when(ok, start).alias("window_start"),
    )
    return t.withColumn("quote", F.col("p") * F.col("q"))


def mark_late(t: DataFrame, base_ms: int, watermark_ms: int | None) -> DataFrame:
    """Status 'late' for trades whose (single-interval) window the watermark already closed."""
    if watermark_ms is None:
        return t
    late = (F.col("status") == "ok") & (
        F.col("window_start") + F.lit(int(base_ms)) <= F.lit(watermark_ms)
    )
    return t.withColumn("status", F.when(late, F.lit("late")).otherwise(F.col("status")))


def _dec(value: Decimal | None) -> Decimal:
    return Decimal(0) if value is None else value


def reduce_windows(t: DataFrame, base_ms: int) -> Reduced:
    maker = F.col("is_buyer_maker")
    tick = F.struct(F.col("trade_time"), F.col("trade_id"), F.col("p"))
    rows = (
        t.groupBy("status", "symbol", "window_start")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.min(tick).alias("first"),
            F.max(tick).alias("last"),
            F.max("p").alias("high"),
            F.min("p").alias("low"),
            F.sum("q").alias("volume"),
            F.sum("quote").alias("quote_volume"),
            # is_buyer_maker = true: the buyer was the resting order, so the taker sold.
            F.sum(F.when(~maker, F.col("q"))).alias("buy"),
            F.sum(F.when(maker, F.col("q"))).alias("sell"),
            F.max("trade_time").alias("max_t"),
        )
        .collect()
    )
    out = Reduced([], {}, {})
    for r in rows:
        if r["status"] == "ok":
            acc = WindowAcc(
                count=r["n"],
                first=Tick(r["first"][0], r["first"][1], r["first"][2]),
                last=Tick(r["last"][0], r["last"][1], r["last"][2]),
                high=r["high"],
                low=r["low"],
                volume=_dec(r["volume"]),
                quote_volume=_dec(r["quote_volume"]),
                taker_buy_volume=_dec(r["buy"]),
                taker_sell_volume=_dec(r["sell"]),
            )
            out.partials.append(Partial(r["symbol"], base_ms, r["window_start"], acc, r["max_t"]))
        elif r["status"] == "late":
            key = (r["symbol"], base_ms)
            out.late[key] = out.late.get(key, 0) + r["n"]
        else:
            out.rejected[r["status"]] = out.rejected.get(r["status"], 0) + r["n"]
    return out


def _bin(quote: Column) -> Column:
    return F.floor(F.log10(quote.cast(T.DoubleType())) * F.lit(BINS_PER_DECADE)).cast(
        T.IntegerType()
    )


def top_trades(t: DataFrame, k: int) -> list[tuple[str, int, Decimal, int, int]]:
    """(symbol, window_start, quote, trade_id, trade_time) of the k largest trades per window."""
    ok = t.filter(F.col("status") == "ok")
    w = Window.partitionBy("symbol", "window_start").orderBy(F.desc("quote"), F.asc("trade_id"))
    rows = (
        ok.withColumn("rank", F.row_number().over(w))
        .filter(F.col("rank") <= k)
        .select("symbol", "window_start", "quote", "trade_id", "trade_time")
        .collect()
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def quote_histogram(t: DataFrame) -> list[tuple[str, int, int, int]]:
    """(symbol, window_start, bin, count): bin = floor(log10(quote value) * BINS_PER_DECADE)."""
    ok = t.filter(F.col("status") == "ok")
    rows = ok.groupBy("symbol", "window_start", _bin(F.col("quote")).alias("bin")).count().collect()
    return [(r[0], r[1], r[2], r[3]) for r in rows]
