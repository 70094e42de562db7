"""No trade lost: the fake exchange skips ids and drops connections, marketd backfills over REST,
and `marketd verify tape` proves the tape in Kafka has no gap and no duplicate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from tests.support.daemon import Daemon
from tests.support.exchange import fake_exchange
from tests.support.kafka import TestKafka, unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def verify(kafka: TestKafka, topic: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "marketd.cli", "verify", "tape", "--topic", topic, "--json"],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, json.loads(result.stdout)


async def run_against(
    kafka: TestKafka, exchange_args: list[str], seconds: float
) -> tuple[str, str, Daemon]:
    trades, gaps = unique_topic("trades"), unique_topic("gaps")
    with fake_exchange("--symbols", "btcusdt,ethusdt", "--seed", "11", *exchange_args) as fx:
        daemon = Daemon(
            {
                "BINANCE_WS_URL": fx.ws_url,
                "BINANCE_REST_URL": fx.http_url,
                "BINANCE_STREAMS": "btcusdt@trade,ethusdt@trade",
                "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "MARKETD_COMPONENTS": "ingest",
                "TOPIC_RAW_TRADES": trades,
                "TOPIC_GAPS": gaps,
                "RECONNECT_MAX_DELAY_SECONDS": "1",
            }
        )
        async with trio.open_nursery() as nursery:
            await daemon.start(nursery)
            await daemon.wait_for("ws.connected")
            await trio.sleep(seconds)
            assert await daemon.stop() == 0, daemon.tail()
            nursery.cancel_scope.cancel()
    return trades, gaps, daemon


async def test_skipped_ids_are_backfilled_and_the_tape_is_complete(kafka: TestKafka) -> None:
    trades, gaps, _ = await run_against(
        kafka, ["--rate", "400", "--skip-every", "150", "--skip-count", "3"], 6
    )
    code, report = verify(kafka, trades)
    assert code == 0, report
    symbols = report["symbols"]
    assert set(symbols) == {"BTCUSDT", "ETHUSDT"}
    assert sum(s["backfilled"] for s in symbols.values()) > 0
    assert all(not s["gaps"] and not s["duplicates"] for s in symbols.values())
    repaired = [json.loads(m.value()) for m in kafka.read_all([gaps])]
    assert repaired and all(g["repaired"] for g in repaired)


async def test_dropped_connections_lose_nothing(kafka: TestKafka) -> None:
    trades, _, daemon = await run_against(
        kafka, ["--rate", "400", "--drop-after", "500", "--drop-repeat"], 8
    )
    assert len(daemon.find("ws.disconnected")) >= 2
    code, report = verify(kafka, trades)
    assert code == 0, report
    assert all(not s["gaps"] and not s["duplicates"] for s in report["symbols"].values())
