"""The one-command run: fake exchange -> `marketd run` with analytics.spark_jobs -> the API.

marketd starts its embedded Kafka, Redis and PostgreSQL and the three Spark jobs (Python Kafka
source); the market and analytics endpoints must fill with data, a killed job must come back, and
SIGINT must stop everything (jobs, PostgreSQL) with exit 0. The fake exchange runs on the real
clock, so windows close once a minute; the anomaly job gets an absolute BTCUSDT whale threshold
inside the fake exchange's trade sizes (its quote values are spread evenly up to ~4,750 USDT: no
percentile whale, spike or jump shows within minutes). README.md "The whole pipeline" says the same.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from marketd.tickers.redis_server import free_port
from tests.support.daemon import Daemon
from tests.support.exchange import fake_exchange

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.spark,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.kafka,
]

ENDPOINTS = (
    "/api/v1/market/BTCUSDT/klines",
    "/api/v1/market/BTCUSDT/aggregates",
    "/api/v1/analytics/BTCUSDT/indicators",
    "/api/v1/analytics/anomalies",
)
# Three Spark JVMs start on two cores: a shared, loaded machine needs far more than two minutes
# (README.md, "What to expect, and when").
DEADLINE_S = 600


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join([line[:300] for line in text if "[Stage" not in line][-lines:])


def _has_data(path: str, body: dict[str, Any]) -> bool:
    if path.endswith("/klines"):
        return bool(body["klines"])
    if path.endswith("/aggregates"):
        return body["aggregates"]["1m"] is not None
    if path.endswith("/indicators"):
        return bool(body["indicators"])
    return any(a["symbol"] == "BTCUSDT" for a in body["anomalies"])


async def test_one_command_fills_every_market_and_analytics_endpoint(tmp_path: Path) -> None:
    api_port = free_port()
    with fake_exchange("--rate", "200") as ex:
        env = {
            "BINANCE_WS_URL": ex.ws_url,
            "BINANCE_REST_URL": ex.http_url,
            "BINANCE_STREAMS": "btcusdt@trade,btcusdt@kline_1m,btcusdt@ticker",
            "KAFKA_BOOTSTRAP_SERVERS": "embedded",
            "REDIS_URL": "embedded",
            "POSTGRES_DSN": "embedded",
            "ANALYTICS_SPARK_JOBS": "true",
            "ANALYTICS_STATE_DIR": str(tmp_path / "state"),
            "API_PORT": str(api_port),
            "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1",
        }
        args = [
            "--set",
            "analytics.anomaly_detection_args=--whale-quote-abs-symbol,BTCUSDT=4500",
        ]
        daemon = Daemon(env, args)
        async with trio.open_nursery() as nursery:
            await daemon.start(nursery)
            started = time.monotonic()
            first_data: dict[str, float] = {}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as client:
                with trio.move_on_after(DEADLINE_S):
                    while len(first_data) < len(ENDPOINTS):
                        assert daemon.proc is not None and daemon.proc.returncode is None, (
                            daemon.tail()
                        )
                        for path in ENDPOINTS:
                            if path in first_data:
                                continue
                            try:
                                r = await client.get(path)
                            except httpx.TransportError:
                                continue
                            # Never a 503: PostgreSQL and Redis are there from the start.
                            assert r.status_code == 200, (path, r.text)
                            if _has_data(path, r.json()):
                                first_data[path] = time.monotonic() - started
                        await trio.sleep(1.0)
                if len(first_data) < len(ENDPOINTS):
                    logs = tmp_path / "state" / "logs"
                    tails = {p.name: _tail(p) for p in sorted(logs.glob("*.log"))}
                    raise AssertionError(
                        f"no data after {DEADLINE_S} s from {set(ENDPOINTS) - set(first_data)};"
                        f" first data: {first_data}\njobs: {tails}\ndaemon: {daemon.tail(60)}"
                    )
                whales = (await client.get("/api/v1/analytics/anomalies")).json()["anomalies"]
            print("seconds to first data:", {p: round(s) for p, s in first_data.items()})
            mine = [a for a in whales if a["symbol"] == "BTCUSDT" and a["type"] == "whale_trade"]
            assert mine and all(a["observed"] > 4500 for a in mine), whales

            # A job that dies is logged and started again.
            victim = next(
                e for e in daemon.find("spark.job_started") if e["job"] == "anomaly_detection"
            )
            os.killpg(victim["pid"], signal.SIGKILL)
            exited = await daemon.wait_for("spark.job_exited", timeout=60)
            assert exited["job"] == "anomaly_detection" and exited["exit_code"] != 0
            with trio.fail_after(120):
                while not any(
                    e["job"] == "anomaly_detection" and e["restarts"] == 1
                    for e in daemon.find("spark.job_started")
                ):
                    await trio.sleep(0.2)

            # Ctrl-C: every job stops, then PostgreSQL, then the daemon exits 0.
            daemon.signal(signal.SIGINT)
            assert daemon.proc is not None
            with trio.fail_after(90):
                assert await daemon.proc.wait() == 0, daemon.tail()
            stopped = {e["job"] for e in daemon.find("spark.job_stopped")}
            assert stopped == {"trade_aggregation", "technical_indicators", "anomaly_detection"}
            assert daemon.find("postgres.embedded_stopped")
            nursery.cancel_scope.cancel()
    groups = {e["pid"] for e in daemon.find("spark.job_started")}
    # A SIGKILLed JVM takes a moment to be gone: poll, bounded.
    with trio.move_on_after(15):
        while _live_members(groups):  # /proc has no event to wait on
            await trio.sleep(0.1)
    assert _live_members(groups) == [], "a job (or its JVM) outlived marketd"


def _live_members(groups: set[int]) -> list[tuple[int, int, str]]:
    """(pid, process group, state) of every process of `groups` that is not a zombie. A zombie
    has exited: it only waits to be reaped by whatever adopted it (here PID 1 may never reap)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        fields = text[text.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            found.append((int(stat.parent.name), pgrp, state))
    return found
