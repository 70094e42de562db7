"""The analytics path end to end: fake exchange -> `marketd run` -> Kafka -> trade aggregation
(`--source kafka --kafka-reader python`, a subprocess) -> PostgreSQL, Redis, Parquet -> the API.

The test reads raw_trades along while everything runs (the mock cluster keeps only ~5 MB per
partition), kills the job mid-stream and restarts it from its checkpoint, and meanwhile deletes
the oldest unread records of one partition as retention would. Every 1-minute window then has to
equal a Decimal computation over the trades in raw_trades minus exactly the offsets the job
reported as a gap. Runs against librdkafka's mock cluster, or a real broker (MARKETD_TEST_KAFKA).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from tests.spark import reference
from tests.spark.conftest import SPARK_DIR, delete_before, watermarks
from tests.support.daemon import Daemon
from tests.support.exchange import fake_exchange
from tests.support.kafka import TestKafka, unique_topic
from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.kafka,
    pytest.mark.spark,
    pytest.mark.postgres,
    pytest.mark.redis,
]

M = 60_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")
WATERMARK_S = 5
INTERVALS = {"1m": M, "5m": 5 * M, "15m": 15 * M}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Follower:
    """Reads raw_trades from the beginning while the pipeline runs: (partition, offset) -> value."""

    def __init__(self, kafka: TestKafka, topic: str) -> None:
        self.kafka, self.topic = kafka, topic
        self.records: dict[tuple[int, int], bytes] = {}

    async def run(self) -> None:
        consumer = self.kafka.consumer()
        try:
            consumer.subscribe([self.topic])
            while True:
                msgs = await trio.to_thread.run_sync(consumer.consume, 1000, 0.2)
                for m in msgs:
                    if m.error() is None:
                        self.records[(m.partition(), m.offset())] = m.value()
        finally:
            consumer.close()

    def caught_up(self, marks: dict[int, tuple[int, int]]) -> bool:
        have = {p for p, _ in self.records}
        return all(
            high == low or (p in have and max(o for q, o in self.records if q == p) >= high - 1)
            for p, (low, high) in marks.items()
        )


class Job:
    """spark/trade_aggregation.py as a subprocess, stderr kept in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.file = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, str(SPARK_DIR / "trade_aggregation.py"), *argv],
            env={
                **os.environ,
                "PYSPARK_PYTHON": sys.executable,
                "SPARK_LOCAL_IP": "127.0.0.1",
                "LOG_LEVEL": "INFO",
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.file,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.file.close()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(120):
            while self.proc.poll() is None:
                await trio.sleep(0.2)
        self.file.close()
        return self.proc.returncode


def _committed(checkpoint: Path) -> int:
    return len(list((checkpoint / "spark" / "commits").glob("[0-9]*")))


def _pg_windows(dsn: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT symbol, interval, window_start, window_end, open, high, low, close, volume,"
            " quote_volume, vwap, trades_count, taker_buy_volume, taker_sell_volume"
            " FROM trade_aggregates"
        )
        names = [d.name for d in cur.description or []]
        return {(r[0], r[1], r[2]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}


async def test_exchange_to_api_through_kafka_and_the_python_source(
    kafka: TestKafka,
    tmp_path: Path,
    postgres_dsn: str,  # noqa: F811
    redis_server: Any,
) -> None:
    topic = unique_topic("trades")
    api_port = _free_port()
    ck = tmp_path / "ck"
    job_argv = [
        "--source", "kafka", "--kafka-reader", "python",
        "--kafka-bootstrap-servers", kafka.bootstrap_servers,
        "--watermark-seconds", str(WATERMARK_S), "--trigger-seconds", "1",
        "--checkpoint", str(ck), "--sink", "postgres", "--dsn", postgres_dsn,
        "--sink", "redis", "--redis-url", redis_server.url,
        "--sink", "parquet", "--output", str(tmp_path / "parquet"),
    ]  # fmt: skip
    job_env = {"TOPIC_RAW_TRADES": topic}
    log = tmp_path / "job.log"
    follower = Follower(kafka, topic)
    with fake_exchange("--symbols", ",".join(SYMBOLS), "--rate", "100", "--seed", "5") as fx:
        async with trio.open_nursery() as nursery:
            stores = {
                "REDIS_URL": redis_server.url,
                "POSTGRES_DSN": postgres_dsn,
                "API_HOST": "127.0.0.1",
                "API_PORT": str(api_port),
            }
            daemon = Daemon(
                {
                    "BINANCE_WS_URL": fx.ws_url,
                    "BINANCE_REST_URL": fx.http_url,
                    "BINANCE_STREAMS": ",".join(f"{s.lower()}@trade" for s in SYMBOLS),
                    "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                    "TOPIC_RAW_TRADES": topic,
                    "MARKETD_COMPONENTS": "ingest",
                    "RECONNECT_MAX_DELAY_SECONDS": "1",
                    **stores,
                }
            )
            await daemon.start(nursery)
            nursery.start_soon(follower.run)
            job = Job(job_argv, job_env, log)
            try:
                # Mid-stream: once the job has committed a few batches of trades, kill it.
                # Generous guards: on a loaded 2-core box a Spark job takes minutes to start.
                with trio.fail_after(900):
                    while _committed(ck) < 3:
                        assert job.proc.poll() is None, job.text()[-3000:]
                        await trio.sleep(0.5)
                job.kill()
                assert "kafka_reader=python" in job.text()

                # While it is down, retention deletes the oldest unread records of a partition.
                await trio.sleep(2)
                marks = watermarks(kafka, topic)
                with trio.fail_after(60):
                    while not follower.caught_up(marks):
                        await trio.sleep(0.2)
                part = max(marks, key=lambda p: marks[p][1])
                await trio.to_thread.run_sync(delete_before, kafka, topic, part, marks[part][1])

                job = Job(job_argv, job_env, log)

                # Run until two more 1-minute windows per symbol closed after the restart
                # (1-minute ones only: a 5- or 15-minute window closing must not end the wait).
                def minutes() -> int:
                    return sum(1 for k in _pg_windows(postgres_dsn) if k[1] == "1m")

                with trio.fail_after(900):
                    seen = minutes()
                    while minutes() < seen + 2 * len(SYMBOLS):
                        assert job.proc.poll() is None, job.text()[-3000:]
                        await trio.sleep(1)
                # Stop the feed; the job processes what is left, then stops cleanly.
                assert await daemon.stop() == 0, daemon.tail()
                end_marks = watermarks(kafka, topic)
                with trio.fail_after(300):
                    while not follower.caught_up(end_marks):
                        await trio.sleep(0.2)
                    offsets = ck / "spark" / "offsets"
                    while True:
                        done = max((int(p.name) for p in offsets.glob("[0-9]*")), default=-1)
                        last = json.loads((offsets / str(done)).read_text().splitlines()[-1])
                        at = {int(p): o for p, o in last.get(topic, {}).items()}
                        if all(at.get(p, low) >= high for p, (low, high) in end_marks.items()) and (
                            _committed(ck) > done
                        ):
                            break
                        await trio.sleep(0.5)
                assert await job.stop() == 0, job.text()[-3000:]

                # The feed is stopped; the API (its own marketd process) serves what the job wrote.
                api = Daemon({**stores, "MARKETD_COMPONENTS": "api"})
                await api.start(nursery)
                async with httpx.AsyncClient(timeout=10) as http:
                    base = f"http://127.0.0.1:{api_port}/api/v1/market"
                    with trio.fail_after(60):
                        while True:
                            try:
                                await http.get(f"{base}/BTCUSDT/klines")
                                break
                            except httpx.TransportError:
                                await trio.sleep(0.2)
                    klines = {
                        s: (await http.get(f"{base}/{s}/klines?interval=1m&limit=1000")).json()
                        for s in SYMBOLS
                    }
                    latest = {s: (await http.get(f"{base}/{s}/aggregates")).json() for s in SYMBOLS}
                assert await api.stop() == 0, api.tail()
            finally:
                job.kill()
                nursery.cancel_scope.cancel()

    text = log.read_text(errors="replace")
    assert "job.failed" not in text and "trades.late_dropped" not in text, text[-3000:]
    gaps = [
        (int(p), int(f), int(e))
        for t, p, f, e in re.findall(
            r"kafka\.gap topic=(\S+) partition=(\d+) from_offset=(\d+) to_offset=(\d+)", text
        )
        if t == topic
    ]
    # One gap, on that partition (a replayed batch can report it in two adjacent pieces).
    assert gaps and {p for p, _, _ in gaps} == {part}, text[-3000:]
    pieces = sorted((lo, hi) for _, lo, hi in gaps)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces)), pieces
    lost = {(p, o) for p, lo, hi in gaps for o in range(lo, hi)}

    trades: list[dict[str, Any]] = []
    for key, value in follower.records.items():
        record = json.loads(value)
        if "trade_id" in record and key not in lost:
            trades.append(record)
    assert any(
        json.loads(follower.records[k]).get("trade_id") for k in lost if k in follower.records
    )

    windows = _pg_windows(postgres_dsn)
    expected, _ = reference.aggregate([trades], INTERVALS, WATERMARK_S * 1000)
    assert len([k for k in expected if k[1] == "1m"]) >= 2 * len(SYMBOLS)
    assert sorted(windows) == sorted(expected)
    for key, want in expected.items():
        assert windows[key] == want, key

    for s in SYMBOLS:
        bars = {b["open_time"]: b for b in klines[s]["klines"]}
        mine = {k[2]: v for k, v in expected.items() if k[0] == s and k[1] == "1m"}
        assert sorted(bars) == sorted(mine)
        for start, want in mine.items():
            assert Decimal(bars[start]["vwap"]) == want["vwap"]
            assert Decimal(bars[start]["volume"]) == want["volume"]
            assert bars[start]["trades_count"] == want["trades_count"]
        for label in INTERVALS:
            starts = [k[2] for k in expected if k[0] == s and k[1] == label]
            got = latest[s]["aggregates"][label]
            if not starts:  # no 5m/15m window closed in a short run
                assert got is None
                continue
            newest = max(starts)
            assert got["window_start"] == newest
            assert Decimal(got["quote_volume"]) == expected[(s, label, newest)]["quote_volume"]
