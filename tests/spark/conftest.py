"""Spark test fixtures: one local[2] SparkSession per test session, fixture files, PostgreSQL.

The jobs' library lives in spark/ (not an installed package), so it is put on sys.path here.
Spark is imported lazily: the pure tests here (indicator math, windows, sinks) run without it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401

SPARK_DIR = Path(__file__).resolve().parents[2] / "spark"
if str(SPARK_DIR) not in sys.path:
    sys.path.insert(0, str(SPARK_DIR))

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from marketd_spark.session import get_session

    session = get_session("marketd-tests", "local[2]")
    try:
        yield session
    finally:
        session.stop()


class Feed:
    """A files-source directory: each `add` is one file, i.e. one micro-batch with
    --max-files-per-trigger 1; modification times are set so Spark reads them in order."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def add(self, records: list[Any]) -> Path:
        name = f"part-{self.n:05d}.jsonl"
        tmp = self.dir.parent / f".{name}.tmp"
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        stamp = 1_700_000_000 + self.n
        os.utime(tmp, (stamp, stamp))
        final = self.dir / name
        tmp.rename(final)
        self.n += 1
        return final


@pytest.fixture
def feed(tmp_path: Path) -> Feed:
    return Feed(tmp_path / "input")


def trade(
    trade_id: int,
    time_ms: int,
    price: str,
    qty: str,
    *,
    symbol: str = "BTCUSDT",
    maker: bool = False,
) -> dict[str, Any]:
    """A raw_trades record value, exactly the ingest contract's shape."""
    return {
        "symbol": symbol,
        "trade_id": trade_id,
        "price": price,
        "quantity": qty,
        "trade_time": time_ms,
        "event_time": time_ms + 1,
        "is_buyer_maker": maker,
        "ingested_at": time_ms + 3,
        "source": "binance",
        "stream": f"{symbol.lower()}@trade",
        "schema_version": 1,
    }


def kline(
    symbol: str, interval: str, open_time: int, close: str, volume: str, quote: str, closed: bool
) -> dict[str, Any]:
    return {
        "symbol": symbol,
        "interval": interval,
        "open_time": open_time,
        "close_time": open_time + 59_999,
        "open": close,
        "high": close,
        "low": close,
        "close": close,
        "volume": volume,
        "quote_volume": quote,
        "trades_count": 10,
        "taker_buy_base_volume": "0",
        "taker_buy_quote_volume": "0",
        "first_trade_id": 1,
        "last_trade_id": 10,
        "is_closed": closed,
        "event_time": open_time + 1000,
        "ingested_at": open_time + 1003,
        "source": "binance",
        "stream": f"{symbol.lower()}@kline_{interval}",
        "schema_version": 1,
    }


def run_once(spark: SparkSession, module: Any, argv: list[str]) -> Any:
    """Run a job's streaming query to completion (--once) in this process; return its processor."""
    from marketd_spark.runner import start

    args = module.parse_args([*argv, "--once"])
    values, processor = module.build(spark, args)
    query = start(spark, args, values, processor)
    try:
        query.awaitTermination(300)
        assert not query.isActive, "the --once query did not finish within 300 s"
        exc = query.exception()
        assert exc is None, str(exc)
    finally:
        query.stop()
        processor.close()
    return processor
