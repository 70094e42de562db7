"""Spark test fixtures: one local[2] SparkSession per test session, fixture files, PostgreSQL,
and Kafka helpers for the Python Kafka source (produce, delete the oldest records, read back).

The jobs' library lives in spark/ (not an installed package), so it is put on sys.path here.
Spark is imported lazily: the pure tests here (indicator math, windows, sinks) run without it.
"""

from __future__ import annotations

import contextlib
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
    from pyspark.errors import StreamingQueryException

    args = module.parse_args([*argv, "--once"])
    for attempt in range(5):
        values, processor = module.build(spark, args)
        query = start(spark, args, values, processor)
        try:
            with contextlib.suppress(StreamingQueryException):  # checked just below
                query.awaitTermination(300)
            assert not query.isActive, "the --once query did not finish within 300 s"
            exc = query.exception()
            # A Python data source's planner gets a fixed 10 s to connect back to the JVM; on a
            # loaded host it can miss that. The jobs retry this too (jobs/common.py).
            if exc is not None and "failed to connect back" in str(exc) and attempt < 4:
                continue
            assert exc is None, str(exc)
        finally:
            query.stop()
            processor.close()
        break
    return processor


# -- Kafka (the Python source; tests/support/kafka.py: mock cluster or MARKETD_TEST_KAFKA) ------


def produce_records(kafka: Any, topic: str, records: list[Any], *, key: str = "symbol") -> None:
    """Produce record values keyed by `key` (one symbol -> one partition, as the daemon does)."""
    producer = kafka.producer(**{"linger.ms": 5})
    for r in records:
        value = r if isinstance(r, (bytes, str)) else json.dumps(r)
        k = None if isinstance(r, (bytes, str)) else str(r[key])
        producer.produce(topic, value, key=k)
        producer.poll(0)
    assert producer.flush(30) == 0, "records still queued after 30 s"


def watermarks(kafka: Any, topic: str) -> dict[int, tuple[int, int]]:
    """partition -> (low, high) watermark of `topic`."""
    import confluent_kafka

    consumer = kafka.consumer()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(topic, p), timeout=10, cached=False
            )
            for p in sorted(parts)
        }
    finally:
        consumer.close()


def delete_before(kafka: Any, topic: str, partition: int, offset: int) -> int:
    """Make records of `partition` below `offset` disappear as retention would; return the new
    low watermark (>= offset). A real broker deletes exactly (DeleteRecords); librdkafka's mock
    cluster cannot, but keeps only ~5 MB per partition, so 10 KB filler records (invalid trades,
    which the jobs count as rejected) are appended until the oldest records fall out."""
    import confluent_kafka

    if kafka.real:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
        for fut in admin.delete_records(
            [confluent_kafka.TopicPartition(topic, partition, offset)], request_timeout=30
        ).values():
            fut.result()
        return watermarks(kafka, topic)[partition][0]
    producer = kafka.producer(**{"linger.ms": 5})
    filler = json.dumps({"filler": "x" * 10_000})
    for _ in range(100):
        for _ in range(100):
            producer.produce(topic, filler, partition=partition)
        assert producer.flush(30) == 0
        low = watermarks(kafka, topic)[partition][0]
        if low >= offset:
            return low
    raise AssertionError(f"{topic}[{partition}] still holds offset {offset - 1}")


def read_back(kafka: Any, topic: str) -> list[dict[str, Any]]:
    """The trades actually in `topic` now (what a reader can still get), fillers left out."""
    out = []
    for m in kafka.read_all([topic]):
        with contextlib.suppress(ValueError):
            record = json.loads(m.value())
            if "trade_id" in record:
                out.append(record)
    return out
