"""The emission ledger: what the fake exchange sent, per symbol and stream kind.

Receives per-chunk reports from the WebSocket senders; emits a JSON-able summary
(`GET /fake/stats`, `FakeExchange.ledger`). Tests compare "everything the exchange emitted" with
what reached Kafka: every id in `trade_id_range()` was sent on a WebSocket or, when withheld by
the skip fault (`skipped`), is still served by REST.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class SymbolLedger:
    __slots__ = ("first_trade_id", "frames", "last_trade_id", "skipped")

    def __init__(self) -> None:
        self.first_trade_id: int | None = None
        self.last_trade_id: int | None = None
        self.frames: Counter[str] = Counter()
        self.skipped: list[list[int]] = []  # [first, last] ranges withheld from the WebSocket

    def trades_sent(self, first_id: int, last_id: int, frames: int) -> None:
        if self.first_trade_id is None or first_id < self.first_trade_id:
            self.first_trade_id = first_id
        if self.last_trade_id is None or last_id > self.last_trade_id:
            self.last_trade_id = last_id
        self.frames["trade"] += frames

    def skip(self, trade_id: int) -> None:
        if self.skipped and self.skipped[-1][1] == trade_id - 1:
            self.skipped[-1][1] = trade_id
        else:
            self.skipped.append([trade_id, trade_id])


class Ledger:
    def __init__(self) -> None:
        self.symbols: dict[str, SymbolLedger] = {}
        self.frames_total = 0
        self.bytes_total = 0

    def symbol(self, symbol: str) -> SymbolLedger:
        led = self.symbols.get(symbol)
        if led is None:
            led = self.symbols[symbol] = SymbolLedger()
        return led

    def count(self, symbol: str, kind: str, n: int = 1) -> None:
        self.symbol(symbol).frames[kind] += n

    def trade_id_range(self, symbol: str) -> range:
        """Ids from the first to the last trade sent on any WebSocket (empty if none)."""
        led = self.symbols.get(symbol)
        if led is None or led.first_trade_id is None or led.last_trade_id is None:
            return range(0)
        return range(led.first_trade_id, led.last_trade_id + 1)

    def skipped_ids(self, symbol: str) -> list[int]:
        led = self.symbols.get(symbol)
        if led is None:
            return []
        return [i for a, b in led.skipped for i in range(a, b + 1)]

    def frames(self, symbol: str, kind: str) -> int:
        led = self.symbols.get(symbol)
        return led.frames[kind] if led else 0

    def summary(self) -> dict[str, Any]:
        return {
            "frames_total": self.frames_total,
            "bytes_total": self.bytes_total,
            "symbols": {
                sym: {
                    "trade_ids": None
                    if led.first_trade_id is None
                    else {"first": led.first_trade_id, "last": led.last_trade_id},
                    "skipped": led.skipped,
                    "frames": dict(led.frames),
                }
                for sym, led in sorted(self.symbols.items())
            },
        }
