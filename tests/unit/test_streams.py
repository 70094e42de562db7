from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketd.errors import StreamNameError
from marketd.ingest.streams import (
    KLINE_INTERVALS,
    Shard,
    StreamKind,
    parse_stream,
    parse_streams,
    shard_streams,
    split_connections,
)


@pytest.mark.parametrize(
    ("name", "kind", "symbol"),
    [
        ("btcusdt@trade", StreamKind.TRADE, "BTCUSDT"),
        ("btcusdt@aggTrade", StreamKind.AGG_TRADE, "BTCUSDT"),
        ("btcusdt@ticker", StreamKind.TICKER, "BTCUSDT"),
        ("btcusdt@miniTicker", StreamKind.MINI_TICKER, "BTCUSDT"),
        ("btcusdt@bookTicker", StreamKind.BOOK_TICKER, "BTCUSDT"),
        ("btcusdt@ticker_4h", StreamKind.ROLLING_TICKER, "BTCUSDT"),
        ("1000satsusdt@trade", StreamKind.TRADE, "1000SATSUSDT"),
        ("币安人生usdt@trade", StreamKind.TRADE, "币安人生USDT"),
        ("!miniTicker@arr", StreamKind.MINI_TICKER, None),
        ("!ticker_1d@arr", StreamKind.ROLLING_TICKER, None),
    ],
)
def test_valid_streams(name: str, kind: StreamKind, symbol: str | None) -> None:
    spec = parse_stream(name)
    assert (spec.kind, spec.symbol) == (kind, symbol)


@pytest.mark.parametrize("interval", KLINE_INTERVALS)
def test_all_sixteen_kline_intervals_and_timezone_variant(interval: str) -> None:
    assert parse_stream(f"ethusdt@kline_{interval}").interval == interval
    assert parse_stream(f"ethusdt@kline_{interval}@+08:00").timezone == "+08:00"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("btcusdt@kline_7m", "unknown kline interval"),
        ("btcusdt@kline_1H", "unknown kline interval"),
        ("BTCUSDT@trade", "lower-case"),
        ("btcusdt@depth15", "@depth5, @depth10 or @depth20"),
        ("btcusdt@depth@250ms", "only depth speed suffix is @100ms"),
        ("btcusdt@depth20@100ms@x", "only depth speed suffix is @100ms"),
        ("!ticker@arr", "retired"),
        ("btcusdt", "expected <symbol>@<kind>"),
        ("btcusdt@trades", "unknown stream kind"),
        ("btcusdt@kline_1m@+09:00", "only kline timezone suffix"),
        ("btc usdt@trade", "bad symbol"),
        ("", "empty"),
    ],
)
def test_invalid_streams_say_why(name: str, why: str) -> None:
    with pytest.raises(StreamNameError, match=why):
        parse_stream(name)


@pytest.mark.parametrize(
    ("name", "kind", "depth", "update_ms"),
    [
        ("btcusdt@depth", StreamKind.DEPTH, None, 1000),
        ("btcusdt@depth@100ms", StreamKind.DEPTH, None, 100),
        ("ethusdt@depth5", StreamKind.DEPTH_PARTIAL, 5, 1000),
        ("ethusdt@depth10@100ms", StreamKind.DEPTH_PARTIAL, 10, 100),
        ("1000satsusdt@depth20", StreamKind.DEPTH_PARTIAL, 20, 1000),
    ],
)
def test_depth_streams(name: str, kind: StreamKind, depth: int | None, update_ms: int) -> None:
    spec = parse_stream(name)
    assert (spec.kind, spec.depth, spec.update_ms) == (kind, depth, update_ms)
    assert spec.symbol == name.split("@", maxsplit=1)[0].upper()


def test_depth_kinds_have_their_own_topics_not_routes() -> None:
    from marketd.streams import ROUTED_KINDS

    assert StreamKind.DEPTH not in ROUTED_KINDS and StreamKind.DEPTH_PARTIAL not in ROUTED_KINDS


def test_duplicate_streams_rejected() -> None:
    with pytest.raises(StreamNameError, match="twice"):
        parse_streams(["btcusdt@trade", "btcusdt@trade"])


def test_connections_hold_at_most_1024_streams() -> None:
    specs = parse_streams([f"s{i}usdt@trade" for i in range(2500)])
    chunks = split_connections(specs)
    assert [len(c) for c in chunks] == [1024, 1024, 452]


@given(
    st.integers(min_value=1, max_value=8),
    st.lists(st.text("abcdefgh0123", min_size=2, max_size=8), unique=True, min_size=1, max_size=60),
)
def test_shards_are_disjoint_complete_and_stable(count: int, symbols: list[str]) -> None:
    specs = parse_streams([f"{s}@trade" for s in symbols])
    parts = [shard_streams(specs, Shard(i, count)) for i in range(1, count + 1)]
    names = [s.name for part in parts for s in part]
    assert sorted(names) == sorted(s.name for s in specs)
    assert len(names) == len(set(names))
    # Stable: the same answer every time (no salted hash()).
    assert parts == [shard_streams(specs, Shard(i, count)) for i in range(1, count + 1)]


@pytest.mark.parametrize("text", ["0/4", "5/4", "a/b", "2"])
def test_bad_shard(text: str) -> None:
    with pytest.raises(ValueError, match="K"):
        Shard.parse(text)
