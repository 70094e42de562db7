"""Plain-Python references the Spark tests compare against (Decimal; no Spark, no job code)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
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
