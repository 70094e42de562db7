"""Gap repair (marketd/ingest/repair.py): outcomes, reasons and their wire values, paging."""

from __future__ import annotations

import msgspec
import pytest

from marketd.ingest.repair import (
    GapKind,
    GapReason,
    KlinePaging,
    LostRange,
    RequestBackfill,
    RequestKlines,
    TradePaging,
    missing_trades_reason,
    outcome,
    request_kind,
)
from marketd.records import SCHEMA_VERSION, GapRecord

TRADES = RequestBackfill("BTCUSDT", 10, 19, GapKind.TRADES, GapReason.RECONNECT)
KLINES = RequestKlines("btcusdt@kline_1m", "BTCUSDT", "1m", 0, 59_999, GapReason.RECONNECT)


@pytest.mark.parametrize(
    ("request_", "lost", "expected"),
    [
        (TRADES, [], "repaired"),
        (TRADES, [LostRange(10, 14, GapReason.HISTORY_TOO_OLD)], "partial"),
        (TRADES, [LostRange(10, 19, GapReason.REST_UNAVAILABLE)], "failed"),
        (
            TRADES,
            [LostRange(10, 14, GapReason.HISTORY_TOO_OLD), LostRange(15, 19, "not_on_rest")],
            "failed",
        ),
        (KLINES, [LostRange(0, 59_999, GapReason.NOT_ON_REST)], "failed"),
        (KLINES, [LostRange(0, 0, GapReason.NOT_ON_REST)], "partial"),
    ],
)
def test_outcome_of_a_finished_request(
    request_: RequestBackfill | RequestKlines, lost: list[LostRange], expected: str
) -> None:
    assert outcome(request_, lost) == expected


def test_ids_missing_at_the_start_are_too_old_further_in_not_on_rest() -> None:
    assert missing_trades_reason(10, from_id=10) is GapReason.HISTORY_TOO_OLD
    assert missing_trades_reason(11, from_id=10) is GapReason.NOT_ON_REST


def test_request_kind_labels() -> None:
    assert request_kind(TRADES) == "trades"
    assert request_kind(RequestBackfill("X", 1, 2, GapKind.AGG_TRADES, "id_jump")) == "agg_trades"
    assert request_kind(KLINES) == "klines"


def test_reasons_and_kinds_are_written_as_their_plain_values() -> None:
    """Enums inside: the gap records, metrics labels and logs carry the same strings as before."""
    gap = GapRecord(
        symbol="BTCUSDT",
        stream="btcusdt@trade",
        kind=GapKind.TRADES,
        from_id=1,
        to_id=2,
        from_time=None,
        to_time=None,
        reason=GapReason.ID_JUMP,
        repaired=False,
        detected_at=0,
        schema_version=SCHEMA_VERSION,
    )
    value = msgspec.json.decode(msgspec.json.encode(gap))
    assert (value["kind"], value["reason"]) == ("trades", "id_jump")
    assert f"{GapReason.HOLD_OVERFLOW}" == str(GapReason.HOLD_OVERFLOW) == "hold_overflow"
    assert GapReason.SHUTDOWN == "shutdown"


# -- paging ----------------------------------------------------------------------------------------

MIN = 60_000


def test_trade_paging_asks_for_the_rest_of_the_range_a_page_at_a_time() -> None:
    paging = TradePaging.start(RequestBackfill("X", 100, 2_599, GapKind.TRADES, "reconnect"))
    assert paging.limit(1000) == 1000
    assert paging.on_page(100, 1_099) == 2_599
    assert (paging.cursor, paging.limit(1000)) == (1_100, 1000)
    assert paging.on_page(1_100, 2_099) == 2_599
    assert paging.limit(1000) == 500
    assert paging.on_page(2_100, 3_099) == 2_599  # the answer runs past the range: cut there
    assert paging.limit(1000) is None
    assert paging.lost == []


def test_trade_paging_ids_rest_no_longer_has_are_too_old_ids_it_skipped_are_not_on_rest() -> None:
    paging = TradePaging.start(RequestBackfill("X", 100, 999, GapKind.TRADES, "reconnect"))
    assert paging.on_page(150, 499) == 999  # oldest it keeps: 150
    assert paging.on_page(510, 999) == 999  # 500..509 skipped by Binance
    assert paging.limit(1000) is None
    assert paging.lost == [
        LostRange(100, 149, GapReason.HISTORY_TOO_OLD),
        LostRange(500, 509, GapReason.NOT_ON_REST),
    ]


def test_trade_paging_an_answer_past_the_range_ends_it() -> None:
    paging = TradePaging.start(RequestBackfill("X", 100, 199, GapKind.TRADES, "reconnect"))
    assert paging.on_page(500, 600) is None
    assert paging.limit(1000) is None
    assert paging.lost == [LostRange(100, 199, GapReason.HISTORY_TOO_OLD)]


def test_trade_paging_giving_up_loses_the_rest_for_that_reason() -> None:
    paging = TradePaging.start(RequestBackfill("X", 100, 2_000, GapKind.TRADES, "id_jump"))
    paging.on_page(100, 1_099)
    paging.give_up(GapReason.REST_UNAVAILABLE)
    assert paging.limit(1000) is None
    assert paging.lost == [LostRange(1_100, 2_000, GapReason.REST_UNAVAILABLE)]


def _klines(start_ms: int, end_ms: int, interval: str = "1m") -> KlinePaging:
    return KlinePaging.start(
        RequestKlines(f"x@kline_{interval}", "X", interval, start_ms, end_ms, "reconnect")
    )


def test_kline_paging_takes_closed_klines_inside_the_range_and_measures_holes() -> None:
    paging = _klines(0, 10 * MIN - 1)
    now_ms = 5 * MIN
    assert paging.wanted(0, MIN - 1, now_ms)
    assert not paging.wanted(4 * MIN, 5 * MIN - 1 + 1, now_ms)  # still open by the wall clock
    assert not paging.wanted(10 * MIN, 11 * MIN - 1, 20 * MIN)  # past the range
    assert paging.on_page([0, MIN, 4 * MIN])  # 2 and 3 missing
    assert paging.cursor == 4 * MIN + 1
    assert not paging.wanted(4 * MIN, 5 * MIN - 1, 20 * MIN)  # already taken
    assert not paging.on_page([])  # nothing more: the range ends here
    assert paging.done
    assert paging.lost == [LostRange(2 * MIN, 3 * MIN, GapReason.NOT_ON_REST)]


def test_kline_paging_nothing_at_all_for_a_whole_interval_is_lost() -> None:
    paging = _klines(0, MIN - 1)
    assert not paging.on_page([])
    assert paging.lost == [LostRange(0, MIN - 1, GapReason.NOT_ON_REST)]
    shorter = _klines(0, MIN - 2)  # less than one interval: no kline can have been missed
    assert not shorter.on_page([])
    assert shorter.lost == []


def test_kline_paging_months_have_no_measurable_holes() -> None:
    paging = _klines(0, 400 * 24 * 60 * MIN, "1M")
    assert paging.on_page([0, 90 * 24 * 60 * MIN])
    assert paging.lost == []


def test_kline_paging_giving_up_loses_the_rest() -> None:
    paging = _klines(0, 10 * MIN - 1)
    paging.on_page([0, MIN])
    paging.give_up(GapReason.RATE_LIMITED)
    assert paging.done
    assert paging.lost == [LostRange(MIN + 1, 10 * MIN - 1, GapReason.RATE_LIMITED)]
