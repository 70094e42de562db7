"""analyze(): gaps, duplicates, retention, backfill and order, against a set-based reference."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketd.verify import TapeEntry, analyze, render


def tape(*ids: int, symbol: str = "BTCUSDT", backfill: bool = False) -> list[TapeEntry]:
    return [TapeEntry(symbol, i, backfill) for i in ids]


@pytest.mark.parametrize(
    ("ids", "gaps", "duplicates", "out_of_order"),
    [
        ([1, 2, 3], [], 0, 0),
        ([1, 2, 5, 6], [(3, 4)], 0, 0),
        ([1, 2, 2, 3], [], 1, 0),
        ([1, 3, 2, 4], [], 0, 1),
        ([10, 12, 14, 12], [(11, 11), (13, 13)], 1, 0),
        ([5], [], 0, 0),
    ],
)
def test_table(
    ids: list[int], gaps: list[tuple[int, int]], duplicates: int, out_of_order: int
) -> None:
    report = analyze(tape(*ids))
    s = report.symbols["BTCUSDT"]
    assert (s.gaps, s.duplicates, s.out_of_order) == (gaps, duplicates, out_of_order)
    assert (s.first_id, s.last_id, s.records) == (min(ids), max(ids), len(ids))
    assert report.ok == (not gaps and not duplicates)


def test_ids_before_the_first_available_record_are_not_gaps() -> None:
    # Retention removed 1..499: the tape starts at 500.
    report = analyze(tape(*range(500, 600)))
    assert report.ok
    assert report.symbols["BTCUSDT"].first_id == 500


def test_symbols_are_independent_and_backfill_is_counted() -> None:
    entries = tape(1, 2, 3) + tape(7, 9, symbol="ETHUSDT") + tape(4, 5, backfill=True)
    report = analyze(entries)
    assert report.symbols["BTCUSDT"].ok
    assert report.symbols["BTCUSDT"].backfilled == 2
    assert report.symbols["ETHUSDT"].gaps == [(8, 8)]
    assert not report.ok
    assert report.records == 7


def test_text_report_names_the_defects() -> None:
    report = analyze(tape(1, 2, 2, 5), topic="raw_trades")
    out = io.StringIO()
    render(report, out)
    text = out.getvalue()
    assert "gap 3..4 (2 ids)" in text
    assert "duplicate ids 2" in text
    assert text.splitlines()[-1] == "FAIL: 1 symbols, 1 gaps, 1 duplicates"


def test_json_report() -> None:
    doc = analyze(tape(1, 3, 3), topic="t").to_json()
    assert doc["ok"] is False
    sym = doc["symbols"]["BTCUSDT"]
    assert (sym["gaps"], sym["missing"], sym["duplicates"]) == ([[2, 2]], 1, 1)


@given(st.lists(st.integers(0, 200), max_size=300))
def test_matches_a_set_based_reference(ids: list[int]) -> None:
    report = analyze(tape(*ids))
    if not ids:
        assert report.symbols == {}
        return
    s = report.symbols["BTCUSDT"]
    seen = set(ids)
    missing = [i for i in range(min(ids), max(ids) + 1) if i not in seen]
    assert [i for a, b in s.gaps for i in range(a, b + 1)] == missing
    assert s.duplicates == len(ids) - len(seen)
    assert s.records == len(ids)
