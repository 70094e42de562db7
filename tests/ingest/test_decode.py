from __future__ import annotations

import base64
import json
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.records import DLQ_FIELDS, KLINE_FIELDS, TICKER_FIELDS, TRADE_FIELDS
from tests.ingest import frames as f

ROUTES = {
    "aggTrade": "raw_agg_trades",
    "bookTicker": "raw_book_tickers",
    "miniTicker": "raw_mini_tickers",
    "rollingTicker": "raw_rolling_tickers",
    "avgPrice": "raw_avg_prices",
    "referencePrice": "raw_reference_prices",
    "blockTrade": "raw_block_trades",
}
TOPICS = Topics("raw_trades", "raw_klines", "raw_tickers", "raw_dlq", ROUTES)


def decode(data: str | bytes, decoder: Decoder | None = None) -> list[Outgoing]:
    out: list[Outgoing] = []
    (decoder or Decoder(TOPICS)).decode(Frame(data, time.time_ns(), 0), out)
    return out


def one(data: str | bytes, topic: str) -> dict[str, Any]:
    out = decode(data)
    assert len(out) == 1, out
    assert out[0].topic == topic, json.loads(out[0].value)
    value: dict[str, Any] = json.loads(out[0].value)
    return value


def rejected(data: str | bytes) -> dict[str, Any]:
    return one(data, "raw_dlq")


def test_trade_record_contract() -> None:
    out = decode(f.trade(42))
    assert out[0].key == b"BTCUSDT"
    rec = json.loads(out[0].value)
    assert tuple(sorted(rec)) == tuple(sorted(TRADE_FIELDS))
    assert rec["trade_id"] == 42 and rec["price"] == "118234.56000000"
    assert rec["quantity"] == "0.00100000" and rec["is_buyer_maker"] is True
    assert rec["source"] == "binance" and rec["stream"] == "btcusdt@trade"
    assert rec["schema_version"] == 1 and isinstance(rec["ingested_at"], int)


def test_kline_record_contract() -> None:
    rec = one(f.kline(closed=True), "raw_klines")
    assert tuple(sorted(rec)) == tuple(sorted(KLINE_FIELDS))
    assert rec["interval"] == "1m" and rec["is_closed"] is True
    assert rec["close_time"] - rec["open_time"] == 59_999
    assert (rec["first_trade_id"], rec["last_trade_id"], rec["trades_count"]) == (100, 200, 101)


def test_ticker_record_contract_keeps_exact_decimal_strings() -> None:
    rec = one(f.ticker(), "raw_tickers")
    assert tuple(sorted(rec)) == tuple(sorted(TICKER_FIELDS))
    assert rec["price_change"] == "-12.50000000" and rec["last_price"] == "118234.56000000"
    assert rec["best_bid"] == "118234.55000000" and rec["trades_count"] == 101


def test_microsecond_streams_are_normalised_to_ms() -> None:
    t_us = f.now_ms() * 1000
    frame = f.wrap("btcusdt@trade", f.trade_data(E=t_us, T=t_us))
    out: list[Outgoing] = []
    Decoder(TOPICS, time_unit="MICROSECOND").decode(Frame(frame, time.time_ns(), 0), out)
    rec = json.loads(out[0].value)
    assert rec["trade_time"] == t_us // 1000


def test_symbols_with_digits_and_non_ascii() -> None:
    assert one(f.trade(symbol="1000SATSUSDT"), "raw_trades")["symbol"] == "1000SATSUSDT"
    out = decode(f.trade(symbol="币安人生USDT"))
    assert out[0].key == "币安人生USDT".encode()


def test_unknown_extra_fields_and_missing_ignore_field_are_accepted() -> None:
    one(f.wrap("btcusdt@trade", f.trade_data(b=123, a=456, newField={"x": 1})), "raw_trades")
    data = f.trade_data()
    del data["M"]
    one(f.wrap("btcusdt@trade", data), "raw_trades")


def test_all_market_mini_ticker_array_fans_out() -> None:
    t = f.now_ms()
    items = [
        {
            "e": "24hrMiniTicker",
            "E": t,
            "s": f"S{i}USDT",
            "c": "1.0",
            "o": "0.9",
            "h": "1.1",
            "l": "0.8",
            "v": "100",
            "q": "100",
        }
        for i in range(3000)
    ]
    out = decode(f.wrap("!miniTicker@arr", items))
    assert len(out) == 3000 and {o.topic for o in out} == {"raw_mini_tickers"}
    assert out[17].key == b"S17USDT"


