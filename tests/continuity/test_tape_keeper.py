"""TapeKeeper: seeding the trade gate with the tape a previous process published."""

from __future__ import annotations

import msgspec

from marketd.ingest.continuity import RequestBackfill
from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.ingest.tape import Request, TapeKeeper
from marketd.metrics import MetricsFactory
from marketd.records import TradeRecord
from tests.ingest import frames as f


def keeper(requested: list[Request]) -> TapeKeeper:
    def request(r: Request) -> bool:
        requested.append(r)
        return True

    return TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=request,
        gap_grace_s=30.0,
    )


def trade(symbol: str, trade_id: int) -> Outgoing:
    value = msgspec.json.encode({"symbol": symbol, "trade_id": trade_id})
    return Outgoing("raw_trades", symbol.encode(), value, 0, None, ("trade", symbol, trade_id, 0))


def ids(out: list[Outgoing]) -> list[tuple[str, int]]:
    return [(o.ident[1], o.ident[2]) for o in out if o.ident is not None]


def test_seeded_symbols_continue_the_published_tape() -> None:
    requested: list[Request] = []
    k = keeper(requested)
    k.seed_trades({"BTCUSDT": 100, "ETHUSDT": 500})
    out = k.admit(
        [
            trade("BTCUSDT", 99),  # published before the restart: a duplicate
            trade("BTCUSDT", 101),  # the next id: straight through
            trade("ETHUSDT", 504),  # 501..503 were missed while down
            trade("BNBUSDT", 7),  # not seeded: starts a tape of its own
        ],
        now=0.0,
    )
    assert ids(out) == [("BTCUSDT", 101), ("BNBUSDT", 7)]
    assert requested == [RequestBackfill("ETHUSDT", 501, 503, "trades", "restart")]
    assert k.trades.held("ETHUSDT") == 1


def test_an_empty_seed_changes_nothing() -> None:
    requested: list[Request] = []
    k = keeper(requested)
    k.seed_trades({})
    assert ids(k.admit([trade("BTCUSDT", 5), trade("BTCUSDT", 6)], now=0.0)) == [
        ("BTCUSDT", 5),
        ("BTCUSDT", 6),
    ]
    assert requested == []


def test_a_quarantined_trade_goes_to_the_dlq_with_its_stream_and_symbol() -> None:
    k = keeper([])
    k.dlq_topic = "dlq"
    value = msgspec.json.encode(
        {"symbol": "BTCUSDT", "trade_id": 10**12, "stream": "btcusdt@trade"}
    )
    outlier = Outgoing(
        "raw_trades", b"BTCUSDT", value, 5_000_000, None, ("trade", "BTCUSDT", 10**12, 0)
    )
    out = k.admit([trade("BTCUSDT", 1), outlier, trade("BTCUSDT", 2)], now=0.0)
    assert ids([o for o in out if o.topic == "raw_trades"]) == [("BTCUSDT", 1), ("BTCUSDT", 2)]
    (dead,) = [o for o in out if o.topic == "dlq"]
    record = msgspec.json.decode(dead.value)
    assert dead.key == b"BTCUSDT"
    assert (record["reason"], record["stream"]) == ("implausible_id", "btcusdt@trade")
    assert msgspec.json.decode(record["raw"])["trade_id"] == 10**12
    assert "far above" in record["detail"]
    assert k._rejected.get("implausible_id") == 1


def test_quarantines_count_in_the_decoders_rejection_counter() -> None:
    metrics = MetricsFactory()
    k = TapeKeeper(gaps_topic="gaps", backfill_topics={}, request=lambda _r: True, metrics=metrics)
    rejected = metrics.fast_counter("decode_rejected", "frames rejected per reason", "reason")
    k.admit([trade("BTCUSDT", 1), trade("BTCUSDT", 10**12), trade("BTCUSDT", 2)], now=0.0)
    assert rejected.get("implausible_id") == 1


# -- the whole decode stage: frames in, records out ----------------------------------------------


def decode_stage() -> tuple[Decoder, TapeKeeper]:
    topics = Topics("raw_trades", "raw_klines", "raw_tickers", "raw_dlq", {})
    k = TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=lambda _r: True,
        dlq_topic="raw_dlq",
    )
    return Decoder(topics), k


def run(frames: list[tuple[str, int]]) -> list[Outgoing]:
    decoder, k = decode_stage()
    out: list[Outgoing] = []
    for data, recv_ms in frames:
        decoded: list[Outgoing] = []
        decoder.decode(Frame(data, recv_ms * 1_000_000, 0), decoded)
        out += k.admit(decoded, now=recv_ms / 1000)
    return out


def test_a_ticker_frame_dated_ahead_does_not_silence_its_symbol() -> None:
    now = f.now_ms()
    frames = [(f.ticker(E=now + i * 1_000, C=now + i * 1_000), now + i * 1_000) for i in range(3)]
    frames.insert(2, (f.ticker(E=now + 1_000 + 9_900, C=now), now + 1_100))  # within the bound
    out = run(frames + [(f.ticker(E=now + i * 1_000, C=now), now + i * 1_000) for i in range(3, 9)])
    times = [msgspec.json.decode(o.value)["event_time"] for o in out]
    assert times == [
        now,
        now + 1_000,
        now + 10_900,
        now + 2_000,
        *(now + i * 1_000 for i in range(3, 9)),
    ]


def test_a_ticker_frame_dated_beyond_the_bound_is_dead_lettered() -> None:
    now = f.now_ms()
    out = run([(f.ticker(E=now + 10_001), now), (f.ticker(E=now), now)])
    assert [o.topic for o in out] == ["raw_dlq", "raw_tickers"]


def test_a_trade_frame_with_a_corrupt_id_does_not_silence_its_symbol() -> None:
    now = f.now_ms()
    ids_in = [1, 2, 3, 10**15, 4, 5, 6]
    out = run([(f.trade(i, at=now), now) for i in ids_in])
    trades = [msgspec.json.decode(o.value)["trade_id"] for o in out if o.topic == "raw_trades"]
    assert trades == [1, 2, 3, 4, 5, 6]
    dead = [msgspec.json.decode(o.value) for o in out if o.topic == "raw_dlq"]
    assert [(d["reason"], d["stream"]) for d in dead] == [("implausible_id", "btcusdt@trade")]


def test_a_premature_kline_close_does_not_silence_the_real_close() -> None:
    now = f.now_ms()
    start = now - now % 60_000
    frames = [
        (f.kline(event_time=start + 1_000), start + 1_000),
        (f.kline(closed=True, event_time=start + 2_000), start + 2_000),  # corrupt: early
        (f.kline(event_time=start + 3_000), start + 3_000),
        (f.kline(closed=True, event_time=start + 60_002), start + 60_010),  # the real close
        (f.kline(event_time=start + 4_000), start + 60_020),  # a lagging copy: stale
    ]
    out = run(frames)
    klines = [msgspec.json.decode(o.value) for o in out if o.topic == "raw_klines"]
    assert [(k["event_time"] - start, k["is_closed"]) for k in klines] == [
        (1_000, False),
        (2_000, True),
        (3_000, False),
        (60_002, True),
    ]
