"""technical_indicators on real Spark, compared with TA-Lib over the same close series."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import talib

from tests.spark.conftest import Feed, kline, run_once

pytestmark = [pytest.mark.spark, pytest.mark.postgres]

M = 60_000
T0 = 1_767_139_200_000  # 2025-12-31T00:00:00Z
N = 170
FLOOR = 1e-12  # relative error is taken against max(|reference|, FLOOR)


def _series(symbol: str, base: float, decimals: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    price = base
    out = []
    for i in range(N):
        # Stretches of unchanged closes exercise RSI's zero gains and flat Bollinger windows.
        if not 60 <= i < 85 and rnd.random() < 0.8:
            price *= 1 + rnd.gauss(0, 0.004)
        close = f"{price:.{decimals}f}"
        volume = "0" if i == 40 else f"{rnd.uniform(1, 50):.6f}"
        quote = "0" if i == 40 else f"{float(volume) * price:.8f}"
        out.append(kline(symbol, "1m", T0 + i * M, close, volume, quote, True))
    return out


def _reference(closes: list[float]) -> dict[str, np.ndarray]:
    c = np.array(closes, dtype=float)
    ref: dict[str, np.ndarray] = {}
    for p in (7, 25, 99):
        ref[f"sma_{p}"] = talib.SMA(c, timeperiod=p)
        ref[f"ema_{p}"] = talib.EMA(c, timeperiod=p)
    ref["rsi_14"] = talib.RSI(c, timeperiod=14)
    ref["macd"], ref["macd_signal"], ref["macd_hist"] = talib.MACD(c, 12, 26, 9)
    ref["bb_upper"], ref["bb_middle"], ref["bb_lower"] = talib.BBANDS(c, 20, 2.0, 2.0, 0)
    return ref


def test_indicators_match_talib_across_batches_and_restart(
    spark: Any, feed: Feed, tmp_path: Path, postgres_dsn: str
) -> None:
    from marketd_spark.jobs import technical_indicators as job

    rnd = random.Random(3)
    series = {
        "BTCUSDT": _series("BTCUSDT", 42_000.0, 2, 1),
        "SHIBUSDT": _series("SHIBUSDT", 1.2e-5, 8, 2),
    }
    bars = [b for s in series.values() for b in s]

    def chunk(lo: int, hi: int) -> list[Any]:
        part = [b for b in bars if T0 + lo * M <= b["open_time"] < T0 + hi * M]
        opens = [{**b, "is_closed": False, "close": "1.00"} for b in part[::3]]  # ignored updates
        dups = part[::10]  # the same closed bar twice
        out: list[Any] = [*part, *opens, *dups, "{broken"]
        rnd.shuffle(out)
        return out

    feed.add(chunk(0, 40))
    feed.add(chunk(40, 100))
    argv = [
        "--source", "files", "--input", str(feed.dir), "--max-files-per-trigger", "1",
        "--checkpoint", str(tmp_path / "ck"),
        "--sink", "parquet", "--output", str(tmp_path / "out"),
        "--sink", "postgres", "--dsn", postgres_dsn,
    ]  # fmt: skip
    first = run_once(spark, job, argv)
    assert first.stats["bars"] == 200 and first.stats["invalid"] == 2

    # A later --once run with new klines continues the same series from the saved state; a stale
    # copy of an old bar is skipped, not re-applied.
    feed.add([*chunk(100, 135), series["BTCUSDT"][50]])
    feed.add(chunk(135, N))
    second = run_once(spark, job, argv)
    assert second.stats["bars"] == 2 * N and second.stats["skipped"] == 1

    df = spark.read.parquet(str(tmp_path / "out"))
    expected_cols = {"symbol", "interval", "open_time", "close", "vwap", *_reference([1.0]).keys()}
    assert expected_cols <= set(df.columns)
    rows = [r.asDict() for r in df.collect()]
    assert len(rows) == 2 * N
    for symbol, bars_of in series.items():
        closes = [float(b["close"]) for b in bars_of]
        ref = _reference(closes)
        got = sorted((r for r in rows if r["symbol"] == symbol), key=lambda r: r["open_time"])
        assert [r["open_time"] for r in got] == [b["open_time"] for b in bars_of]
        for i, row in enumerate(got):
            assert float(row["close"]) == closes[i]
            for col, values in ref.items():
                want, have = values[i], row[col]
                if math.isnan(want):
                    assert have is None, (symbol, col, i, have)
                else:
                    assert have is not None, (symbol, col, i)
                    assert abs(have - want) / max(abs(want), FLOOR) <= 1e-9, (symbol, col, i)
        assert got[40]["vwap"] is None  # zero volume
        b = bars_of[41]
        assert float(got[41]["vwap"]) == pytest.approx(
            float(b["quote_volume"]) / float(b["volume"])
        )

    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        count, last = conn.execute(
            "SELECT count(*), max(open_time) FROM indicators WHERE symbol = 'BTCUSDT'"
        ).fetchone() or (0, 0)
        values = conn.execute(
            "SELECT \"values\" FROM indicators WHERE symbol = 'BTCUSDT' AND open_time = %s",
            (last,),
        ).fetchone()
    assert count == N
    ref = _reference([float(b["close"]) for b in series["BTCUSDT"]])
    assert values is not None
    assert values[0]["macd_signal"] == pytest.approx(ref["macd_signal"][-1], rel=1e-9)


def test_bar_volumes_beyond_a_trades_digits_are_accepted(spark: Any) -> None:
    # A SHIB day trades ~10^13 units: a valid closed kline, not a rejected one.
    import json
    from decimal import Decimal

    from marketd_spark.jobs.technical_indicators import closed_klines, kline_vwap

    big = kline("SHIBUSDT", "1d", T0, "0.00001234", "12345678901234.5", "152345678.12345678", True)
    dust = kline("SHIBUSDT", "1d", T0 + 86_400_000, "0.00001234", "0.00000001", "1" * 22, True)
    batch = spark.createDataFrame([(json.dumps(big),), (json.dumps(dust),)], ["value"])
    rows = closed_klines(batch).collect()
    assert sorted((r["ok"], r["open_time"]) for r in rows) == [(True, T0), (True, T0 + 86_400_000)]
    vwap = kline_vwap(Decimal(big["quote_volume"]), Decimal(big["volume"]))
    assert vwap == Decimal("0.0000123400000391")
    assert kline_vwap(Decimal(dust["quote_volume"]), Decimal("0.00000001")) is None
