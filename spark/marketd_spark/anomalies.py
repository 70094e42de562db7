"""Anomaly rules over closed per-symbol windows: volume spike, price jump, volatility change, whale.

`Detector.evaluate(symbol, window_start, acc)` scores one closed window (and its largest trades)
against the symbol's baseline, the previous `baseline_windows` windows, returns the anomalies, then
folds the window into the baseline. Minutes without trades count as zero-volume windows. Baselines
are trimmed (the most extreme tenth at each end is left out; why, with measurements:
spark/README.md "Robust baselines"), so one outlier window does not blind the rules for the next
half hour. Pure Python and deterministic
(floats for the statistics; the windows' own values stay Decimal until here); the baseline
round-trips through JSON.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from statistics import NormalDist
from typing import Any

from marketd_spark.windows import WindowAcc

# Whale percentiles come from a histogram of log10(quote value) with this many bins per decade
# (computed by the Spark reducer): 100 gives bins 2.3% wide, far finer than any whale threshold.
BINS_PER_DECADE = 100


@dataclass(frozen=True)
class Rules:
    window_ms: int = 60_000
    baseline_windows: int = 30
    min_baseline_windows: int = 10
    volume_z: float = 3.0
    price_z: float = 4.0
    volatility_ratio: float = 5.0
    whale_percentile: float = 99.9
    whale_min_trades: int = 1_000
    whale_abs: float | None = None  # quote value, all symbols
    whale_abs_by_symbol: dict[str, float] = field(default_factory=dict)
    whale_top_k: int = 20


@dataclass
class _Win:
    volume: float
    ret: float | None  # log return of this window's close over the previous close
    range_ratio: float | None  # (high - low) / vwap
    hist: dict[int, int]  # trades per log10(quote value) bin


def trim_count(n: int) -> int:
    """Values left out at each end of a baseline of n: a tenth (rounded up), keeping at least 2."""
    return min(math.ceil(n / 10), (n - 2) // 2) if n > 2 else 0


@functools.cache
def _sigma_factor(n: int, k: int) -> float:
    """Population stddev of a normal sample without its k lowest and k highest of n, over sigma:
    the truncated normal's, so z thresholds keep their usual meaning."""
    if k == 0:
        return 1.0
    alpha = k / n
    a = NormalDist().inv_cdf(1 - alpha)
    return math.sqrt(1 - 2 * a * NormalDist().pdf(a) / (1 - 2 * alpha))


def trimmed_mean(sample: list[float]) -> float:
    k = trim_count(len(sample))
    ordered = sorted(sample)
    return statistics.fmean(ordered[k : len(ordered) - k])


def trimmed_z(value: float, sample: list[float]) -> tuple[float, float] | None:
    """(trimmed mean, z of value) over sample; None when what is left has no spread at all.

    z = (value - mean) / sigma; mean and population stddev over the sample without its
    trim_count(n) lowest and highest values, the stddev scaled up to a normal's sigma."""
    n = len(sample)
    k = trim_count(n)
    core = sorted(sample)[k : n - k]
    mean = statistics.fmean(core)
    std = statistics.pstdev(core, mu=mean)
    if std == 0.0:
        return None
    return mean, (value - mean) / (std / _sigma_factor(n, k))


def percentile_bin(hist: dict[int, int], pct: float) -> int:
    """The histogram bin holding the nearest-rank percentile: the ceil(n * pct / 100)-th smallest.

    Integer counts and a decimal rank: no float rounding decides which bin it is."""
    n = sum(hist.values())
    rank = int((Decimal(n) * Decimal(repr(pct)) / 100).to_integral_value(ROUND_CEILING))
    rank = max(rank, 1)
    running = 0
    for b in sorted(hist):
        running += hist[b]
        if running >= rank:
            return b
    return max(hist)


def bin_upper_edge(b: int) -> float:
    return float(10.0 ** ((b + 1) / BINS_PER_DECADE))


