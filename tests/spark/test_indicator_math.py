"""The incremental indicator state machine against TA-Lib itself (no Spark)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.spark.conftest import SPARK_DIR  # noqa: F401  (puts spark/ on sys.path)

from marketd_spark.indicators import IndicatorSpec, Series, fma  # isort: skip

FLOOR = 1e-12


def _talib(closes: list[float]) -> dict[str, np.ndarray]:
    c = np.array(closes, dtype=float)
    out: dict[str, np.ndarray] = {}
    for p in (7, 25, 99):
        out[f"sma_{p}"] = talib.SMA(c, p)
        out[f"ema_{p}"] = talib.EMA(c, p)
    out["rsi_14"] = talib.RSI(c, 14)
    out["macd"], out["macd_signal"], out["macd_hist"] = talib.MACD(c, 12, 26, 9)
    out["bb_upper"], out["bb_middle"], out["bb_lower"] = talib.BBANDS(c, 20, 2.0, 2.0, 0)
    return out


def _check(closes: list[float], restart_at: int | None = None) -> None:
    spec = IndicatorSpec()
    s = Series(spec)
    got = []
    for i, x in enumerate(closes):
        if i == restart_at:
            s = Series.from_json(spec, json.loads(json.dumps(s.to_json())))
        got.append(s.push(x))
    for col, ref in _talib(closes).items():
        for i, want in enumerate(ref):
            have = got[i][col]
            if math.isnan(want):
                assert have is None, (col, i)
            else:
                assert have is not None, (col, i)
                assert abs(have - want) / max(abs(want), FLOOR) <= 1e-9, (col, i, have, want)


@settings(max_examples=60, deadline=None)
@given(
    base=st.sampled_from([42_000.0, 3_000.0, 1.0, 1.234e-5]),
    steps=st.lists(st.integers(-30, 30), min_size=1, max_size=260),
    restart=st.integers(0, 260),
)
def test_series_equals_talib_for_any_path(base: float, steps: list[int], restart: int) -> None:
    closes, price = [], base
    for s in steps:
        price = price * (1 + s / 2000)  # steps of 0 give flat stretches
        closes.append(price)
    _check(closes, restart % len(closes))


def test_macd_outputs_start_at_index_33_and_flat_series_give_zero_rsi_and_bands() -> None:
    s = Series(IndicatorSpec())
    rows = [s.push(5.0) for _ in range(40)]
    assert rows[32]["macd"] is None and rows[33]["macd"] == 0.0
    assert rows[13]["rsi_14"] is None and rows[14]["rsi_14"] == 0.0
    assert rows[19]["bb_upper"] == rows[19]["bb_lower"] == 5.0


def test_state_from_other_periods_is_refused() -> None:
    data = Series(IndicatorSpec()).to_json()
    with pytest.raises(ValueError, match="fresh --checkpoint"):
        Series.from_json(IndicatorSpec(sma=(5,)), data)


def test_configured_periods_name_the_columns() -> None:
    spec = IndicatorSpec(sma=(5, 10), ema=(3,), rsi=9)
    assert spec.columns[:4] == ("sma_5", "sma_10", "ema_3", "rsi_9")
    with pytest.raises(ValueError, match="MACD periods"):
        IndicatorSpec(macd=(26, 12, 9))


def test_configured_periods_equal_talib_where_macd_nears_zero() -> None:
    # EMA(35) steps rounded twice (multiply, then add) drift one ulp from TA-Lib's FMA build on
    # many bars; MACD(12,35,9) turned that into a 2.6e-9 relative error at bar 66 of this series.
    rnd = random.Random(6)
    closes, price = [], 42_000.0
    for _ in range(170):
        if rnd.random() < 0.8:
            price *= 1 + rnd.gauss(0, 0.004)
        closes.append(round(price, 2))
    spec = IndicatorSpec(sma=(3,), ema=(35, 99), rsi=6, macd=(12, 35, 9), bb_period=10)
    s = Series(spec)
    got = [s.push(x) for x in closes]
    c = np.array(closes, dtype=float)
    ref = {"ema_35": talib.EMA(c, 35), "ema_99": talib.EMA(c, 99)}
    ref["macd"], ref["macd_signal"], ref["macd_hist"] = talib.MACD(c, 12, 35, 9)
    for col, values in ref.items():
        for i, want in enumerate(values):
            have = got[i][col]
            if math.isnan(want):
                assert have is None, (col, i)
            else:
                assert have is not None, (col, i)
                assert abs(have - want) / max(abs(want), FLOOR) <= 1e-9, (col, i, have, want)


def test_fma_rounds_once() -> None:
    # 0.1 * 10 is exactly 1 + 2^-54 before rounding: a separate multiply rounds it away.
    assert fma(0.1, 10.0, -1.0) == 2.0**-54
    assert (0.1 * 10.0) - 1.0 == 0.0
