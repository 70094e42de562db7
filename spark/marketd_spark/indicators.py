"""Technical indicators over one close series, computed incrementally the way TA-Lib computes them.

`Series.push(close)` takes the next closed kline's close (a float) and returns that bar's SMA, EMA,
RSI, MACD and Bollinger values, or None where TA-Lib has no output yet. The state (`to_json` /
`from_json`) holds only running sums, last EMA values, Wilder averages and a ring buffer of the last
max(period) closes, so a restarted job continues a series without recomputing it from the start.
Pure Python: no Spark, no numpy; the tests compare it with TA-Lib itself.

Why mirror TA-Lib's arithmetic rather than just its formulas: SMA and the Bollinger variance use
running sums (`total += new; out = total / n; total -= oldest`) and EMA/RSI/MACD have their own
seeding and operation order; doing the same floating-point operations in the same order keeps us
within rounding of TA-Lib on long series, at high prices and at SHIB-sized ones (1e-5). TA-Lib
>= 0.6 (measured with the 0.8 wheel) answers 0 only for an exactly-zero RSI denominator and a flat
Bollinger window; older releases used 1e-14 and 1e-8 thresholds.

The EMA step is a fused multiply-add (one rounding): the TA-Lib 0.8 wheel ships EMA, MACD and
BBANDS twice (`TA_EMA.default` / `TA_EMA.fma`, chosen at load time by CPU) and every x86-64 CPU
since 2013 takes the FMA build. With a plain multiply-then-add, EMA(35) and EMA(99) drift one ulp
from it on ~1/3 of the bars of a BTC-priced series (measured), and MACD, a difference of two EMAs,
turns that ulp into relative errors above 1e-9 wherever it nears zero.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction
from typing import Any


def _k(period: int) -> float:
    return 2.0 / float(period + 1)  # TA-Lib's PER_TO_K


def _fma_exact(x: float, y: float, z: float) -> float:
    """x * y + z rounded once: exact rationals, then one correctly rounded int division."""
    return float(Fraction(x) * Fraction(y) + Fraction(z))


fma = getattr(math, "fma", _fma_exact)  # math.fma exists from Python 3.13


def _ema_step(x: float, prev: float, k: float) -> float:
    # TA_INT_EMA: prevMA = ((inReal[today] - prevMA) * k) + prevMA, contracted to one FMA.
    return fma(x - prev, k, prev)


class _Sma:
    """TA_INT_SMA: sum the first n-1 closes, then total += new; out = total/n; total -= oldest."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.pending = 0.0  # the sum of the last period-1 closes, as TA-Lib carries it

    def push(self, x: float, count: int, window: deque[float]) -> float | None:
        # count = closes seen including x; window already holds x at its right end.
        if count < self.period:
            self.pending += x
            return None
        total = self.pending + x
        self.pending = total - window[-self.period]
        return total / self.period


class _Ema:
    """TA_INT_EMA, default compatibility: seed = mean of the first n closes, then k-smoothing."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.k = _k(period)
        self.seed_sum = 0.0
        self.value: float | None = None

    def push(self, x: float, count: int) -> float | None:
        if self.value is None:
            self.seed_sum += x
            if count < self.period:
                return None
            self.value = self.seed_sum / self.period
            return self.value
        self.value = _ema_step(x, self.value, self.k)
        return self.value


class _Rsi:
    """TA_RSI: plain means of the first n gains and losses, then Wilder smoothing."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.prev: float | None = None
        self.gain = 0.0
        self.loss = 0.0
        self.seeded = False

    def push(self, x: float, count: int) -> float | None:
        if self.prev is None:
            self.prev = x
            return None
        diff = x - self.prev
        self.prev = x
        if not self.seeded:
            if diff < 0:
                self.loss -= diff
            else:
                self.gain += diff
            if count <= self.period:
                return None
            self.loss /= self.period
            self.gain /= self.period
            self.seeded = True
        else:
            self.loss *= self.period - 1
            self.gain *= self.period - 1
            if diff < 0:
                self.loss -= diff
            else:
                self.gain += diff
            self.loss /= self.period
            self.gain /= self.period
        total = self.gain + self.loss
        if total == 0.0:
            return 0.0
        return 100.0 * (self.gain / total)


