from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketd.ingest.decode import OTHER_STREAM, Decoder, Frame, Outgoing, Reason, Topics
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


def test_frames_are_counted_per_configured_stream() -> None:
    decoder = Decoder(TOPICS, streams=["btcusdt@trade", "btcusdt@ticker"])
    for frame in (f.trade(1), f.trade(2), f.ticker(), "garbage", f.ticker("ETHUSDT")):
        decode(frame, decoder)
    assert decoder.frames_by_stream.values == {
        "btcusdt@trade": 2,
        "btcusdt@ticker": 1,
        OTHER_STREAM: 1,
    }


def test_stream_names_from_upstream_never_become_labels() -> None:
    decoder = Decoder(TOPICS, streams=["btcusdt@trade"])
    for i in range(3000):
        decode(f.wrap(f"junk{i}@trade", f.trade_data()), decoder)
        decode(f.wrap(f"\u0000{i}", {}), decoder)
    assert decoder.frames_by_stream.values == {OTHER_STREAM: 6000}


# -- validation rejects name their stream and are keyed by its symbol ----------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (f.wrap("btcusdt@trade", f.trade_data(p="NaN")), "bad_decimal"),
        (f.wrap("btcusdt@trade", f.trade_data(t="7")), "wrong_type"),
        (
            f.wrap("btcusdt@trade", {k: v for k, v in f.trade_data().items() if k != "q"}),
            "missing_field",
        ),
        (f.trade().replace('"p":"118234.56000000"', '"p":"1.0","p":"2.0"'), "duplicate_key"),
        (f.wrap("btcusdt@trade", f.trade_data(T=f.now_ms() + 3_600_000)), "absurd_timestamp"),
        (f.wrap("btcusdt@kline_1m", f.kline_data(h="0.0001")), "inconsistent_values"),
    ],
)
def test_validation_rejects_carry_stream_and_symbol_key(frame: str, reason: str) -> None:
    out = decode(frame)
    assert len(out) == 1 and out[0].topic == "raw_dlq"
    record = json.loads(out[0].value)
    assert record["reason"] == reason
    assert record["stream"] == json.loads(frame[: frame.index(",")] + "}")["stream"]
    assert out[0].key == b"BTCUSDT"


def test_rejects_of_all_market_streams_name_the_stream_without_a_key() -> None:
    out = decode(f.wrap("!miniTicker@arr", [{"e": "24hrMiniTicker"}]))
    record = json.loads(out[0].value)
    assert (record["reason"], record["stream"], out[0].key) == (
        "missing_field",
        "!miniTicker@arr",
        None,
    )


def test_an_unsupported_stream_is_named_but_not_keyed() -> None:
    out = decode(f.wrap("btcusdt@depth", {"e": "depthUpdate"}))
    record = json.loads(out[0].value)
    assert (record["reason"], record["stream"], out[0].key) == (
        "unsupported_stream",
        "btcusdt@depth",
        None,
    )


def test_a_huge_junk_stream_name_is_cut_in_the_dlq_record() -> None:
    record = rejected(f.wrap("x" * 100_000, {}))
    assert record["reason"] == "unsupported_stream" and len(record["stream"]) == 256


def test_frames_before_the_envelope_have_no_stream() -> None:
    for frame in ("[1]", "{", b"\xff"):
        out = decode(frame)
        assert json.loads(out[0].value)["stream"] is None and out[0].key is None


def test_the_stream_of_one_frame_does_not_leak_into_the_next() -> None:
    decoder = Decoder(TOPICS)
    decode(f.trade(), decoder)
    out = decode('{"hello":"world"}', decoder)
    assert json.loads(out[0].value)["stream"] is None and out[0].key is None


# -- hostile values that fit the wire types but not the record contract ----------------------------

INT64_MAX = 2**63 - 1


def agg_trade_data(**over: Any) -> dict[str, Any]:
    t = f.now_ms()
    data = {"e": "aggTrade", "E": t, "s": "BTCUSDT", "a": 5, "p": "1.0", "q": "2.0", "f": 10}
    data.update({"l": 12, "T": t, "m": False, "M": True}, **over)
    return data


