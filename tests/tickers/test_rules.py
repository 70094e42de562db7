"""Validation and late-data rules (pure): tables, and properties over arrival orders."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.tickers.rules import (
    HASH_FIELDS,
    Invalid,
    Limits,
    Verdict,
    hash_fields,
    judge,
    parse_ticker,
    plan_batch,
    tracked_symbols,
)
from tests.tickers.records import as_dict, encode, ticker

LIMITS = Limits(watermark_delay_ms=10_000, max_future_ms=5_000)
NOW = 1_700_000_000_000


def raw(**over: Any) -> bytes:
    fields = as_dict(ticker(event_time=NOW))
    fields.update(over)
    return json.dumps(fields).encode()


def without(name: str) -> bytes:
    fields = as_dict(ticker(event_time=NOW))
    del fields[name]
    return json.dumps(fields).encode()


def test_valid_record_parses_to_the_contract_type() -> None:
    record = parse_ticker(encode(ticker(event_time=NOW)))
    assert record == ticker(event_time=NOW)


def test_negative_change_fields_are_valid() -> None:
    record = parse_ticker(raw(price_change="-1.5", price_change_pct="-0.25"))
    assert record.price_change == "-1.5"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty_value"),
        (None, "empty_value"),
        (b"{not json", "bad_json"),
        (b"[1, 2]", "wrong_type"),
        (without("last_price"), "missing_field"),
        (without("event_time"), "missing_field"),
        (raw(last_price=118234.56), "wrong_type"),
        (raw(trades_count="101"), "wrong_type"),
        (raw(event_time="1700000000000"), "wrong_type"),
        (raw(last_price="NaN"), "bad_decimal"),
        (raw(high="Infinity"), "bad_decimal"),
        (raw(low="1e5"), "bad_decimal"),
        (raw(open=" 1.0"), "bad_decimal"),
        (raw(volume=""), "bad_decimal"),
        (raw(last_price="-1.0"), "negative_value"),
        (raw(quote_volume="-0.1"), "negative_value"),
        (raw(price_change="abc"), "bad_decimal"),
        (raw(price_change_pct="--1"), "bad_decimal"),
        (raw(trades_count=-1), "negative_value"),
        (raw(event_time=0), "bad_time"),
        (raw(schema_version=2), "schema_version"),
        (raw(symbol=""), "missing_field"),
    ],
)
def test_contract_violations_have_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_ticker(value)
    assert info.value.reason == reason
    assert info.value.detail


@pytest.mark.parametrize(
    ("event_time", "stored", "verdict"),
    [
        (NOW, None, Verdict.STORE),
        (NOW - 10_000, None, Verdict.STORE),  # exactly at the watermark: still accepted
        (NOW - 10_001, None, Verdict.WATERMARK),
        (NOW + 5_000, None, Verdict.STORE),  # exactly the tolerated skew
        (NOW + 5_001, None, Verdict.FUTURE),
        (NOW - 1, NOW, Verdict.OLDER),
        (NOW, NOW, Verdict.DUPLICATE),
        (NOW + 1, NOW, Verdict.STORE),
        (NOW - 20_000, NOW, Verdict.WATERMARK),  # the watermark is checked first
        (NOW + 9_000, NOW, Verdict.FUTURE),
    ],
)
def test_judge_applies_spec_rules(event_time: int, stored: int | None, verdict: Verdict) -> None:
    assert judge(event_time, NOW, stored, LIMITS) is verdict


def test_plan_keeps_newest_per_symbol_and_counts_the_rest() -> None:
    records = [
        ticker("BTCUSDT", NOW - 3),
        ticker("BTCUSDT", NOW - 1),
        ticker("BTCUSDT", NOW - 2),
        ticker("BTCUSDT", NOW - 1),
        ticker("ETHUSDT", NOW - 50),
        ticker("ETHUSDT", NOW - 100),  # older than stored
        ticker("BNBUSDT", NOW - 60_000),
        ticker("SOLUSDT", NOW + 60_000),
        ticker("XRPUSDT", NOW - 7),  # same as stored
    ]
    plan = plan_batch(records, NOW, {"ETHUSDT": NOW - 60, "XRPUSDT": NOW - 7}, LIMITS)
    assert {s: r.event_time for s, r in plan.writes.items()} == {
        "BTCUSDT": NOW - 1,
        "ETHUSDT": NOW - 50,
    }
    assert plan.skipped == {
        Verdict.SUPERSEDED: 2,
        Verdict.DUPLICATE: 2,
        Verdict.OLDER: 1,
        Verdict.WATERMARK: 1,
        Verdict.FUTURE: 1,
    }
    assert sum(plan.skipped.values()) + len(plan.writes) == len(records)


def test_hash_has_exactly_the_spec_fields() -> None:
    pairs = hash_fields(ticker(event_time=NOW), NOW + 3)
    fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert tuple(fields) == HASH_FIELDS
    assert fields["event_time"] == NOW and fields["updated_at"] == NOW + 3
    assert fields["trades_count"] == 101 and fields["price_change"] == "-12.50000000"


def test_tracked_symbols_are_case_insensitive() -> None:
    assert tracked_symbols(["btcusdt", " EthUsdt ", ""]) == {"BTCUSDT", "ETHUSDT"}


# -- properties ------------------------------------------------------------------------------------

event_times = st.integers(min_value=NOW - 15_000, max_value=NOW + 8_000)


def simulate(arrivals: list[list[tuple[str, int]]]) -> tuple[dict[str, int], list[int]]:
    """Batches through plan_batch plus the store's compare (the Lua script's rule)."""
    redis: dict[str, int] = {}
    known: dict[str, int] = {}
    history: list[int] = []
    for batch in arrivals:
        plan = plan_batch([ticker(s, t) for s, t in batch], NOW, known, LIMITS)
        for symbol, record in plan.writes.items():
            current = redis.get(symbol)
            if current is None or record.event_time > current:
                redis[symbol] = record.event_time
                if symbol == "BTCUSDT":
                    history.append(record.event_time)
            known[symbol] = max(known.get(symbol, 0), redis[symbol])
    return redis, history


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from(["BTCUSDT", "ETHUSDT"]), event_times), max_size=8),
        max_size=12,
    ),
)
def test_older_event_never_overwrites_newer_whatever_the_order(
    arrivals: list[list[tuple[str, int]]],
) -> None:
    redis, history = simulate(arrivals)
    # What is stored only ever moves forward in event time...
    assert history == sorted(set(history))
    # ...and ends at the newest event that passed rules 1 and 3, whatever the arrival order.
    for symbol in ("BTCUSDT", "ETHUSDT"):
        acceptable = [
            t
            for batch in arrivals
            for s, t in batch
            if s == symbol and NOW - 10_000 <= t <= NOW + 5_000
        ]
        assert redis.get(symbol) == (max(acceptable) if acceptable else None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["BTCUSDT", "ETHUSDT"]), event_times), max_size=30))
def test_batching_does_not_change_the_outcome(records: list[tuple[str, int]]) -> None:
    one_by_one, _ = simulate([[r] for r in records])
    all_at_once, _ = simulate([records])
    assert one_by_one == all_at_once


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(value: bytes) -> None:
    reason = None
    try:
        record = parse_ticker(value)
    except Invalid as exc:
        reason = exc.reason
    else:
        assert msgspec.json.decode(value)["symbol"] == record.symbol
    assert reason is None or reason in {
        "empty_value", "bad_json", "wrong_type", "missing_field", "schema_version",
        "bad_decimal", "negative_value", "bad_time",
    }  # fmt: skip
