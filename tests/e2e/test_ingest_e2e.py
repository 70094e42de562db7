"""marketd run (subprocess) against a scripted WebSocket server and Kafka, read back for real.

Runs against librdkafka's mock cluster, or a real broker with MARKETD_TEST_KAFKA=host:port.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

import pytest
import trio

from tests.ingest import frames as f
from tests.support.daemon import Daemon
from tests.support.kafka import TestKafka, unique_topic
from tests.support.ws_server import Scripted, serve_scripted

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def topics() -> dict[str, str]:
    return {
        "TOPIC_RAW_TRADES": unique_topic("trades"),
        "TOPIC_RAW_KLINES": unique_topic("klines"),
        "TOPIC_RAW_TICKERS": unique_topic("tickers"),
        "TOPIC_DLQ": unique_topic("dlq"),
    }


def env_for(port: int, kafka: TestKafka, names: dict[str, str], streams: str) -> dict[str, str]:
    return {
        "BINANCE_WS_URL": f"ws://127.0.0.1:{port}/stream",
        "BINANCE_STREAMS": streams,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "MARKETD_COMPONENTS": "ingest",
        "RECONNECT_MAX_DELAY_SECONDS": "1",
        **names,
    }


def by_topic(msgs: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for m in msgs:
        out.setdefault(m.topic(), []).append(m)
    return out


async def test_every_valid_frame_once_and_every_invalid_in_dlq(kafka: TestKafka) -> None:
    names = topics()
    valid = (
        [f.trade(i) for i in range(1, 301)]
        + [f.kline(), f.kline(closed=True, event_time=f.now_ms() + 5)]
        + [f.ticker(), f.ticker("ETHUSDT")]
    )
    invalid = [
        ('{"stream":"btcusdt@trade","data":{', "bad_json"),
        (f.wrap("btcusdt@trade", f.trade_data(p="NaN")), "bad_decimal"),
        (f.wrap("btcusdt@trade", f.trade_data(q="-1")), "negative_value"),
        (f.wrap("btcusdt@trade", f.trade_data(e="kline")), "event_type_mismatch"),
    ]
    control = ['{"result":null,"id":1}', '{"error":{"code":2,"msg":"Invalid request"},"id":2}']
    script = Scripted(lambda _: valid[:150] + [x for x, _ in invalid] + control + valid[150:])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_scripted, script)
        daemon = Daemon(
            env_for(
                port, kafka, names, "btcusdt@trade,btcusdt@kline_1m,btcusdt@ticker,ethusdt@ticker"
            )
        )
        await daemon.start(nursery)
        with trio.fail_after(30):
            await script.done.wait()
        await trio.sleep(0.5)
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()

    assert script.paths == [
        "/stream?streams=btcusdt@trade/btcusdt@kline_1m/btcusdt@ticker/ethusdt@ticker"
    ]
    msgs = by_topic(kafka.read_all(names.values(), expect=len(valid) + len(invalid)))
    trades = [json.loads(m.value()) for m in msgs[names["TOPIC_RAW_TRADES"]]]
    assert sorted(t["trade_id"] for t in trades) == list(range(1, 301))  # exactly once
    assert all(m.key() == b"BTCUSDT" for m in msgs[names["TOPIC_RAW_TRADES"]])
    # Per-symbol order is kept (one symbol -> one partition, produced in order).
    assert [t["trade_id"] for t in trades] == list(range(1, 301))
    assert len(msgs[names["TOPIC_RAW_KLINES"]]) == 2
    tickers = {m.key(): json.loads(m.value()) for m in msgs[names["TOPIC_RAW_TICKERS"]]}
    assert set(tickers) == {b"BTCUSDT", b"ETHUSDT"}
    assert tickers[b"ETHUSDT"]["stream"] == "ethusdt@ticker"
    dlq = [json.loads(m.value()) for m in msgs[names["TOPIC_DLQ"]]]
    assert Counter(d["reason"] for d in dlq) == Counter(r for _, r in invalid)
    assert all(d["raw"] for d in dlq)


async def test_dropped_connection_reconnects_and_resubscribes(kafka: TestKafka) -> None:
    names = topics()
    first = [f.trade(i) for i in range(1, 101)]
    second = [f.trade(i) for i in range(101, 201)]
    script = Scripted(lambda c: first if c == 0 else second, close_after=lambda c: c == 0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_scripted, script)
        daemon = Daemon(env_for(port, kafka, names, "btcusdt@trade"))
        await daemon.start(nursery)
        with trio.move_on_after(30):
            await script.done.wait()
        assert script.done.is_set(), daemon.tail()
        await trio.sleep(0.5)
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()

    assert len(script.paths) == 2 and script.paths[0] == script.paths[1]
    disconnects = daemon.find("ws.disconnected")
    assert disconnects and disconnects[0]["reason"] == "going_away"
    msgs = kafka.read_all([names["TOPIC_RAW_TRADES"]], expect=200)
    assert sorted(json.loads(m.value())["trade_id"] for m in msgs) == list(range(1, 201))


async def test_sigterm_mid_stream_loses_nothing_accepted(kafka: TestKafka) -> None:
    names = topics()
    total = 60_000
    script = Scripted(lambda _: [f.trade(i) for i in range(1, total + 1)])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_scripted, script)
        daemon = Daemon(env_for(port, kafka, names, "btcusdt@trade"))
        await daemon.start(nursery)
        with trio.fail_after(30):
            while script.sent < 5_000:
                await trio.sleep(0.01)
        daemon.signal(signal.SIGTERM)  # mid-stream
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()

    stopped = daemon.find("ingest.stopped")[-1]
    accepted, delivered, failed = map(int, stopped[names["TOPIC_RAW_TRADES"]].split("/"))
    assert accepted == delivered and failed == 0
    msgs = kafka.read_all([names["TOPIC_RAW_TRADES"]], expect=delivered)
    ids = [json.loads(m.value())["trade_id"] for m in msgs]
    assert len(ids) == delivered
    # What arrived is exactly the prefix the daemon read: no gap, no duplicate.
    assert sorted(ids) == list(range(1, delivered + 1))
    assert 0 < delivered <= total


@pytest.mark.parametrize("trigger", ["server_shutdown", "max_age"])
async def test_rotation_opens_the_replacement_before_closing(
    kafka: TestKafka, trigger: str
) -> None:
    names = topics()
    shutdown = f.wrap("!serverShutdown", {"e": "serverShutdown", "E": f.now_ms()})
    first = [f.trade(i) for i in range(1, 101)]
    if trigger == "server_shutdown":
        first.append(shutdown)
    second = [f.trade(i) for i in range(101, 201)]
    script = Scripted(lambda c: first if c == 0 else second)
    env = env_for(0, kafka, names, "btcusdt@trade")
    extra = ["--set", "rotation.max_age_s=1", "--set", "rotation.jitter_s=0"]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_scripted, script)
        env["BINANCE_WS_URL"] = f"ws://127.0.0.1:{port}/stream"
        daemon = Daemon(env, extra if trigger == "max_age" else [])
        await daemon.start(nursery)
        with trio.move_on_after(30):
            while script.connections < 2 or not daemon.find("ws.rotated"):
                await trio.sleep(0.05)
        assert daemon.find("ws.rotated"), daemon.tail()
        await trio.sleep(0.5)
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()

    rotated = daemon.find("ws.rotated")[0]
    assert rotated["reason"] == trigger
    assert not daemon.find("ws.disconnected")  # a rotation, not a reconnect
    msgs = kafka.read_all([names["TOPIC_RAW_TRADES"]], expect=200)
    assert sorted(json.loads(m.value())["trade_id"] for m in msgs) == list(range(1, 201))
