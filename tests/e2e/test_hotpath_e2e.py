"""Full hot path: `marketd fake-exchange` -> `marketd run` (ingest, tickers, api) -> HTTP.

Both are subprocesses driven through their CLI contract; Kafka is the tests' mock cluster (or
MARKETD_TEST_KAFKA), Redis a private redis-server. The ticker the fake exchange sent must come
back from GET /api/v1/ticker/BTCUSDT, and SIGTERM must end the daemon with exit code 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from marketd.tickers.redis_server import RedisProcess, free_port
from tests.support.daemon import Daemon
from tests.support.kafka import TestKafka, unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.redis]

DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


@asynccontextmanager
async def fake_exchange(*args: str) -> AsyncIterator[str]:
    """`marketd fake-exchange` as a child process; yields its ws:// URL; killed on exit."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "marketd.cli", "fake-exchange", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(20):
            while b"\n" not in line:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"fake-exchange exited: {line!r}")
                line += chunk
        m = re.search(rb"ws=(\S+)", line)
        assert m, line
        yield m.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_ticker_from_fake_exchange_is_served_over_http(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    api_port = free_port()
    tickers_topic = unique_topic("tickers")
    env = {
        "BINANCE_STREAMS": "btcusdt@ticker,ethusdt@ticker",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "REDIS_URL": redis_server.url,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "TICKER_SYMBOLS": "BTCUSDT,ETHUSDT",
        "TOPIC_RAW_TICKERS": tickers_topic,
        "KAFKA_TICKER_TOPIC": tickers_topic,
        "TOPIC_RAW_TRADES": unique_topic("trades"),
        "TOPIC_RAW_KLINES": unique_topic("klines"),
        "TOPIC_DLQ": unique_topic("dlq"),
        "TICKER_CONSUMER_GROUP": f"e2e-{uuid.uuid4().hex[:8]}",
    }
    async with (
        fake_exchange("--port", "0", "--rate", "50", "--symbols", "btcusdt,ethusdt") as ws_url,
        trio.open_nursery() as nursery,
    ):
        daemon = Daemon({**env, "BINANCE_WS_URL": ws_url})
        await daemon.start(nursery)
        body = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as client:
            with trio.fail_after(60):
                while True:
                    assert daemon.proc is not None
                    assert daemon.proc.returncode is None, daemon.tail()
                    try:
                        response = await client.get("/api/v1/ticker/BTCUSDT")
                    except httpx.TransportError:
                        response = None  # not listening yet
                    if response is not None and response.status_code == 200:
                        body = response.json()
                        break
                    await trio.sleep(0.2)
            health = (await client.get("/api/v1/ticker/health")).json()
        assert body is not None
        assert body["symbol"] == "BTCUSDT" and body["complete"] is True
        for name in ("last_price", "open", "high", "low", "volume", "quote_volume"):
            assert DECIMAL.fullmatch(body[name]), (name, body[name])
        assert isinstance(body["trades_count"], int) and body["trades_count"] >= 0
        assert body["updated_at"] >= body["event_time"] - 5_000
        assert 0 <= body["age_ms"] < 10_000  # fresh: the watermark would have dropped older
        assert health["redis"] is True and health["consumer_lag"] is not None
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()
