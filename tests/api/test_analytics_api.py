"""Market and analytics endpoints against a real PostgreSQL and Redis, filled by the jobs' sinks.

The app here is a minimal Quart-Trio app with only the analytics blueprint (no dependency on
app.py); the stores are filled with the same upsert / Redis code the Spark jobs use.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
from quart_trio import QuartTrio

from marketd.api.analytics import OPENAPI_PATHS, OPENAPI_SCHEMAS, create_blueprint
from marketd.api.openapi import build_document
from marketd.config import load_config
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime
from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401

SPARK_DIR = Path(__file__).resolve().parents[2] / "spark"
if str(SPARK_DIR) not in sys.path:
    sys.path.insert(0, str(SPARK_DIR))

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

M = 60_000
T0 = 1_767_225_600_000


def _runtime(dsn: str, redis_url: str | None) -> Runtime:
    config = load_config(environ={"POSTGRES_DSN": dsn} if dsn else {}, dotenv=None).config
    return Runtime(config, MetricsFactory(), kafka_bootstrap="unused", redis_url=redis_url)


def _bar(start: int, close: str, interval: str = "1m", size: int = M) -> dict[str, Any]:
    return {
        "symbol": "BTCUSDT",
        "interval": interval,
        "window_start": start,
        "window_end": start + size,
        "open": Decimal("100.00000000"),
        "high": Decimal("101.5"),
        "low": Decimal("99.25"),
        "close": Decimal(close),
        "volume": Decimal("3.12345678"),
        "quote_volume": Decimal("312.3456780000000001"),
        "vwap": Decimal("100.0000000000000001"),
        "trades_count": 7,
        "taker_buy_volume": Decimal("1.12345678"),
        "taker_sell_volume": Decimal("2"),
    }


def _fill(dsn: str, redis_url: str) -> None:
    import psycopg
    from marketd_spark.indicators import IndicatorSpec, Series
    from marketd_spark.jobs import anomaly_detection, technical_indicators, trade_aggregation
    from marketd_spark.sinks.postgres import migrate, upsert
    from marketd_spark.sinks.redis import RedisSink

    migrate(dsn)
    bars = [_bar(T0 + i * M, f"{100 + i}.5") for i in range(3)] + [_bar(T0, "99", "5m", 5 * M)]
    spec = IndicatorSpec()
    series = Series(spec)
    ind = []
    for i in range(30):
        values = series.push(100.0 + i % 4)
        ind.append(
            {
                "symbol": "BTCUSDT",
                "interval": "1m",
                "open_time": T0 + i * M,
                "close": Decimal(100 + i % 4),
                "vwap": None if i == 29 else Decimal("100.5"),
                **values,
            }
        )
    anomalies = [
        {
            "symbol": sym,
            "type": kind,
            "window_start": T0 + k * M,
            "window_end": T0 + (k + 1) * M,
            "observed": 10.0,
            "baseline": 1.0,
            "score": 5.0,
            "threshold": 3.0,
            "detected_at": T0 + (k + 1) * M + 100,
            "trade_id": tid,
        }
        for sym, kind, k, tid in [
            ("BTCUSDT", "volume_spike", 1, None),
            ("BTCUSDT", "whale_trade", 1, 42),
            ("ETHUSDT", "price_jump", 2, None),
            ("BTCUSDT", "volume_spike", 5, None),
        ]
    ]
    with psycopg.connect(dsn) as conn:
        upsert(conn, trade_aggregation.TABLE, bars)
        upsert(conn, technical_indicators.table(spec), ind)
        upsert(conn, anomaly_detection.TABLE, anomalies)
        # A replayed batch: same keys, no duplicates.
        upsert(conn, anomaly_detection.TABLE, anomalies)
        upsert(conn, trade_aggregation.TABLE, bars)
    sink = RedisSink(redis_url, latest=trade_aggregation.redis_latest("analytics"))
    try:
        sink.write(0, bars)
    finally:
        sink.close()


@pytest.fixture
async def client(postgres_dsn: str, redis_server: Any) -> AsyncIterator[Any]:  # noqa: F811
    await trio.to_thread.run_sync(_fill, postgres_dsn, redis_server.url)
    app = QuartTrio(__name__)
    app.register_blueprint(create_blueprint(_runtime(postgres_dsn, redis_server.url)))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def _get(client: Any, url: str) -> tuple[int, Any]:
    with trio.fail_after(20):
        resp = await client.get(url)
        return resp.status_code, json.loads(await resp.get_data(as_text=True))


async def test_klines_newest_windows_oldest_first_exact_decimals(client: Any) -> None:
    status, body = await _get(client, "/api/v1/market/btcusdt/klines?interval=1m&limit=2")
    assert status == 200
    assert body["symbol"] == "BTCUSDT" and body["interval"] == "1m"
    assert [k["open_time"] for k in body["klines"]] == [T0 + M, T0 + 2 * M]
    k = body["klines"][0]
    assert k["close_time"] == T0 + 2 * M and k["close"] == "101.50000000"
    assert (k["window_start"], k["window_end"]) == (T0 + M, T0 + 2 * M)  # the Parquet names too
    assert k["quote_volume"] == "312.3456780000000001" and k["trades_count"] == 7
    status, body = await _get(client, "/api/v1/market/BTCUSDT/klines?interval=5m")
    assert status == 200 and [k["close"] for k in body["klines"]] == ["99.00000000"]


async def test_latest_aggregates_from_redis(client: Any) -> None:
    status, body = await _get(client, "/api/v1/market/BTCUSDT/aggregates")
    assert status == 200
    assert body["aggregates"]["1m"]["window_start"] == T0 + 2 * M
    assert body["aggregates"]["1m"]["close"] == "102.5"
    assert body["aggregates"]["5m"]["window_end"] == T0 + 5 * M
    assert body["aggregates"]["15m"] is None


async def test_indicators_latest_and_history(client: Any) -> None:
    status, body = await _get(client, "/api/v1/analytics/BTCUSDT/indicators?interval=1m")
    assert status == 200
    (row,) = body["indicators"]
    assert row["open_time"] == T0 + 29 * M and row["vwap"] is None
    assert row["sma_99"] is None and row["sma_7"] == pytest.approx(
        sum(100 + i % 4 for i in range(23, 30)) / 7
    )
    status, body = await _get(client, "/api/v1/analytics/btcusdt/indicators?limit=5")
    assert [r["open_time"] for r in body["indicators"]] == [T0 + i * M for i in range(25, 30)]


async def test_anomalies_filters(client: Any) -> None:
    status, body = await _get(client, "/api/v1/analytics/anomalies")
    assert status == 200 and len(body["anomalies"]) == 4
    assert body["anomalies"][0]["window_start"] == T0 + 5 * M  # newest first
    status, body = await _get(
        client, f"/api/v1/analytics/anomalies?symbol=btcusdt&since={T0 + M}&limit=2"
    )
    got = [(a["type"], a["window_start"], a["trade_id"]) for a in body["anomalies"]]
    assert got == [("volume_spike", T0 + 5 * M, None), ("volume_spike", T0 + M, None)]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("/api/v1/market/B!/klines", "invalid_symbol"),
        ("/api/v1/market/" + "A" * 31 + "/klines", "invalid_symbol"),
        ("/api/v1/market/BTCUSDT/klines?interval=2m", "invalid_interval"),
        ("/api/v1/market/BTCUSDT/klines?limit=0", "invalid_limit"),
        ("/api/v1/market/BTCUSDT/klines?limit=1001", "invalid_limit"),
        ("/api/v1/market/BTCUSDT/klines?limit=ten", "invalid_limit"),
        ("/api/v1/market/x/aggregates", "invalid_symbol"),
        ("/api/v1/analytics/BTCUSDT/indicators?interval=7m", "invalid_interval"),
        ("/api/v1/analytics/anomalies?symbol=b-b", "invalid_symbol"),
        ("/api/v1/analytics/anomalies?since=-1", "invalid_since"),
        # Non-ASCII that upper-cases to ASCII (U+0131 -> "I", "ß" -> "SS"): refused, as the ticker
        # API refuses it.
        ("/api/v1/market/btcusd%C4%B1/klines", "invalid_symbol"),
        ("/api/v1/analytics/%C3%9F%C3%9FUSDT/indicators", "invalid_symbol"),
    ],
)
async def test_bad_input_is_a_json_400(client: Any, url: str, error: str) -> None:
    status, body = await _get(client, url)
    assert (status, body["error"]) == (400, error)
    assert body["detail"]
    if error == "invalid_symbol":
        assert "symbol" in body  # echoed, like the ticker API's invalid_symbol


async def test_database_without_the_tables_is_503(
    postgres_server: Any,  # noqa: F811
) -> None:
    dsn = await trio.to_thread.run_sync(postgres_server.create_database)
    app = QuartTrio(__name__)
    app.register_blueprint(create_blueprint(_runtime(dsn, None)))
    async with app.test_app() as test_app:
        c = test_app.test_client()
        for url in (
            "/api/v1/market/BTCUSDT/klines",
            "/api/v1/analytics/BTCUSDT/indicators",
            "/api/v1/analytics/anomalies",
        ):
            status, body = await _get(c, url)
            assert (status, body["error"]) == (503, "storage_unavailable"), url
            assert "migrate" in body["detail"]


def test_indicator_columns_are_typed_columns_in_postgres(postgres_dsn: str) -> None:  # noqa: F811
    import psycopg
    from marketd_spark.indicators import IndicatorSpec, Series
    from marketd_spark.jobs import technical_indicators
    from marketd_spark.sinks.postgres import migrate, upsert

    migrate(postgres_dsn)
    spec = IndicatorSpec()
    series, rows = Series(spec), []
    for i in range(40):
        values = series.push(100.0 + (i * 7) % 5)
        rows.append(
            {"symbol": "BTCUSDT", "interval": "1m", "open_time": T0 + i * M,
             "close": Decimal(100 + (i * 7) % 5), "vwap": None, **values}
        )  # fmt: skip
    with psycopg.connect(postgres_dsn) as conn:
        upsert(conn, technical_indicators.table(spec), rows)
        upsert(conn, technical_indicators.table(spec), rows[-5:])  # a replay
        cols = ", ".join(spec.columns)
        got = conn.execute(
            f"SELECT open_time, {cols} FROM indicators ORDER BY open_time"
        ).fetchall()
    assert len(got) == 40
    for row, want in zip(got, rows, strict=True):
        assert row[0] == want["open_time"]
        assert list(row[1:]) == [want[c] for c in spec.columns]  # exact floats, nulls as NULL


async def test_no_dsn_or_unreachable_store_is_503() -> None:
    for dsn in ("", "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2"):
        app = QuartTrio(__name__)
        app.register_blueprint(create_blueprint(_runtime(dsn, None)))
        async with app.test_app() as test_app:
            c = test_app.test_client()
            for url in (
                "/api/v1/market/BTCUSDT/klines",
                "/api/v1/analytics/BTCUSDT/indicators",
                "/api/v1/analytics/anomalies",
                "/api/v1/market/BTCUSDT/aggregates",
            ):
                status, body = await _get(c, url)
                assert (status, body["error"]) == (503, "storage_unavailable"), (dsn, url)


def test_openapi_paths_merge_into_the_document() -> None:
    doc = build_document("test", [(OPENAPI_PATHS, OPENAPI_SCHEMAS)])
    for path in (
        "/api/v1/market/{symbol}/klines",
        "/api/v1/market/{symbol}/aggregates",
        "/api/v1/analytics/{symbol}/indicators",
        "/api/v1/analytics/anomalies",
    ):
        responses = doc["paths"][path]["get"]["responses"]
        assert {"200", "400", "503"} <= set(responses)
    refs = json.dumps(doc)
    for name in ("Klines", "Aggregates", "Indicators", "Anomalies", "Error"):
        assert f"#/components/schemas/{name}" in refs and name in doc["components"]["schemas"]