class _Macd:
    """TA_INT_MACD: both EMAs start at index slow-1, the fast one seeded on the closes ending there;
    the signal EMA is seeded with the mean of the first `signal` MACD values."""

    def __init__(self, fast: int, slow: int, signal: int) -> None:
        self.fast, self.slow, self.signal = fast, slow, signal
        self.k_fast, self.k_slow, self.k_signal = _k(fast), _k(slow), _k(signal)
        self.slow_seed = 0.0
        self.fast_ema: float | None = None
        self.slow_ema: float | None = None
        self.signal_seed = 0.0
        self.signal_count = 0
        self.signal_ema: float | None = None

    def push(self, x: float, count: int, window: deque[float]) -> tuple[float, float, float] | None:
        if self.slow_ema is None:
            self.slow_seed += x
            if count < self.slow:
                return None
            self.slow_ema = self.slow_seed / self.slow
            fast_seed = 0.0
            for close in list(window)[-self.fast :]:
                fast_seed += close
            self.fast_ema = fast_seed / self.fast
        else:
            assert self.fast_ema is not None
            self.slow_ema = _ema_step(x, self.slow_ema, self.k_slow)
            self.fast_ema = _ema_step(x, self.fast_ema, self.k_fast)
        macd = self.fast_ema - self.slow_ema
        if self.signal_ema is None:
            self.signal_seed += macd
            self.signal_count += 1
            if self.signal_count < self.signal:
                return None
            self.signal_ema = self.signal_seed / self.signal
        else:
            self.signal_ema = _ema_step(macd, self.signal_ema, self.k_signal)
        return macd, self.signal_ema, macd - self.signal_ema


class _Bbands:
    """TA_BBANDS with an SMA middle band: bands = middle +- nbdev * population stddev.

    The variance is two-pass over the window (mean, then mean squared deviation), not TA-Lib's
    mean(x^2) - mean^2 from running sums: at a price of 42000 those running sums leave ~1e-3 of
    noise where the window is flat, and TA-Lib >= 0.6 answers exactly 0 there (measured). Two-pass
    gives 0 for a flat window and agrees with TA-Lib to ~1e-12 of the stddev elsewhere.
    """

    def __init__(self, period: int, nbdev: float) -> None:
        self.period = period
        self.nbdev = nbdev
        self.sma = _Sma(period)

    def push(self, x: float, count: int, window: deque[float]) -> tuple[float, float, float] | None:
        middle = self.sma.push(x, count, window)
        if middle is None:
            return None
        values = list(window)[-self.period :]
        mean = math.fsum(values) / self.period
        variance = math.fsum((v - mean) * (v - mean) for v in values) / self.period
        stddev = math.sqrt(variance) if variance > 0.0 else 0.0
        spread = stddev * self.nbdev
        return middle + spread, middle, middle - spread


class IndicatorSpec:
    """The configured periods; column names follow them (sma_7, ema_25, rsi_14, ...)."""

    def __init__(
        self,
        sma: tuple[int, ...] = (7, 25, 99),
        ema: tuple[int, ...] = (7, 25, 99),
        rsi: int = 14,
        macd: tuple[int, int, int] = (12, 26, 9),
        bb_period: int = 20,
        bb_nbdev: float = 2.0,
    ) -> None:
        fast, slow, signal = macd
        if not 1 < fast < slow or signal < 1:
            raise ValueError(f"MACD periods must satisfy 1 < fast < slow and signal >= 1: {macd}")
        if min((*sma, *ema, bb_period)) < 1 or rsi < 1:
            raise ValueError("periods must be >= 1")
        self.sma, self.ema, self.rsi, self.macd = tuple(sma), tuple(ema), rsi, (fast, slow, signal)
        self.bb_period, self.bb_nbdev = bb_period, bb_nbdev

    @property
    def columns(self) -> tuple[str, ...]:
        return (
            *(f"sma_{p}" for p in self.sma),
            *(f"ema_{p}" for p in self.ema),
            f"rsi_{self.rsi}",
            "macd",
            "macd_signal",
            "macd_hist",
            "bb_upper",
            "bb_middle",
            "bb_lower",
        )

    @property
    def window_size(self) -> int:
        return max((*self.sma, *self.ema, self.bb_period, self.macd[1], 1))

    def describe(self) -> dict[str, Any]:
        return {
            "sma": list(self.sma),
            "ema": list(self.ema),
            "rsi": self.rsi,
            "macd": list(self.macd),
            "bb": [self.bb_period, self.bb_nbdev],
        }