@pytest.mark.parametrize(
    ("frame", "topic"),
    [
        (
            f.wrap(
                "btcusdt@aggTrade",
                {
                    "e": "aggTrade",
                    "E": f.now_ms(),
                    "s": "BTCUSDT",
                    "a": 5,
                    "p": "1.0",
                    "q": "2.0",
                    "f": 10,
                    "l": 12,
                    "T": f.now_ms(),
                    "m": False,
                    "M": True,
                },
            ),
            "raw_agg_trades",
        ),
        (
            f.wrap(
                "btcusdt@bookTicker",
                {
                    "u": 400900217,
                    "s": "BTCUSDT",
                    "b": "25.35190000",
                    "B": "31.21000000",
                    "a": "25.36520000",
                    "A": "40.66000000",
                },
            ),
            "raw_book_tickers",
        ),
        (
            f.wrap(
                "btcusdt@avgPrice",
                {
                    "e": "avgPrice",
                    "E": f.now_ms(),
                    "s": "BTCUSDT",
                    "i": "5m",
                    "w": "1.5",
                    "T": f.now_ms(),
                },
            ),
            "raw_avg_prices",
        ),
        (
            f.wrap(
                "btcusdt@referencePrice",
                {"e": "referencePrice", "s": "BTCUSDT", "r": None, "t": f.now_ms()},
            ),
            "raw_reference_prices",
        ),
    ],
)
def test_routed_kinds(frame: str, topic: str) -> None:
    one(frame, topic)


@pytest.mark.parametrize(
    "frame",
    [
        '{"result":null,"id":1}',
        '{"result":["btcusdt@trade"],"id":"abc"}',
        '{"code":2,"msg":"Invalid request: too many parameters","id":3}',
        '{"code":3,"msg":"Invalid JSON: expected value at line 1 column 1"}',
        '{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}',
        '{"error":{"code":4,"msg":"Too many subscriptions"},"id":null}',
        '{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1785000000000}}',
        '{"e":"serverShutdown","E":1785000000000}',
    ],
)
def test_control_and_error_frames_are_never_published(frame: str) -> None:
    decoder = Decoder(TOPICS)
    assert decode(frame, decoder) == []
    assert sum(decoder.control_total.values.values()) == 1


