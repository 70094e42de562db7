"""Validation of depth payloads: diff events, REST snapshots, partial books, stream names."""

from __future__ import annotations

from typing import Any

import pytest

from marketd.books import (
    DepthDataError,
    DepthError,
    Level,
    parse_depth_stream,
    parse_diff,
    parse_partial,
    parse_snapshot,
    snapshot_weight,
)

GOOD: dict[str, Any] = {
    "e": "depthUpdate",
    "E": 1_700_000_000_000,
    "s": "BTCUSDT",
    "U": 157,
    "u": 160,
    "b": [["0.0024", "10"]],
    "a": [["0.0026", "100"], ["0.0027", "0.00000000"]],
}


def with_(**changes: Any) -> dict[str, Any]:
    out = dict(GOOD)
    out.update(changes)
    return out


def test_diff_keeps_exact_strings() -> None:
    d = parse_diff(GOOD, symbol="BTCUSDT")
    assert (d.first_update_id, d.last_update_id, d.event_time_ms) == (157, 160, 1_700_000_000_000)
    assert d.bids == (Level("0.0024", "10"),)
    assert d.asks == (Level("0.0026", "100"), Level("0.0027", "0.00000000"))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (with_(b=[["0.0024", "-1"]]), DepthError.BAD_LEVEL),
        (with_(b=[["NaN", "1"]]), DepthError.BAD_LEVEL),
        (with_(b=[["1e3", "1"]]), DepthError.BAD_LEVEL),
        (with_(b=[["0", "1"]]), DepthError.BAD_LEVEL),
        (with_(b=[["0.0", "1"]]), DepthError.BAD_LEVEL),
        (with_(a=[[0.0026, "1"]]), DepthError.BAD_LEVEL),
        (with_(a=[["1", "2", "3"]]), DepthError.BAD_LEVEL),
        (with_(a=[[" 1", "2"]]), DepthError.BAD_LEVEL),
        (with_(a=[["1", ""]]), DepthError.BAD_LEVEL),
        (with_(a={"1": "2"}), DepthError.BAD_FIELD),
        (with_(U=161), DepthError.BAD_ID),
        (with_(u=2**63), DepthError.BAD_ID),
        (with_(U=-1), DepthError.BAD_ID),
        (with_(U="157"), DepthError.BAD_FIELD),
        (with_(U=True), DepthError.BAD_FIELD),
        (with_(E=None), DepthError.BAD_FIELD),
        (with_(e="depth"), DepthError.WRONG_EVENT),
        (with_(s="ETHUSDT"), DepthError.WRONG_SYMBOL),
        ([GOOD], DepthError.BAD_FIELD),
    ],
)
def test_diff_refused(payload: Any, reason: DepthError) -> None:
    with pytest.raises(DepthDataError) as err:
        parse_diff(payload, symbol="BTCUSDT")
    assert err.value.reason is reason


def test_int64_bounds_accepted() -> None:
    d = parse_diff(with_(U=0, u=2**63 - 1))
    assert d.last_update_id == 2**63 - 1


def test_snapshot_and_partial() -> None:
    body = {"lastUpdateId": 1027024, "bids": [["4.00000000", "431.00000000"]], "asks": []}
    s = parse_snapshot(body, symbol="BNBBTC", limit=100)
    assert (s.last_update_id, s.limit, s.bids) == (
        1027024,
        100,
        (Level("4.00000000", "431.00000000"),),
    )
    p = parse_partial(body, symbol="BNBBTC", depth=5)
    assert (p.depth, p.asks) == (5, ())
    with pytest.raises(DepthDataError) as err:
        parse_partial({**body, "bids": [["1", "1"]] * 6}, symbol="BNBBTC", depth=5)
    assert err.value.reason is DepthError.TOO_DEEP
    with pytest.raises(DepthDataError):
        parse_snapshot({**body, "lastUpdateId": "1"}, symbol="BNBBTC", limit=100)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("btcusdt@depth", ("BTCUSDT", None, 1000)),
        ("btcusdt@depth@100ms", ("BTCUSDT", None, 100)),
        ("btcusdt@depth@1000ms", ("BTCUSDT", None, 1000)),
        ("ethusdt@depth5", ("ETHUSDT", 5, 1000)),
        ("ethusdt@depth20@100ms", ("ETHUSDT", 20, 100)),
        ("1000satsusdt@depth10", ("1000SATSUSDT", 10, 1000)),
        ("btcusdt@depth15", None),
        ("BTCUSDT@depth", None),
        ("btcusdt@depth@250ms", None),
        ("btcusdt@trade", None),
    ],
)
def test_stream_names(name: str, expected: tuple[str, int | None, int] | None) -> None:
    s = parse_depth_stream(name)
    if expected is None:
        assert s is None
    else:
        assert s is not None and (s.symbol, s.levels, s.interval_ms) == expected
        assert s.is_diff == (s.levels is None)


@pytest.mark.parametrize(
    ("limit", "weight"),
    [(1, 5), (100, 5), (101, 25), (500, 25), (501, 50), (1000, 50), (1001, 250), (5000, 250)],
)
def test_snapshot_weights(limit: int, weight: int) -> None:
    assert snapshot_weight(limit) == weight


@pytest.mark.parametrize("limit", [0, -1, 5001])
def test_snapshot_weight_out_of_range(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        snapshot_weight(limit)
