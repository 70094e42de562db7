"""Plain-Python references the Spark tests compare against (Decimal; no Spark, no job code)."""

from __future__ import annotations

import math
import statistics
from decimal import ROUND_HALF_EVEN, Decimal
from statistics import NormalDist
from typing import Any


def aggregate(
    batches: list[list[dict[str, Any]]], intervals: dict[str, int], delay_ms: int
) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[tuple[str, str], int]]:
    """Windows emitted over the batches (key -> values) and late-trade counts per symbol/interval.

    The documented rule: a trade is late for an interval when its window ended at or before the
    watermark left by the previous batches (max trade time - delay); a window is emitted once the
    watermark reaches its end."""
    open_: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    late: dict[tuple[str, str], int] = {}
    max_t: int | None = None
    for batch in batches:
        wm = None if max_t is None else max_t - delay_ms
        for t in batch:
            for label, size in intervals.items():
                start = t["trade_time"] - t["trade_time"] % size
                if wm is not None and start + size <= wm:
                    late[(t["symbol"], label)] = late.get((t["symbol"], label), 0) + 1
                    continue
                open_.setdefault((t["symbol"], label, start), []).append(t)
        for t in batch:
            max_t = t["trade_time"] if max_t is None else max(max_t, t["trade_time"])
        wm = None if max_t is None else max_t - delay_ms
        for key in sorted(open_):
            size = intervals[key[1]]
            if wm is not None and key[2] + size <= wm:
                out[key] = _bar(key, size, open_.pop(key))
    return out, late


