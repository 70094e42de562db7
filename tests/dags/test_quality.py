"""Data-quality checks of the trade-aggregation bars: row fixtures and a real Parquet dataset."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from marketd_ops.quality import check_bars, interval_ms, load_bars, summarize

MIN = 60_000
T0 = 1_700_000_040_000 - (1_700_000_040_000 % (15 * MIN))  # aligned to every interval


def bar(symbol: str, interval: str, start: int, **over: Any) -> dict[str, Any]:
    length = interval_ms(interval)
    assert length is not None
    row = {
        "symbol": symbol,
        "interval": interval,
        "window_start": start,
        "window_end": start + length,
        "open": Decimal("100.5"),
        "high": Decimal("101.0"),
        "low": Decimal("99.0"),
        "close": Decimal("100.0"),
        "volume": Decimal("12.5"),
        "quote_volume": Decimal("1250.0"),
        "vwap": Decimal("100.2"),
        "trades_count": 42,
        "taker_buy_volume": Decimal("6.0"),
        "taker_sell_volume": Decimal("6.5"),
    }
    row.update(over)
    return row


def series(symbol: str, interval: str, start: int, n: int) -> list[dict[str, Any]]:
    length = interval_ms(interval)
    assert length is not None
    return [bar(symbol, interval, start + i * length) for i in range(n)]


def run(rows: list[dict[str, Any]], **kw: Any) -> list[Any]:
    args: dict[str, Any] = {
        "symbols": ["BTCUSDT"],
        "intervals": ["1m"],
        "since_ms": T0,
        "now_ms": T0 + 30 * MIN,
        "max_age_s": 180,
    }
    args.update(kw)
    return check_bars(rows, **args)


def test_interval_labels() -> None:
    assert [interval_ms(s) for s in ("1m", "5m", "15m", "1h", "1d")] == [
        60_000,
        300_000,
        900_000,
        3_600_000,
        86_400_000,
    ]
    assert interval_ms("0m") is None and interval_ms("1w") is None


def test_unknown_interval_is_a_finding() -> None:
    rows = [*series("BTCUSDT", "1m", T0, 30), {**bar("BTCUSDT", "1m", T0), "interval": "7x"}]
    assert [(f.check, f.interval) for f in run(rows)] == [("window", "7x")]


def test_clean_series_has_no_findings() -> None:
    rows = series("BTCUSDT", "1m", T0, 30) + series("BTCUSDT", "5m", T0, 6)
    assert run(rows, intervals=["1m", "5m"]) == []


def test_missing_windows_are_reported_with_their_starts() -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    del rows[10:13]
    [finding] = run(rows)
    assert (finding.check, finding.symbol, finding.interval, finding.count) == (
        "completeness",
        "BTCUSDT",
        "1m",
        3,
    )
    assert "3 of 30 windows missing (90.0% complete" in finding.detail
    assert str(T0 + 10 * MIN) in finding.detail
    # A tolerance for illiquid symbols.
    assert run(rows, min_completeness=0.9) == []


def test_symbol_without_any_bar_is_incomplete() -> None:
    [finding] = run(series("BTCUSDT", "1m", T0, 30), symbols=["BTCUSDT", "ETHUSDT"])
    assert (finding.check, finding.symbol, finding.count) == ("completeness", "ETHUSDT", 30)


def test_duplicates_are_counted() -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    rows += [bar("BTCUSDT", "1m", T0 + 5 * MIN), bar("BTCUSDT", "1m", T0 + 5 * MIN)]
    [finding] = run(rows)
    assert (finding.check, finding.count) == ("duplicates", 2)
    assert "1 windows written more than once" in finding.detail


@pytest.mark.parametrize(
    "over",
    [
        {"high": Decimal("100.0")},  # open above high
        {"low": Decimal("100.8")},  # open below low
        {"close": Decimal("101.5")},  # close above high
        {"low": Decimal("0"), "open": Decimal("0.5"), "close": Decimal("0.5")},  # zero price
        {"open": None},
        {"high": "NaN"},
    ],
)
def test_ohlc_inconsistency(over: dict[str, Any]) -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    rows[7] = bar("BTCUSDT", "1m", T0 + 7 * MIN, **over)
    [finding] = run(rows)
    assert (finding.check, finding.count) == ("ohlc", 1)
    assert str(T0 + 7 * MIN) in finding.detail


@pytest.mark.parametrize(
    "field", ["volume", "quote_volume", "taker_buy_volume", "taker_sell_volume", "trades_count"]
)
def test_negative_volume(field: str) -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    rows[3] = bar("BTCUSDT", "1m", T0 + 3 * MIN, **{field: -1})
    [finding] = run(rows)
    assert (finding.check, finding.count) == ("volume", 1)


def test_malformed_windows() -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    rows[4] = bar("BTCUSDT", "1m", T0 + 4 * MIN, window_end=T0 + 6 * MIN)
    rows[5] = bar("BTCUSDT", "1m", T0 + 5 * MIN + 1)  # not aligned: window T0+5m is missing too
    findings = run(rows)
    assert [(f.check, f.count) for f in findings] == [("window", 2), ("completeness", 1)]


def test_stale_output_is_reported() -> None:
    rows = series("BTCUSDT", "1m", T0, 20)  # the last window ended 10 minutes before now
    findings = run(rows, min_completeness=0.5)
    assert [f.check for f in findings] == ["freshness"]
    assert "newest window ended 600 s ago (maximum 180 s)" in findings[0].detail


def test_summary_is_readable() -> None:
    rows = series("BTCUSDT", "1m", T0, 30)
    rows[7] = bar("BTCUSDT", "1m", T0 + 7 * MIN, volume=-3)
    findings = run(rows)
    text = summarize(findings, rows=len(rows), root="/data/agg")
    assert text.splitlines()[0] == (
        "data quality FAILED under /data/agg: 1 findings (volume 1), 30 bars"
    )
    assert "[volume] BTCUSDT 1m: negative or missing" in text
    assert (
        summarize([], rows=30, root="/data/agg")
        == "data quality OK: 30 bars checked under /data/agg"
    )


def _write_dataset(root: Path, rows: list[dict[str, Any]]) -> None:
    """Like the Spark job: Parquet partitioned by date and symbol, decimals as decimal128."""
    dec = pa.decimal128(38, 18)
    schema = pa.schema(
        [
            ("interval", pa.string()),
            ("window_start", pa.int64()),
            ("window_end", pa.int64()),
            ("open", dec),
            ("high", dec),
            ("low", dec),
            ("close", dec),
            ("volume", dec),
            ("quote_volume", dec),
            ("vwap", dec),
            ("trades_count", pa.int64()),
            ("taker_buy_volume", dec),
            ("taker_sell_volume", dec),
            ("date", pa.string()),
            ("symbol", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([{**r, "date": "2023-11-14"} for r in rows], schema=schema)
    pq.write_to_dataset(table, root, partition_cols=["date", "symbol"])


def test_load_bars_reads_the_partitioned_dataset(tmp_path: Path) -> None:
    rows = series("BTCUSDT", "1m", T0, 30) + series("ETHUSDT", "1m", T0, 30)
    rows[40] = bar("ETHUSDT", "1m", T0 + 10 * MIN, low=Decimal("150"))
    _write_dataset(tmp_path, rows)
    assert list((tmp_path / "date=2023-11-14").iterdir())
    loaded = load_bars(tmp_path, since_ms=T0 + 5 * MIN)
    assert len(loaded) == 50
    assert {r["symbol"] for r in loaded} == {"BTCUSDT", "ETHUSDT"}
    assert isinstance(loaded[0]["open"], Decimal)
    findings = run(
        loaded, symbols=["BTCUSDT", "ETHUSDT"], since_ms=T0 + 5 * MIN, now_ms=T0 + 30 * MIN
    )
    assert [(f.check, f.symbol) for f in findings] == [("ohlc", "ETHUSDT")]


def test_load_bars_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert load_bars(tmp_path / "nothing-yet", since_ms=0) == []


def test_load_bars_rejects_a_foreign_dataset(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "part.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        load_bars(tmp_path, since_ms=0)
