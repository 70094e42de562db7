"""Sinks without Spark: Parquet to an S3-compatible store (moto server), PostgreSQL replays."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.spark.conftest import SPARK_DIR  # noqa: F401  (puts spark/ on sys.path)

M = 60_000
T0 = 1_767_225_540_000  # 23:59 UTC: one window per date partition


def _rows() -> list[dict[str, Any]]:
    return [
        {
            "symbol": "BTCUSDT",
            "interval": "1m",
            "window_start": T0 + i * M,
            "window_end": T0 + (i + 1) * M,
            "open": Decimal("1.5"),
            "high": Decimal("2"),
            "low": Decimal("1"),
            "close": Decimal("1.75"),
            "volume": Decimal("10"),
            "quote_volume": Decimal("17.5"),
            "vwap": Decimal("1.75"),
            "trades_count": 3,
            "taker_buy_volume": Decimal("4"),
            "taker_sell_volume": Decimal("6"),
        }
        for i in range(2)
    ]


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_parquet_to_s3_partitioned_and_replay_safe(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    from marketd_spark.jobs.trade_aggregation import TABLE
    from marketd_spark.sinks.parquet import ParquetSink

    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(
        access_key="test", secret_key="test",
        endpoint_override=s3_endpoint.removeprefix("http://"),
        scheme="http", region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir("cold")
    sink = ParquetSink("s3://cold/aggregates", TABLE)
    sink.write(7, _rows())
    sink.write(7, _rows())  # a replayed batch overwrites its own files
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector("cold/aggregates", recursive=True))
        if f.is_file
    )  # fmt: skip
    assert files == [
        "cold/aggregates/date=2025-12-31/symbol=BTCUSDT/part-000000000007.parquet",
        "cold/aggregates/date=2026-01-01/symbol=BTCUSDT/part-000000000007.parquet",
    ]
    table = ds.dataset("cold/aggregates", filesystem=fs, partitioning="hive").to_table()
    got = sorted(table.to_pylist(), key=lambda r: r["window_start"])
    assert [r["window_start"] for r in got] == [T0, T0 + M]
    assert got[0]["vwap"] == Decimal("1.75") and got[0]["symbol"] == "BTCUSDT"
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint


@pytest.mark.postgres
def test_postgres_upsert_replay_does_not_duplicate(postgres_dsn: str) -> None:
    import psycopg
    from marketd_spark.jobs.trade_aggregation import TABLE
    from marketd_spark.sinks.postgres import PostgresSink, migrate

    sink = PostgresSink(postgres_dsn, TABLE)
    assert migrate(postgres_dsn) == []  # applied once, by the sink
    rows = _rows()
    sink.write(3, rows)
    sink.write(3, rows)  # the same micro-batch again
    rows[1]["close"] = Decimal("1.8")
    sink.write(4, rows[1:])  # a later batch with a corrected value for the same window
    with psycopg.connect(postgres_dsn) as conn:
        got = conn.execute(
            "SELECT window_start, close FROM trade_aggregates ORDER BY window_start"
        ).fetchall()
    assert got == [(T0, Decimal("1.75")), (T0 + M, Decimal("1.8"))]


def test_s3a_root_with_credentials_and_endpoint_from_env(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    from marketd_spark.jobs.trade_aggregation import TABLE
    from marketd_spark.sinks.parquet import ParquetSink

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "minio",
        "AWS_SECRET_ACCESS_KEY": "minio-secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,  # the service-specific variable of the AWS SDKs
    }.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(
        access_key="minio", secret_key="minio-secret", session_token="token",
        endpoint_override=s3_endpoint.removeprefix("http://"),
        scheme="http", region="eu-west-1", allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir("lake")
    ParquetSink("s3a://lake/cold/aggregates/", TABLE).write(1, _rows())
    table = ds.dataset("lake/cold/aggregates", filesystem=fs, partitioning="hive").to_table()
    assert sorted(r["window_start"] for r in table.to_pylist()) == [T0, T0 + M]


def test_file_uri_root_is_the_local_path(tmp_path: Any) -> None:
    from marketd_spark.jobs.trade_aggregation import TABLE
    from marketd_spark.sinks.parquet import ParquetSink

    ParquetSink(f"file://{tmp_path}/out", TABLE).write(2, _rows()[:1])
    assert (tmp_path / "out/date=2025-12-31/symbol=BTCUSDT/part-000000000002.parquet").is_file()