BAD: list[tuple[str, str | bytes, str]] = [
    ("bad json", '{"stream":"btcusdt@trade","data":{', "bad_json"),
    ("bare NaN token", f.trade().replace('"0.00100000"', "NaN"), "bad_json"),
    ("not an object", "[1,2,3]", "not_an_object"),
    ("data not an object", f.wrap("btcusdt@trade", [1, 2]), "wrong_type"),
    (
        "missing field",
        f.wrap("btcusdt@trade", {k: v for k, v in f.trade_data().items() if k != "p"}),
        "missing_field",
    ),
    ("price as number", f.wrap("btcusdt@trade", f.trade_data(p=1.5)), "wrong_type"),
    ("id as string", f.wrap("btcusdt@trade", f.trade_data(t="7")), "wrong_type"),
    ("id as bool", f.wrap("btcusdt@trade", f.trade_data(t=True)), "wrong_type"),
    ("flag as int", f.wrap("btcusdt@trade", f.trade_data(m=1)), "wrong_type"),
    ("NaN price", f.wrap("btcusdt@trade", f.trade_data(p="NaN")), "bad_decimal"),
    ("Infinity price", f.wrap("btcusdt@trade", f.trade_data(p="Infinity")), "bad_decimal"),
    ("non-numeric price", f.wrap("btcusdt@trade", f.trade_data(p="12a.5")), "bad_decimal"),
    ("empty qty", f.wrap("btcusdt@trade", f.trade_data(q="")), "bad_decimal"),
    ("negative qty", f.wrap("btcusdt@trade", f.trade_data(q="-1.0")), "negative_value"),
    ("negative price", f.wrap("btcusdt@trade", f.trade_data(p="-118234.5")), "negative_value"),
    ("negative id", f.wrap("btcusdt@trade", f.trade_data(t=-5)), "negative_value"),
    (
        "event type vs stream",
        f.wrap("btcusdt@trade", f.trade_data(e="aggTrade")),
        "event_type_mismatch",
    ),
    ("symbol vs stream", f.wrap("ethusdt@trade", f.trade_data()), "symbol_mismatch"),
    (
        "far-future time",
        f.wrap("btcusdt@trade", f.trade_data(T=f.now_ms() * 1000)),
        "absurd_timestamp",
    ),
    (
        "time in seconds",
        f.wrap("btcusdt@trade", f.trade_data(T=f.now_ms() // 1000)),
        "absurd_timestamp",
    ),
    (
        "duplicate key",
        f.trade().replace('"p":"118234.56000000"', '"p":"1.0","p":"2.0"'),
        "duplicate_key",
    ),
    (
        "duplicate key, optional absent",
        f.trade().replace('"p":"118234.56000000"', '"p":"1.0","p":"2.0"').replace(',"M":true', ""),
        "duplicate_key",
    ),
    (
        "duplicate key, pretty",
        f.trade().replace('"p":"118234.56000000"', '"p" : "1.0", "p": "2.0"'),
        "duplicate_key",
    ),
    (
        "kline interval vs stream",
        f.wrap("btcusdt@kline_5m", f.kline_data(interval="1m")),
        "interval_mismatch",
    ),
    ("kline close before open", f.wrap("btcusdt@kline_1m", f.kline_data(T=1)), "absurd_timestamp"),
    ("ticker negative volume", f.wrap("btcusdt@ticker", f.ticker_data(v="-1")), "negative_value"),
    ("unknown stream", f.wrap("btcusdt@depth", {"e": "depthUpdate"}), "unsupported_stream"),
    ("neither event nor control", '{"hello":"world"}', "unknown_frame"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "not_an_object"),
    (
        "deep nesting in data",
        '{"stream":"btcusdt@trade","data":' + "[" * 50_000 + "]" * 50_000 + "}",
        "too_deep",
    ),
    ("lone surrogate", f.trade().replace("BTCUSDT", "BTC\\ud800USDT", 1), "bad_json"),
    (
        "non-UTF-8 binary frame",
        b'{"stream":"btcusdt@trade","data":{"s":"\xff\xfe"}}',
        "invalid_utf8",
    ),
]


@pytest.mark.parametrize(("name", "frame", "reason"), BAD, ids=[b[0] for b in BAD])
def test_malformed_input_is_dead_lettered_with_reason(
    name: str, frame: str | bytes, reason: str
) -> None:
    decoder = Decoder(TOPICS)
    out = decode(frame, decoder)
    assert len(out) == 1 and out[0].topic == "raw_dlq"
    record = json.loads(out[0].value)
    assert record["reason"] == reason, record["detail"]
    assert tuple(sorted(record)) == tuple(sorted(DLQ_FIELDS))
    assert record["raw_bytes"] == len(
        frame if isinstance(frame, bytes) else frame.encode("utf-8", "surrogatepass")
    )
    assert decoder.rejected_total.get(reason) == 1


def test_oversized_frame_is_truncated_in_the_dlq() -> None:
    frame = f.trade()[:-2] + ',"pad":"' + "x" * 2_000_000 + '"}}'
    record = rejected(frame)
    assert record["reason"] == "frame_too_large"
    assert record["raw_bytes"] == len(frame)
    assert len(record["raw"].encode()) <= 8192
    assert record["stream"] is None or record["stream"] == "btcusdt@trade"


def test_binary_garbage_keeps_bytes_as_base64() -> None:
    raw = b"\xff\xfe\x00garbage"
    record = rejected(raw)
    assert record["raw"] is None and base64.b64decode(record["raw_b64"]) == raw


def test_dlq_truncation_never_splits_a_character() -> None:
    frame = '{"x":"' + "€" * 5000 + '"}'
    record = rejected(frame)
    record["raw"].encode("utf-8")  # valid UTF-8
    assert len(record["raw"].encode()) <= 8192


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_decoder_never_raises(data: str | bytes) -> None:
    out = decode(data)
    for o in out:
        msgspec.json.decode(o.value)  # every output is valid JSON


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=4) | st.dictionaries(st.sampled_from("eEstpqTmMk"), c, max_size=9)
        ),
        max_leaves=30,
    )
)
def test_structured_garbage_under_a_real_stream_never_raises(data: Any) -> None:
    out = decode(f.wrap("btcusdt@trade", data))
    assert len(out) == 1


def test_frames_are_counted_per_stream() -> None:
    decoder = Decoder(TOPICS)
    for frame in (f.trade(1), f.trade(2), f.ticker(), "garbage"):
        decode(frame, decoder)
    assert decoder.frames_by_stream.values == {"btcusdt@trade": 2, "btcusdt@ticker": 1}
