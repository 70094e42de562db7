"""Anomaly rules over closed per-symbol windows: volume spike, price jump, volatility change, whale.

`Detector.evaluate(symbol, window_start, acc)` scores one closed window (and its largest trades)
against the symbol's baseline of the previous `baseline_windows` windows, returns the anomalies,
then folds the window into the baseline. Minutes without trades count as zero-volume windows.
Pure Python (floats for the statistics; the windows' own values stay Decimal until here); the
baseline round-trips through JSON.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from marketd_spark.windows import WindowAcc

# Whale percentiles come from a histogram of log10(quote value) with this many bins per decade
# (computed by the Spark reducer): 100 gives bins 2.3% wide, far finer than any whale threshold.
BINS_PER_DECADE = 100
# Histogram bins whose decayed weight falls below this are dropped: it bounds the state.
_MIN_BIN_WEIGHT = 1e-3


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


class Baseline:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.windows: deque[_Win] = deque(maxlen=rules.baseline_windows)
        self.last_start: int | None = None
        self.last_close: float | None = None
        self.hist: dict[int, float] = {}

    @property
    def decay(self) -> float:
        # Exponential forgetting with a memory of about baseline_windows windows.
        return 1.0 - 1.0 / self.rules.baseline_windows

    def percentile(self, pct: float) -> tuple[float, float] | None:
        """(quote value at the percentile: its bin's upper edge, total weight), None when empty."""
        total = math.fsum(self.hist.values())
        if total <= 0:
            return None
        target = total * pct / 100.0
        running = 0.0
        for b in sorted(self.hist):
            running += self.hist[b]
            if running >= target:
                return 10.0 ** ((b + 1) / BINS_PER_DECADE), total
        return 10.0 ** ((max(self.hist) + 1) / BINS_PER_DECADE), total

    def _fold_hist(self, hist: dict[int, int], windows: int) -> None:
        factor = self.decay**windows
        decayed = {b: w * factor for b, w in self.hist.items()}
        for b, n in hist.items():
            decayed[b] = decayed.get(b, 0.0) + n
        self.hist = {b: w for b, w in decayed.items() if w >= _MIN_BIN_WEIGHT}

    def to_json(self) -> dict[str, Any]:
        return {
            "windows": [[w.volume, w.ret, w.range_ratio] for w in self.windows],
            "last_start": self.last_start,
            "last_close": self.last_close,
            "hist": {str(b): w for b, w in self.hist.items()},
        }

    @classmethod
    def from_json(cls, rules: Rules, d: dict[str, Any]) -> Baseline:
        b = cls(rules)
        b.windows.extend(_Win(v, r, x) for v, r, x in d["windows"])
        b.last_start = d["last_start"]
        b.last_close = d["last_close"]
        b.hist = {int(k): w for k, w in d["hist"].items()}
        return b


def _z(value: float, sample: list[float]) -> tuple[float, float] | None:
    """(mean, z-score of value) over sample (population stddev), None when the stddev is 0."""
    mean = statistics.fmean(sample)
    std = statistics.pstdev(sample, mu=mean)
    if std == 0.0:
        return None
    return mean, (value - mean) / std


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
        gap = 0
        if base.last_start is not None:
            gap = max(0, (start - base.last_start) // rules.window_ms - 1)
            for _ in range(min(gap, rules.baseline_windows)):
                base.windows.append(_Win(0.0, None, None))

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
            vz = _z(volume, [w.volume for w in base.windows])
            if vz is not None and vz[1] >= rules.volume_z:
                emit("volume_spike", volume, vz[0], vz[1], rules.volume_z)
            returns = [w.ret for w in base.windows if w.ret is not None]
            if ret is not None and len(returns) >= rules.min_baseline_windows:
                rz = _z(ret, returns)
                if rz is not None and abs(rz[1]) >= rules.price_z:
                    emit("price_jump", ret, rz[0], rz[1], rules.price_z)
            ranges = [w.range_ratio for w in base.windows if w.range_ratio is not None]
            if range_ratio is not None and len(ranges) >= rules.min_baseline_windows:
                mean_range = statistics.fmean(ranges)
                if mean_range > 0:
                    score = range_ratio / mean_range
                    if score >= rules.volatility_ratio:
                        emit("volatility_change", range_ratio, mean_range, score,
                             rules.volatility_ratio)  # fmt: skip

        pct = base.percentile(rules.whale_percentile)
        pct_value = pct[0] if pct is not None and pct[1] >= rules.whale_min_trades else None
        abs_value = rules.whale_abs_by_symbol.get(symbol, rules.whale_abs)
        limits = [v for v in (pct_value, abs_value) if v is not None]
        if limits:
            threshold = min(limits)
            baseline = pct_value if pct_value is not None else threshold
            for quote, trade_id, _time in acc.top:
                q = float(quote)
                if q > threshold:
                    emit("whale_trade", q, baseline, q / threshold, threshold, trade_id)

        base.windows.append(_Win(volume, ret, range_ratio))
        base._fold_hist(acc.hist, gap + 1)
        base.last_start = start
        base.last_close = close
        return found

    def to_json(self) -> dict[str, Any]:
        return {s: b.to_json() for s, b in self.baselines.items()}

    def load(self, data: dict[str, Any]) -> None:
        self.baselines = {s: Baseline.from_json(self.rules, d) for s, d in data.items()}
