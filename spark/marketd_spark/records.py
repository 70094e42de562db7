"""The raw_trades / raw_klines record contract as Spark schemas, and the checks every job applies.

Values are JSON objects with long field names (schema_version 1; marketd/records.py is the source of
truth, copied here because the jobs never import the daemon). Prices and quantities arrive as
decimal strings: they are accepted only when they fit the decimal types below exactly (a regex, not
a rounding cast), so no price or volume is ever silently rounded.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

# Binance sends at most 8 decimals. 10 integer digits of price and 11 of quantity make
# price * quantity exactly DECIMAL(38,16) under Spark's precision rules (18+19+1 = 38, 8+8 = 16),
# so no product or sum of products loses a digit.
PRICE = T.DecimalType(18, 8)
QTY = T.DecimalType(19, 8)
QUOTE = T.DecimalType(38, 16)
PRICE_RE = r"^[0-9]{1,10}(\.[0-9]{1,8})?$"
QTY_RE = r"^[0-9]{1,11}(\.[0-9]{1,8})?$"
# A kline's volumes are summed by the exchange over the whole bar: a SHIB hour or day trades
# 10^11-10^13 units, beyond a single trade's 11 digits. Only the driver divides them (Decimal).
KLINE_VOLUME_RE = r"^[0-9]{1,22}(\.[0-9]{1,8})?$"
KLINE_QUOTE_RE = r"^[0-9]{1,22}(\.[0-9]{1,16})?$"
SYMBOL_RE = r"^[A-Z0-9]{2,30}$"
INTERVAL_RE = r"^[0-9]{1,3}[smhdwM]$"

TRADE_SCHEMA = T.StructType(
    [
        T.StructField("symbol", T.StringType()),
        T.StructField("trade_id", T.LongType()),
        T.StructField("price", T.StringType()),
        T.StructField("quantity", T.StringType()),
        T.StructField("trade_time", T.LongType()),
        T.StructField("event_time", T.LongType()),
        T.StructField("is_buyer_maker", T.BooleanType()),
        T.StructField("ingested_at", T.LongType()),
        T.StructField("source", T.StringType()),
        T.StructField("stream", T.StringType()),
        T.StructField("schema_version", T.IntegerType()),
        T.StructField("backfill", T.BooleanType()),
    ]
)

KLINE_SCHEMA = T.StructType(
    [
        T.StructField("symbol", T.StringType()),
        T.StructField("interval", T.StringType()),
        T.StructField("open_time", T.LongType()),
        T.StructField("close_time", T.LongType()),
        T.StructField("open", T.StringType()),
        T.StructField("high", T.StringType()),
        T.StructField("low", T.StringType()),
        T.StructField("close", T.StringType()),
        T.StructField("volume", T.StringType()),
        T.StructField("quote_volume", T.StringType()),
        T.StructField("trades_count", T.LongType()),
        T.StructField("taker_buy_base_volume", T.StringType()),
        T.StructField("taker_buy_quote_volume", T.StringType()),
        T.StructField("first_trade_id", T.LongType()),
        T.StructField("last_trade_id", T.LongType()),
        T.StructField("is_closed", T.BooleanType()),
        T.StructField("event_time", T.LongType()),
        T.StructField("ingested_at", T.LongType()),
        T.StructField("source", T.StringType()),
        T.StructField("stream", T.StringType()),
        T.StructField("schema_version", T.IntegerType()),
    ]
)


# The fields the trade jobs use: parsing fewer fields is measurably faster.
TRADE_FIELDS = T.StructType(
    [
        f
        for f in TRADE_SCHEMA.fields
        if f.name
        in (
            "symbol",
            "trade_id",
            "price",
            "quantity",
            "trade_time",
            "is_buyer_maker",
            "ingested_at",
        )
    ]
)


def parse(values: DataFrame, schema: T.StructType) -> DataFrame:
    """A `value` string column -> the record's columns (all null for text that is not JSON)."""
    parsed = F.from_json(F.col("value"), schema, {"mode": "PERMISSIVE"})
    return values.select(parsed.alias("r")).select(
        *(F.col("r").getField(f.name).alias(f.name) for f in schema.fields)
    )


def _decimal_ok(name: str, pattern: str) -> Column:
    return F.coalesce(F.col(name).rlike(pattern), F.lit(False))


def trade_status(max_future_ms: int) -> Column:
    """'ok', or why a trade is rejected ('invalid' shape, 'future' time beyond ingestion + skew)."""
    shape_ok = (
        _decimal_ok("symbol", SYMBOL_RE)
        & F.col("trade_id").isNotNull()
        & (F.col("trade_id") >= 0)
        & F.col("trade_time").isNotNull()
        & (F.col("trade_time") > 0)
        & F.col("is_buyer_maker").isNotNull()
        & F.col("ingested_at").isNotNull()
        & _decimal_ok("price", PRICE_RE)
        & _decimal_ok("quantity", QTY_RE)
    )
    positive = (F.col("price").cast(PRICE) > 0) & (F.col("quantity").cast(QTY) > 0)
    # A trade stamped far ahead of its own ingestion clock would drag the watermark forward and
    # make every honest trade "late"; its own ingested_at keeps the check deterministic on replay.
    future = F.col("trade_time") > F.col("ingested_at") + F.lit(max_future_ms)
    return (
        F.when(~shape_ok, F.lit("invalid"))
        .when(~positive, F.lit("invalid"))
        .when(future, F.lit("future"))
        .otherwise(F.lit("ok"))
    )


def kline_ok() -> Column:
    fields_ok = (
        _decimal_ok("symbol", SYMBOL_RE)
        & _decimal_ok("interval", INTERVAL_RE)
        & F.col("open_time").isNotNull()
        & F.col("is_closed").isNotNull()
        & _decimal_ok("close", PRICE_RE)
        & _decimal_ok("volume", KLINE_VOLUME_RE)
        & _decimal_ok("quote_volume", KLINE_QUOTE_RE)
    )
    return fields_ok & (F.col("close").cast(PRICE) > 0)
