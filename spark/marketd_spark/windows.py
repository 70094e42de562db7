"""Event-time tumbling windows with a watermark, merged on the driver from per-batch partials.

Spark reduces each micro-batch to one partial per (symbol, interval, window); `WindowBook` merges
them exactly (Decimal), tracks the watermark (max trade time seen - delay) and hands out each window
once, with its final values, when the watermark passes its end. A trade whose window had already
ended at the previous batch's watermark is late: the reducer counts it and it is never merged.
Pure Python; state round-trips through JSON (Decimals as strings).
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

# Sums of DECIMAL(38,16) values: 60 significant digits never round.
CTX = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)


@dataclass(frozen=True, order=True)
class Tick:
    """A trade's position in time: ordered by trade time, ties by trade id."""

    time_ms: int
    trade_id: int
    price: Decimal

    def to_json(self) -> list[Any]:
        return [self.time_ms, self.trade_id, str(self.price)]

    @classmethod
    def from_json(cls, data: list[Any]) -> Tick:
        return cls(int(data[0]), int(data[1]), Decimal(data[2]))


@dataclass
class WindowAcc:
    """The running aggregate of one window (a partial from one batch, or the merged whole)."""

    count: int
    first: Tick
    last: Tick
    high: Decimal
    low: Decimal
    volume: Decimal
    quote_volume: Decimal
    taker_buy_volume: Decimal
    taker_sell_volume: Decimal
    # Anomaly detection only: the largest trades by quote value, and a log-scale histogram.
    top: list[tuple[Decimal, int, int]] = field(default_factory=list)  # (quote, trade id, time)
    hist: dict[int, int] = field(default_factory=dict)

    def copy(self) -> WindowAcc:
        return replace(self, top=list(self.top), hist=dict(self.hist))

    def merge(self, other: WindowAcc, top_k: int = 0) -> None:
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.high = max(self.high, other.high)
        self.low = min(self.low, other.low)
        self.volume = CTX.add(self.volume, other.volume)
        self.quote_volume = CTX.add(self.quote_volume, other.quote_volume)
        self.taker_buy_volume = CTX.add(self.taker_buy_volume, other.taker_buy_volume)
        self.taker_sell_volume = CTX.add(self.taker_sell_volume, other.taker_sell_volume)
        if top_k:
            # Ties on quote value go to the earlier trade id: deterministic across batchings.
            merged = sorted([*self.top, *other.top], key=lambda t: (-t[0], t[1]))
            self.top = merged[:top_k]
        for b, n in other.hist.items():
            self.hist[b] = self.hist.get(b, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.count,
            "first": self.first.to_json(),
            "last": self.last.to_json(),
            "hl": [str(self.high), str(self.low)],
            "v": [
                str(self.volume),
                str(self.quote_volume),
                str(self.taker_buy_volume),
                str(self.taker_sell_volume),
            ],
            "top": [[str(q), i, t] for q, i, t in self.top],
            "hist": {str(b): n for b, n in self.hist.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WindowAcc:
        return cls(
            count=d["n"],
            first=Tick.from_json(d["first"]),
            last=Tick.from_json(d["last"]),
            high=Decimal(d["hl"][0]),
            low=Decimal(d["hl"][1]),
            volume=Decimal(d["v"][0]),
            quote_volume=Decimal(d["v"][1]),
            taker_buy_volume=Decimal(d["v"][2]),
            taker_sell_volume=Decimal(d["v"][3]),
            top=[(Decimal(q), int(i), int(t)) for q, i, t in d["top"]],
            hist={int(b): n for b, n in d["hist"].items()},
        )


WindowKey = tuple[str, int, int]  # (symbol, interval_ms, window_start_ms)


class WindowBook:
    def __init__(self, delay_ms: int, top_k: int = 0) -> None:
        self.delay_ms = delay_ms
        self.top_k = top_k
        self.max_event_ms: int | None = None
        self.open: dict[WindowKey, WindowAcc] = {}

    @property
    def watermark_ms(self) -> int | None:
        return None if self.max_event_ms is None else self.max_event_ms - self.delay_ms

    def add(self, key: WindowKey, partial: WindowAcc) -> None:
        current = self.open.get(key)
        if current is None:
            self.open[key] = partial
            if self.top_k:
                partial.top = sorted(partial.top, key=lambda t: (-t[0], t[1]))[: self.top_k]
        else:
            current.merge(partial, self.top_k)

    def observe(self, max_event_ms: int) -> None:
        if self.max_event_ms is None or max_event_ms > self.max_event_ms:
            self.max_event_ms = max_event_ms

    def close_ready(self) -> list[tuple[WindowKey, WindowAcc]]:
        """Remove and return every window whose end the watermark has reached, oldest first."""
        wm = self.watermark_ms
        if wm is None:
            return []
        ready = sorted(k for k in self.open if k[2] + k[1] <= wm)
        return [(k, self.open.pop(k)) for k in sorted(ready, key=lambda k: (k[2], k[0], k[1]))]

    def to_json(self) -> dict[str, Any]:
        return {
            "max_event_ms": self.max_event_ms,
            "open": {f"{s}|{i}|{w}": acc.to_json() for (s, i, w), acc in self.open.items()},
        }

    def load(self, data: dict[str, Any]) -> None:
        self.max_event_ms = data.get("max_event_ms")
        self.open = {}
        for key, acc in data.get("open", {}).items():
            s, i, w = key.split("|")
            self.open[(s, int(i), int(w))] = WindowAcc.from_json(acc)