class Baseline:
    """The previous `baseline_windows` windows of one symbol, and the close of the last one."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.windows: deque[_Win] = deque(maxlen=rules.baseline_windows)
        self.last_start: int | None = None
        self.last_close: float | None = None

    def trades_hist(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for w in self.windows:
            for b, n in w.hist.items():
                total[b] = total.get(b, 0) + n
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "windows": [
                [w.volume, w.ret, w.range_ratio, {str(b): n for b, n in w.hist.items()}]
                for w in self.windows
            ],
            "last_start": self.last_start,
            "last_close": self.last_close,
        }

    @classmethod
    def from_json(cls, rules: Rules, d: dict[str, Any]) -> Baseline:
        b = cls(rules)
        for w in d["windows"]:
            # State saved before the sliding histogram: those windows count no trades.
            hist = {int(k): int(n) for k, n in w[3].items()} if len(w) > 3 else {}
            b.windows.append(_Win(w[0], w[1], w[2], hist))
        b.last_start = d["last_start"]
        b.last_close = d["last_close"]
        return b


class Detector:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.baselines: dict[str, Baseline] = {}

    def evaluate(
        self, symbol: str, start: int, acc: WindowAcc, now_ms: int
    ) -> list[dict[str, Any]]:
        rules = self.rules
        base = self.baselines.get(symbol)
        if base is None:
            base = self.baselines[symbol] = Baseline(rules)
        if base.last_start is not None:
            gap = max(0, (start - base.last_start) // rules.window_ms - 1)
            for _ in range(min(gap, rules.baseline_windows)):
                base.windows.append(_Win(0.0, None, None, {}))

        end = start + rules.window_ms
        found: list[dict[str, Any]] = []

        def emit(kind: str, observed: float, baseline: float, score: float, threshold: float,
                 trade_id: int | None = None) -> None:  # fmt: skip
            found.append(
                {
                    "symbol": symbol,
                    "type": kind,
                    "window_start": start,
                    "window_end": end,
                    "observed": observed,
                    "baseline": baseline,
                    "score": score,
                    "threshold": threshold,
                    "detected_at": now_ms,
                    "trade_id": trade_id,
                }
            )

        volume = float(acc.volume)
        close = float(acc.last.price)
        vwap = acc.quote_volume / acc.volume if acc.volume else None
        ret = math.log(close / base.last_close) if base.last_close else None
        range_ratio = float((acc.high - acc.low) / vwap) if vwap else None
        enough = len(base.windows) >= rules.min_baseline_windows

        if enough:
            vz = trimmed_z(volume, [w.volume for w in base.windows])
            if vz is not None and vz[1] >= rules.volume_z:
                emit("volume_spike", volume, vz[0], vz[1], rules.volume_z)
            returns = [w.ret for w in base.windows if w.ret is not None]
            if ret is not None and len(returns) >= rules.min_baseline_windows:
                rz = trimmed_z(ret, returns)
                if rz is not None and abs(rz[1]) >= rules.price_z:
                    emit("price_jump", ret, rz[0], rz[1], rules.price_z)
            ranges = [w.range_ratio for w in base.windows if w.range_ratio is not None]
            if range_ratio is not None and len(ranges) >= rules.min_baseline_windows:
                typical = trimmed_mean(ranges)
                if typical > 0:
                    score = range_ratio / typical
                    if score >= rules.volatility_ratio:
                        emit("volatility_change", range_ratio, typical, score,
                             rules.volatility_ratio)  # fmt: skip

        pct_value = None
        hist = base.trades_hist()
        if sum(hist.values()) >= rules.whale_min_trades:
            pct_value = bin_upper_edge(percentile_bin(hist, rules.whale_percentile))
        abs_value = rules.whale_abs_by_symbol.get(symbol, rules.whale_abs)
        limits = [v for v in (pct_value, abs_value) if v is not None]
        if limits:
            threshold = min(limits)
            baseline = pct_value if pct_value is not None else threshold
            for quote, trade_id, _time in acc.top:
                q = float(quote)
                if q > threshold:
                    emit("whale_trade", q, baseline, q / threshold, threshold, trade_id)

        base.windows.append(_Win(volume, ret, range_ratio, dict(acc.hist)))
        base.last_start = start
        base.last_close = close
        return found

    def to_json(self) -> dict[str, Any]:
        return {s: b.to_json() for s, b in self.baselines.items()}

    def load(self, data: dict[str, Any]) -> None:
        self.baselines = {s: Baseline.from_json(self.rules, d) for s, d in data.items()}
