"""Gap repair's vocabulary (marketd/ingest/repair.py): outcomes, reasons, and their wire values."""

from __future__ import annotations

import msgspec
import pytest

from marketd.ingest.repair import (
    GapKind,
    GapReason,
    LostRange,
    RequestBackfill,
    RequestKlines,
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
