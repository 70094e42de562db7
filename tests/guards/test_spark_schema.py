"""The Spark jobs' copy of the record contract (spark/marketd_spark/records.py) matches
marketd/records.py field by field: same names, same order, matching types.

The jobs never import the daemon, so the schema is kept twice; this is what keeps the copies
equal. Type mapping: str -> StringType (prices and quantities are exact decimal strings on the
wire; the jobs cast them after a regex check), int -> LongType (epoch ms, ids, counts), bool ->
BooleanType; `schema_version` may be IntegerType (a small constant).
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec
import pytest

from marketd.records import KlineRecord, TradeRecord

T = pytest.importorskip("pyspark.sql.types")
spark_records = pytest.importorskip("marketd_spark.records")

PAIRS = [
    (TradeRecord, "TRADE_SCHEMA"),
    (KlineRecord, "KLINE_SCHEMA"),
]


def spark_types_for(tp: Any, name: str) -> tuple[type, ...]:
    args = [a for a in get_args(tp) if a is not type(None)] or [tp]
    if len(args) != 1:
        raise AssertionError(f"{name}: no Spark type for the union {tp!r}")
    base = args[0]
    if base is bool:
        return (T.BooleanType,)
    if base is int:
        return (T.LongType, T.IntegerType) if name == "schema_version" else (T.LongType,)
    if base is str:
        return (T.StringType,)
    raise AssertionError(f"{name}: no Spark type for {tp!r}")


@pytest.mark.parametrize(("record", "schema_name"), PAIRS, ids=[p[1] for p in PAIRS])
def test_spark_schema_matches_the_record_contract(
    record: type[msgspec.Struct], schema_name: str
) -> None:
    schema = getattr(spark_records, schema_name)
    ours = msgspec.structs.fields(record)
    assert [f.name for f in schema.fields] == [f.name for f in ours]
    wrong = [
        (f.name, f.type, type(s.dataType).__name__)
        for f, s in zip(ours, schema.fields, strict=True)
        if not isinstance(s.dataType, spark_types_for(f.type, f.name))
    ]
    assert wrong == []


def test_the_fields_the_trade_jobs_parse_are_contract_fields() -> None:
    contract = {f.name: f for f in spark_records.TRADE_SCHEMA.fields}
    for f in spark_records.TRADE_FIELDS.fields:
        assert contract[f.name] == f


def test_the_guard_sees_a_renamed_or_retyped_field() -> None:
    renamed = T.StructType(
        [
            T.StructField("trade_ident" if f.name == "trade_id" else f.name, f.dataType)
            for f in spark_records.TRADE_SCHEMA.fields
        ]
    )
    assert [f.name for f in renamed.fields] != [f.name for f in msgspec.structs.fields(TradeRecord)]
    assert not isinstance(T.DoubleType(), spark_types_for(str, "price"))
    assert not isinstance(T.IntegerType(), spark_types_for(int, "trade_id"))