def _bar(key: tuple[str, str, int], size: int, trades: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(trades, key=lambda t: (t["trade_time"], t["trade_id"]))
    prices = [Decimal(t["price"]) for t in trades]
    volume = sum((Decimal(t["quantity"]) for t in trades), Decimal(0))
    quote = sum((Decimal(t["price"]) * Decimal(t["quantity"]) for t in trades), Decimal(0))
    return {
        "symbol": key[0],
        "interval": key[1],
        "window_start": key[2],
        "window_end": key[2] + size,
        "open": Decimal(ordered[0]["price"]),
        "high": max(prices),
        "low": min(prices),
        "close": Decimal(ordered[-1]["price"]),
        "volume": volume,
        "quote_volume": quote,
        "vwap": (quote / volume).quantize(Decimal("1e-16"), rounding=ROUND_HALF_EVEN),
        "trades_count": len(trades),
        "taker_buy_volume": sum(
            (Decimal(t["quantity"]) for t in trades if not t["is_buyer_maker"]), Decimal(0)
        ),
        "taker_sell_volume": sum(
            (Decimal(t["quantity"]) for t in trades if t["is_buyer_maker"]), Decimal(0)
        ),
    }


# -- anomaly_detection ---------------------------------------------------------------------------
# The documented rules (spark/README.md, anomaly_detection), restated over the trades themselves:
# Decimal volumes, quote values and ranges; trimmed statistics by sorting and slicing; the whale
# percentile as the nearest-rank percentile of every baseline trade's histogram bin.


def _trimmed(sample: list[Any]) -> tuple[list[Any], float]:
    """The sample without its most extreme tenth (rounded up) at each end, at least 2 values kept,
    and the stddev of a normal sample trimmed that way over sigma."""
    n = len(sample)
    k = 0 if n <= 2 else min(-(-n // 10), (n - 2) // 2)
    core = sorted(sample)[k : n - k]
    if k == 0:
        return core, 1.0
    a = NormalDist().inv_cdf(1 - k / n)
    return core, math.sqrt(1 - 2 * a * NormalDist().pdf(a) / (1 - 2 * k / n))


def _trimmed_z(value: Any, sample: list[Any]) -> Any:
    """(trimmed mean, z) with sigma = trimmed population stddev / factor; None when flat."""
    core, factor = _trimmed(sample)
    mean = sum(core) / len(core)
    std = statistics.pstdev(core, mu=mean)
    if std == 0:
        return None
    sigma = std / (Decimal(repr(factor)) if isinstance(std, Decimal) else factor)
    return mean, (value - mean) / sigma


def quote_bin(quote: Decimal) -> int:
    """The reducer's histogram bin of a quote value: floor(log10(quote) * 100)."""
    return math.floor(math.log10(float(quote)) * 100)


def anomalies(
    trades: list[dict[str, Any]],
    *,
    close_before: int,
    window_ms: int = 60_000,
    baseline_windows: int = 30,
    min_baseline_windows: int = 10,
    volume_z: float = 3.0,
    price_z: float = 4.0,
    volatility_ratio: float = 5.0,
    whale_percentile: float = 99.9,
    whale_min_trades: int = 1_000,
    whale_abs: dict[str, float] | None = None,
    whale_top_k: int = 20,
) -> list[dict[str, Any]]:
    """Every anomaly in the windows that end at or before close_before (no late trades assumed)."""
    found: list[dict[str, Any]] = []
    for symbol in sorted({t["symbol"] for t in trades}):
        mine = sorted(
            (t for t in trades if t["symbol"] == symbol),
            key=lambda t: (t["trade_time"], t["trade_id"]),
        )
        starts = sorted({t["trade_time"] // window_ms * window_ms for t in mine})
        # history: per past window (volume, return, range ratio, its trades' quote values)
        history: list[tuple[Decimal, float | None, Decimal | None, list[Decimal]]] = []
        last_close: Decimal | None = None
        prev: int | None = None
        for s in (s for s in starts if s + window_ms <= close_before):
            if prev is not None:
                empty = min((s - prev) // window_ms - 1, baseline_windows)
                history += [(Decimal(0), None, None, [])] * empty
            base = history[-baseline_windows:]
            w = [t for t in mine if s <= t["trade_time"] < s + window_ms]
            quotes = [Decimal(t["price"]) * Decimal(t["quantity"]) for t in w]
            vol = sum((Decimal(t["quantity"]) for t in w), Decimal(0))
            prices = [Decimal(t["price"]) for t in w]
            close = Decimal(w[-1]["price"])
            ret = math.log(float(close) / float(last_close)) if last_close else None
            rr = (max(prices) - min(prices)) / (sum(quotes) / vol) if vol else None

            def row(kind: str, observed: Any, baseline: Any, score: Any, threshold: Any,
                    trade_id: int | None = None, s: int = s, symbol: str = symbol,
                    ) -> dict[str, Any]:  # fmt: skip
                return {
                    "symbol": symbol, "type": kind, "window_start": s,
                    "window_end": s + window_ms, "observed": float(observed),
                    "baseline": float(baseline), "score": float(score),
                    "threshold": float(threshold), "trade_id": trade_id,
                }  # fmt: skip

            if len(base) >= min_baseline_windows:
                vz = _trimmed_z(vol, [b[0] for b in base])
                if vz is not None and vz[1] >= Decimal(repr(volume_z)):
                    found.append(row("volume_spike", vol, vz[0], vz[1], volume_z))
                rets = [b[1] for b in base if b[1] is not None]
                if ret is not None and len(rets) >= min_baseline_windows:
                    rz = _trimmed_z(ret, rets)
                    if rz is not None and abs(rz[1]) >= price_z:
                        found.append(row("price_jump", ret, rz[0], rz[1], price_z))
                rrs = [b[2] for b in base if b[2] is not None]
                if rr is not None and len(rrs) >= min_baseline_windows:
                    core, _factor = _trimmed(rrs)
                    typical = sum(core) / len(core)
                    if typical > 0 and rr / typical >= Decimal(repr(volatility_ratio)):
                        found.append(
                            row("volatility_change", rr, typical, rr / typical, volatility_ratio)
                        )
            baseline_quotes = sorted(quote_bin(q) for b in base for q in b[3])
            limits: list[float] = []
            pct_value = None
            if len(baseline_quotes) >= whale_min_trades:
                rank = math.ceil(
                    Decimal(len(baseline_quotes)) * Decimal(repr(whale_percentile)) / 100
                )
                pct_value = 10.0 ** ((baseline_quotes[max(rank, 1) - 1] + 1) / 100)
                limits.append(pct_value)
            if whale_abs and symbol in whale_abs:
                limits.append(whale_abs[symbol])
            if limits:
                threshold = min(limits)
                ranked = sorted(
                    zip(quotes, w, strict=True), key=lambda p: (-p[0], p[1]["trade_id"])
                )
                for q, t in ranked[:whale_top_k]:
                    if float(q) > threshold:
                        base_value = pct_value if pct_value is not None else threshold
                        score = float(q) / threshold
                        found.append(
                            row("whale_trade", q, base_value, score, threshold, t["trade_id"])
                        )
            history.append((vol, ret, rr, quotes))
            last_close, prev = close, s
    return found