class Series:
    """The indicator state of one (symbol, interval) series."""

    def __init__(self, spec: IndicatorSpec) -> None:
        self.spec = spec
        self.count = 0
        self.last_open_time: int | None = None
        self.window: deque[float] = deque(maxlen=spec.window_size)
        self.smas = [_Sma(p) for p in spec.sma]
        self.emas = [_Ema(p) for p in spec.ema]
        self.rsi = _Rsi(spec.rsi)
        self.macd = _Macd(*spec.macd)
        self.bb = _Bbands(spec.bb_period, spec.bb_nbdev)

    def push(self, close: float) -> dict[str, float | None]:
        self.count += 1
        self.window.append(close)
        n, w = self.count, self.window
        out: dict[str, float | None] = {}
        for p, sma in zip(self.spec.sma, self.smas, strict=True):
            out[f"sma_{p}"] = sma.push(close, n, w)
        for p, ema in zip(self.spec.ema, self.emas, strict=True):
            out[f"ema_{p}"] = ema.push(close, n)
        out[f"rsi_{self.spec.rsi}"] = self.rsi.push(close, n)
        macd = self.macd.push(close, n, w)
        out["macd"], out["macd_signal"], out["macd_hist"] = macd or (None, None, None)
        bands = self.bb.push(close, n, w)
        out["bb_upper"], out["bb_middle"], out["bb_lower"] = bands or (None, None, None)
        return out

    # -- persistence: plain JSON; floats round-trip exactly through repr ------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.describe(),
            "count": self.count,
            "last_open_time": self.last_open_time,
            "window": list(self.window),
            "sma": [s.pending for s in self.smas],
            "ema": [[e.seed_sum, e.value] for e in self.emas],
            "rsi": [self.rsi.prev, self.rsi.gain, self.rsi.loss, self.rsi.seeded],
            "macd": [
                self.macd.slow_seed,
                self.macd.fast_ema,
                self.macd.slow_ema,
                self.macd.signal_seed,
                self.macd.signal_count,
                self.macd.signal_ema,
            ],
            "bb": self.bb.sma.pending,
        }

    @classmethod
    def from_json(cls, spec: IndicatorSpec, data: dict[str, Any]) -> Series:
        if data["spec"] != spec.describe():
            # Different periods make the saved running sums meaningless for this run.
            raise ValueError(
                f"saved indicator state was built with {data['spec']}, not {spec.describe()}; "
                "use a fresh --checkpoint for new periods"
            )
        series = cls(spec)
        series.count = data["count"]
        series.last_open_time = data["last_open_time"]
        series.window.extend(data["window"])
        for sma, pending in zip(series.smas, data["sma"], strict=True):
            sma.pending = pending
        for ema, (seed_sum, value) in zip(series.emas, data["ema"], strict=True):
            ema.seed_sum, ema.value = seed_sum, value
        series.rsi.prev, series.rsi.gain, series.rsi.loss, series.rsi.seeded = data["rsi"]
        m = series.macd
        (
            m.slow_seed,
            m.fast_ema,
            m.slow_ema,
            m.signal_seed,
            m.signal_count,
            m.signal_ema,
        ) = data["macd"]
        series.bb.sma.pending = data["bb"]
        return series