HOSTILE: list[tuple[str, str, str]] = [
    ("trade id 2^63", f.wrap("btcusdt@trade", f.trade_data(INT64_MAX + 1)), "out_of_range"),
    ("trade id 2^64", f.wrap("btcusdt@trade", f.trade_data(2**64)), "out_of_range"),
    ("trade id 10^30", f.wrap("btcusdt@trade", f.trade_data(10**30)), "out_of_range"),
    ("aggTrade id", f.wrap("btcusdt@aggTrade", agg_trade_data(a=INT64_MAX + 1)), "out_of_range"),
    ("aggTrade last", f.wrap("btcusdt@aggTrade", agg_trade_data(l=2**70)), "out_of_range"),
    (
        "aggTrade first > last",
        f.wrap("btcusdt@aggTrade", agg_trade_data(f=13)),
        "inconsistent_values",
    ),
    ("aggTrade negative", f.wrap("btcusdt@aggTrade", agg_trade_data(f=-1)), "negative_value"),
    ("kline count", f.wrap("btcusdt@kline_1m", f.kline_data(n=INT64_MAX + 1)), "out_of_range"),
    ("kline last id", f.wrap("btcusdt@kline_1m", f.kline_data(L=INT64_MAX + 1)), "out_of_range"),
    ("kline first id -2", f.wrap("btcusdt@kline_1m", f.kline_data(f=-2)), "negative_value"),
    ("kline first > last", f.wrap("btcusdt@kline_1m", f.kline_data(f=300)), "inconsistent_values"),
    (
        "kline high < low",
        f.wrap("btcusdt@kline_1m", f.kline_data(h="0.0010")),
        "inconsistent_values",
    ),
    (
        "kline high < open",
        f.wrap("btcusdt@kline_1m", f.kline_data(o="0.0030")),
        "inconsistent_values",
    ),
    (
        "kline high < close",
        f.wrap("btcusdt@kline_1m", f.kline_data(c="0.0026")),
        "inconsistent_values",
    ),
    (
        "kline low > open",
        f.wrap("btcusdt@kline_1m", f.kline_data(o="0.0014")),
        "inconsistent_values",
    ),
    (
        "kline low > close",
        f.wrap("btcusdt@kline_1m", f.kline_data(c="0.00149")),
        "inconsistent_values",
    ),
    ("ticker last id", f.wrap("btcusdt@ticker", f.ticker_data(L=INT64_MAX + 1)), "out_of_range"),
    ("ticker first id -5", f.wrap("btcusdt@ticker", f.ticker_data(F=-5)), "negative_value"),
    (
        "bookTicker update id",
        f.wrap(
            "btcusdt@bookTicker",
            {"u": 2**63, "s": "BTCUSDT", "b": "1", "B": "1", "a": "1", "A": "1"},
        ),
        "out_of_range",
    ),
    ("time beyond int64", f.wrap("btcusdt@trade", f.trade_data(T=2**64)), "absurd_timestamp"),
    ("bare trade event", json.dumps(f.trade_data()), "unknown_frame"),
    ("bare kline event", json.dumps(f.kline_data()), "unknown_frame"),
    ("bare ticker event", json.dumps(f.ticker_data()), "unknown_frame"),
]


@pytest.mark.parametrize(("name", "frame", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_dead_lettered(name: str, frame: str, reason: str) -> None:
    decoder = Decoder(TOPICS)
    out = decode(frame, decoder)
    assert len(out) == 1 and out[0].topic == "raw_dlq", out
    record = json.loads(out[0].value)
    assert record["reason"] == reason, record["detail"]
    assert decoder.rejected_total.get(reason) == 1


def test_largest_int64_id_and_bounds_equal_to_open_and_close_are_accepted() -> None:
    assert one(f.trade(INT64_MAX), "raw_trades")["trade_id"] == INT64_MAX
    flat = f.kline_data(o="1.5", h="1.50", l="1.5", c="1.500")
    one(f.wrap("btcusdt@kline_1m", flat), "raw_klines")
    exact = f.kline_data(o="0.0015", c="0.0025")  # open at the low, close at the high
    one(f.wrap("btcusdt@kline_1m", exact), "raw_klines")


def test_klines_and_tickers_without_trades_keep_their_minus_one_ids() -> None:
    empty = f.kline_data(f=-1, L=-1, n=0, o="1", h="1", l="1", c="1")
    rec = one(f.wrap("btcusdt@kline_1m", empty), "raw_klines")
    assert (rec["first_trade_id"], rec["last_trade_id"]) == (-1, -1)
    rec = one(f.wrap("btcusdt@ticker", f.ticker_data(F=-1, L=-1, n=0)), "raw_tickers")
    assert (rec["first_trade_id"], rec["last_trade_id"]) == (-1, -1)


def test_a_bare_shutdown_notice_is_still_control() -> None:
    decoder = Decoder(TOPICS)
    assert decode('{"e":"serverShutdown","E":1785000000000}', decoder) == []
    assert decoder.control_total.get("server_shutdown") == 1


# -- how far ahead of the local clock a record may be ---------------------------------------------


def decode_at(frame: str, recv_ms: int, **kw: Any) -> list[Outgoing]:
    out: list[Outgoing] = []
    Decoder(TOPICS, **kw).decode(Frame(frame, recv_ms * 1_000_000, 0), out)
    return out


def test_records_up_to_the_skew_bound_are_accepted_and_beyond_it_dead_lettered() -> None:
    now = f.now_ms()
    ahead = f.wrap("btcusdt@ticker", f.ticker_data(E=now + 10_000))
    assert decode_at(ahead, now)[0].topic == "raw_tickers"  # the default: 10 s
    beyond = f.wrap("btcusdt@ticker", f.ticker_data(E=now + 10_001))
    record = json.loads(decode_at(beyond, now)[0].value)
    assert record["reason"] == "absurd_timestamp" and "now+10000ms" in record["detail"]
    tight = f.wrap("btcusdt@trade", f.trade_data(at=now, T=now + 1_500))
    assert decode_at(tight, now, max_future_ms=1_000)[0].topic == "raw_dlq"
    assert decode_at(tight, now, max_future_ms=2_000)[0].topic == "raw_trades"


def test_the_skew_bound_applies_to_microsecond_streams_in_ms() -> None:
    now = f.now_ms()
    frame = f.wrap("btcusdt@trade", f.trade_data(E=(now + 20_000) * 1000, T=now * 1000))
    out = decode_at(frame, now, time_unit="MICROSECOND")
    assert json.loads(out[0].value)["reason"] == "absurd_timestamp"


def test_readme_lists_exactly_the_dlq_reasons() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("DLQ reasons:", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", section))
    assert documented >= {r.value for r in Reason}
    assert {r.value for r in Reason} >= documented - {"result", "id", "stream", "data"}
