"""The API's analytics queries (marketd/api/analytics.py) read only what the Spark jobs write.

Statically: every column the API selects from trade_aggregates, indicators and anomalies is one
the matching job upserts (its `Table.pg_columns`), and the Redis aggregate fields the API
converts to integers are columns of the aggregation rows the job stores there. Against a real
PostgreSQL with the jobs' migrations (spark/marketd_spark/migrations) applied: every column a
job upserts exists, and every API query runs.
"""

from __future__ import annotations

import re

import pytest

from marketd.api import analytics

pytest.importorskip("pyspark")
pytest.importorskip("pyarrow")
from marketd_spark.indicators import IndicatorSpec
from marketd_spark.jobs import anomaly_detection, technical_indicators, trade_aggregation
from marketd_spark.sinks import Table

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        trade_aggregation.TABLE,
        anomaly_detection.TABLE,
        technical_indicators.table(IndicatorSpec()),
    )
}
ANOMALIES_SQL, ANOMALIES_PARAMS = analytics._anomalies_sql("BTCUSDT", 0)
QUERIES = {
    "klines": (analytics._KLINES_SQL, ["BTCUSDT", "1m", 10]),
    "indicators": (analytics._INDICATORS_SQL, ["BTCUSDT", "1m", 10]),
    "anomalies": (ANOMALIES_SQL, [*ANOMALIES_PARAMS, 10]),
}
_INNER_SELECT = re.compile(r"SELECT\s+(?!\*)(.+?)\s+FROM\s+(\w+)", re.S | re.I)


def selected(sql: str) -> tuple[str, list[str]]:
    """(table, columns) of the innermost `SELECT cols FROM table` of an API query."""
    m = _INNER_SELECT.search(sql)
    assert m is not None, sql
    cols = [c.strip().strip('"') for c in m.group(1).split(",")]
    return m.group(2), cols


def written(table: str) -> set[str]:
    return {c.strip('"') for c in TABLES[table].pg_columns}


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_api_queries_select_columns_the_jobs_write(query: str) -> None:
    table, cols = selected(QUERIES[query][0])
    assert table in TABLES, f"{query}: the API reads {table}, which no job writes"
    assert sorted(set(cols) - written(table)) == []


def test_redis_aggregate_fields_are_aggregation_columns() -> None:
    """The API turns these hash fields of `<prefix>:agg:<SYMBOL>:<interval>` into integers;
    trade_aggregation stores its whole row there (redis_latest)."""
    row = dict.fromkeys(trade_aggregation.COLUMNS, 0)
    ((_key, _order, fields),) = list(trade_aggregation.redis_latest("p")([row]))
    for name in ("window_start", "window_end", "trades_count"):
        assert name in fields
    windows = trade_aggregation.parser().get_default("intervals").split(",")
    assert set(analytics.AGG_INTERVALS) <= set(windows)  # the job's default windows


def test_the_guard_sees_an_unknown_column() -> None:
    table, cols = selected(analytics._KLINES_SQL.replace("vwap", "vwap_typo"))
    assert set(cols) - written(table) == {"vwap_typo"}


@pytest.mark.postgres
def test_against_the_migrated_schema(postgres_dsn: str) -> None:
    import psycopg
    from marketd_spark.sinks.postgres import migrate

    migrate(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for name in TABLES:
            have = {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                    (name,),
                )
            }
            assert written(name) <= have, (name, written(name) - have)
        for sql, params in QUERIES.values():
            conn.execute(sql, params).fetchall()  # raises UndefinedColumn on a mismatch
