"""Data-quality checks of the trade-aggregation output (Parquet bars), as plain functions.

`load_bars(root, since_ms)` reads the job's Parquet dataset (partitioned by date and symbol) into
row dicts; `check_bars(rows, ...)` returns a list of `Finding`s: missing windows per symbol and
interval, duplicate windows, OHLC inconsistencies, negative volumes, malformed windows and stale
output. No Airflow and no marketd imports: the DAG calls these, the tests feed them fixtures.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
COLUMNS = (
    "symbol",
    "interval",
    "window_start",
    "window_end",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades_count",
    "taker_buy_volume",
    "taker_sell_volume",
)
NON_NEGATIVE = ("volume", "quote_volume", "taker_buy_volume", "taker_sell_volume", "trades_count")
SAMPLE = 5  # offending windows quoted per finding


@dataclass(frozen=True)
class Finding:
    check: str  # completeness, duplicates, ohlc, volume, window, freshness, schema
    symbol: str
    interval: str
    count: int
    detail: str

    def __str__(self) -> str:
        where = f"{self.symbol} {self.interval}".strip() or "dataset"
        return f"[{self.check}] {where}: {self.detail}"


def interval_ms(label: str) -> int | None:
    """Window length of an interval label as the job writes it (1m, 5m, 15m, 1h, ...)."""
    m = re.fullmatch(r"([1-9][0-9]{0,2})([smhd])", label)
    return int(m.group(1)) * _UNIT_MS[m.group(2)] if m else None


def load_bars(root: str | Path, since_ms: int) -> list[dict[str, Any]]:
    """Rows with window_start >= since_ms from the Parquet dataset under `root`.

    The symbol (and date) columns come back from the hive-style directory names.
    """
    import pyarrow.dataset as ds

    path = Path(root)
    if not path.exists():
        return []
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    missing = [c for c in COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{path}: not a trade-aggregation dataset, missing columns {missing}")
    table = dataset.to_table(columns=list(COLUMNS), filter=ds.field("window_start") >= since_ms)
    return [{**row, "symbol": str(row["symbol"])} for row in table.to_pylist()]


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _windows(starts: Iterable[int]) -> str:
    shown = sorted(starts)[:SAMPLE]
    return ", ".join(str(s) for s in shown)


def check_bars(
    rows: Sequence[Mapping[str, Any]],
    *,
    symbols: Sequence[str],
    intervals: Sequence[str],
    since_ms: int,
    now_ms: int,
    max_age_s: float,
    min_completeness: float = 1.0,
) -> list[Finding]:
    """Every problem found in `rows` (closed bars of [since_ms, now_ms)), worst first per check.

    Completeness counts the windows that closed within the range: a quiet symbol may legitimately
    lack a window (no trades), hence `min_completeness` below 1 for illiquid symbols.
    """
    findings: list[Finding] = []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row["symbol"]), str(row["interval"]))].append(row)

    for (symbol, interval), bars in sorted(groups.items()):
        if interval_ms(interval) is None:
            findings.append(
                Finding("window", symbol, interval, len(bars), f"unknown interval {interval!r}")
            )
            continue
        findings += _row_checks(symbol, interval, bars)

    for symbol in symbols:
        for interval in intervals:
            bars = groups.get((symbol, interval), [])
            findings += _coverage(
                symbol, interval, bars, since_ms, now_ms, max_age_s, min_completeness
            )
    return findings


def _row_checks(symbol: str, interval: str, bars: Sequence[Mapping[str, Any]]) -> list[Finding]:
    out: list[Finding] = []
    length = interval_ms(interval) or 0
    counts = Counter(int(b["window_start"]) for b in bars)
    dupes = {start: n for start, n in counts.items() if n > 1}
    if dupes:
        out.append(
            Finding(
                "duplicates",
                symbol,
                interval,
                sum(n - 1 for n in dupes.values()),
                f"{len(dupes)} windows written more than once (window_start {_windows(dupes)})",
            )
        )
    bad_window = [
        int(b["window_start"])
        for b in bars
        if int(b["window_end"]) - int(b["window_start"]) != length
        or int(b["window_start"]) % length != 0
    ]
    if bad_window:
        out.append(
            Finding(
                "window",
                symbol,
                interval,
                len(bad_window),
                f"window_end - window_start is not {length} ms or the start is not aligned "
                f"(window_start {_windows(bad_window)})",
            )
        )
    bad_ohlc = []
    for b in bars:
        prices = [_decimal(b[k]) for k in ("open", "high", "low", "close")]
        match prices:
            case [Decimal() as o, Decimal() as h, Decimal() as low, Decimal() as c] if (
                0 < low <= o <= h and low <= c <= h
            ):
                continue
        bad_ohlc.append(int(b["window_start"]))
    if bad_ohlc:
        out.append(
            Finding(
                "ohlc",
                symbol,
                interval,
                len(bad_ohlc),
                f"low <= open, close <= high violated, non-positive or missing prices "
                f"(window_start {_windows(bad_ohlc)})",
            )
        )
    negative = []
    for b in bars:
        values = [_decimal(b[k]) for k in NON_NEGATIVE]
        if any(v is None or v < 0 for v in values):
            negative.append(int(b["window_start"]))
    if negative:
        out.append(
            Finding(
                "volume",
                symbol,
                interval,
                len(negative),
                f"negative or missing {'/'.join(NON_NEGATIVE)} (window_start {_windows(negative)})",
            )
        )
    return out


def _coverage(
    symbol: str,
    interval: str,
    bars: Sequence[Mapping[str, Any]],
    since_ms: int,
    now_ms: int,
    max_age_s: float,
    min_completeness: float,
) -> list[Finding]:
    length = interval_ms(interval)
    if length is None:
        return []  # reported as a malformed window by the row checks
    first = -(-since_ms // length) * length  # first window starting in the range
    # Windows whose end has passed: the job cannot have written the current one yet.
    expected = set(range(first, now_ms - length + 1, length))
    if not bars:
        if expected:
            return [
                Finding(
                    "completeness",
                    symbol,
                    interval,
                    len(expected),
                    f"no bars at all since {since_ms} ({len(expected)} windows expected)",
                )
            ]
        return []
    out: list[Finding] = []
    present = {int(b["window_start"]) for b in bars}
    missing = expected - present
    if expected and 1 - len(missing) / len(expected) < min_completeness:
        out.append(
            Finding(
                "completeness",
                symbol,
                interval,
                len(missing),
                f"{len(missing)} of {len(expected)} windows missing "
                f"({1 - len(missing) / len(expected):.1%} complete, minimum "
                f"{min_completeness:.1%}; window_start {_windows(missing)})",
            )
        )
    newest_end = max(int(b["window_end"]) for b in bars)
    age_s = (now_ms - newest_end) / 1000
    if age_s > max_age_s:
        out.append(
            Finding(
                "freshness",
                symbol,
                interval,
                1,
                f"newest window ended {age_s:.0f} s ago (maximum {max_age_s:g} s)",
            )
        )
    return out


def summarize(findings: Sequence[Finding], *, rows: int, root: str) -> str:
    """The readable task-failure message."""
    if not findings:
        return f"data quality OK: {rows} bars checked under {root}"
    by_check = Counter(f.check for f in findings)
    head = ", ".join(f"{check} {n}" for check, n in sorted(by_check.items()))
    lines = [f"data quality FAILED under {root}: {len(findings)} findings ({head}), {rows} bars"]
    lines += [f"  {f}" for f in findings]
    return "\n".join(lines)
