"""Hostile frames against `marketd run` (subprocess) and Kafka, read back for real (issue 9).

Items 4-6: validation rejects name their stream in the DLQ and are keyed by symbol; hostile values
are dead-lettered, not published; one corrupt trade id or one ticker dated ahead does not make
ingest drop the good data after it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.ingest import frames as f
from tests.support.daemon import Daemon
from tests.support.kafka import TestKafka, unique_topic
from tests.support.ws_server import Scripted, serve_scripted

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

STREAMS = "btcusdt@trade,btcusdt@kline_1m,btcusdt@ticker"


def script() -> tuple[list[str], dict[str, str]]:
    """The frames, built when the connection opens (times near the daemon's clock), and the
    DLQ reason expected for each hostile one."""
    now = f.now_ms()
    hostile = {
        "id_2^63": f.wrap("btcusdt@trade", f.trade_data(2**63, at=now)),
        "kline_high_below_low": f.wrap("btcusdt@kline_1m", f.kline_data(h="0.0001")),
        "bare_event": json.dumps(f.trade_data(61, at=now)),
        "nan_price": f.wrap("btcusdt@trade", f.trade_data(62, at=now, p="NaN")),
        "a_day_ahead": f.wrap("btcusdt@ticker", f.ticker_data(E=now + 3_600_000)),
        "junk_stream": f.wrap("x" * 300 + "@nonsense", f.trade_data(63, at=now)),
    }
    expected = {
        "id_2^63": "out_of_range",
        "kline_high_below_low": "inconsistent_values",
        "bare_event": "unknown_frame",
        "nan_price": "bad_decimal",
        "a_day_ahead": "absurd_timestamp",
        "junk_stream": "unsupported_stream",
        "corrupt_id": "implausible_id",
    }
    frames = [f.trade(i, at=now) for i in range(1, 51)]
    frames += list(hostile.values())
    # Tickers: one dated 5 s ahead (within the 10 s bound), then good ones behind it.
    frames += [f.ticker(E=now + 100 * i) for i in (1, 2)]
    frames.append(f.ticker(E=now + 5_000))
    frames += [f.ticker(E=now + 100 * i) for i in range(3, 13)]
    frames.append(f.trade(10**12, at=now))  # a plausible int64, but no real jump
    frames += [f.trade(i, at=now) for i in range(51, 101)]  # the last one marks the end
    return frames, expected


def last_trade_in(kafka: TestKafka, names: dict[str, str]) -> bool:
    msgs = kafka.read_all([names["TOPIC_RAW_TRADES"]], timeout_s=5)
    return any(json.loads(m.value() or b"{}").get("trade_id") == 100 for m in msgs)


async def test_hostile_frames_are_dead_lettered_and_good_data_after_them_published(
    kafka: TestKafka,
) -> None:
    names = {
        "TOPIC_RAW_TRADES": unique_topic("trades"),
        "TOPIC_RAW_KLINES": unique_topic("klines"),
        "TOPIC_RAW_TICKERS": unique_topic("tickers"),
        "TOPIC_DLQ": unique_topic("dlq"),
    }
    built: dict[str, Any] = {}

    def frames_for(_conn: int) -> list[str]:
        frames, built["expected"] = script()
        return frames

    scripted = Scripted(frames_for)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_scripted, scripted)
        daemon = Daemon(
            {
                "BINANCE_WS_URL": f"ws://127.0.0.1:{port}/stream",
                "BINANCE_STREAMS": STREAMS,
                "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "MARKETD_COMPONENTS": "ingest",
                "BACKFILL_ENABLED": "false",
                **names,
            }
        )
        await daemon.start(nursery)
        with trio.fail_after(60):
            # The daemon read every frame once the last trade is in Kafka; stopping it then
            # delivers everything it accepted before.
            while not await trio.to_thread.run_sync(last_trade_in, kafka, names):
                await trio.sleep(0.2)
        assert await daemon.stop() == 0, daemon.tail()
        nursery.cancel_scope.cancel()
    expected: dict[str, str] = built["expected"]
    tickers_sent = 13
    msgs = kafka.read_all(names.values(), expect=100 + tickers_sent + len(expected))

    by_topic: dict[str, list[Any]] = {}
    for m in msgs:
        by_topic.setdefault(str(m.topic()), []).append(m)
    trades = [json.loads(m.value())["trade_id"] for m in by_topic[names["TOPIC_RAW_TRADES"]]]
    assert trades == list(range(1, 101))
    tickers = [json.loads(m.value()) for m in by_topic[names["TOPIC_RAW_TICKERS"]]]
    assert len(tickers) == tickers_sent  # none held back by the one dated ahead
    assert names["TOPIC_RAW_KLINES"] not in by_topic
    dlq = [(m.key(), json.loads(m.value())) for m in by_topic[names["TOPIC_DLQ"]]]
    assert sorted(d["reason"] for _, d in dlq) == sorted(expected.values())
    for key, d in dlq:
        if d["reason"] == "unknown_frame":
            assert (key, d["stream"]) == (None, None)
        elif d["reason"] == "unsupported_stream":
            assert key is None and d["stream"] == "x" * 256
        else:
            assert key == b"BTCUSDT" and d["stream"].startswith("btcusdt@"), d
