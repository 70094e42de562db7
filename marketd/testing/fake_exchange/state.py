"""Configuration and shared state of one fake exchange: clock, market, faults, ledger, links.

Receives the `ExchangeConfig`; holds what every connection and REST request reads (the market,
the current faults, counters, the ledger and the shared rolling windows). Has no tasks of its
own: the server owns them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from marketd.testing.fake_exchange.book import DEFAULT_HISTORY, DEFAULT_LEVELS, Books
from marketd.testing.fake_exchange.clock import SimClock
from marketd.testing.fake_exchange.faults import FaultCounters, Faults, apply_changes
from marketd.testing.fake_exchange.ledger import Ledger
from marketd.testing.fake_exchange.market import DEFAULT_SYMBOLS, Market
from marketd.testing.fake_exchange.stats import US, RollingWindow

if TYPE_CHECKING:
    from marketd.testing.fake_exchange.ws import WsConnection

# Rolling windows the periodic streams need, by key: length in µs and whether the window start
# is floored to a whole minute (the ticker_<w> streams, docs/binance.md §4.6).
WINDOWS: dict[str, tuple[int, bool]] = {
    "24h": (86400 * US, False),
    "1h": (3600 * US, True),
    "4h": (4 * 3600 * US, True),
    "1d": (86400 * US, True),
    "5m": (300 * US, False),  # avgPrice
}


@attrs.frozen
class ExchangeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    rate: int | None = 200  # trades/s across subscribed symbols; None = as fast as clients read
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    seed: int = 1
    ping_interval_s: float = 20.0  # docs/binance.md §2 (since 2025-02)
    pong_timeout_s: float = 60.0
    retention: int = 1_000_000  # trades kept per symbol for REST and klines
    speed: float = 1.0  # simulated seconds per real second
    start_time_ms: int | None = None  # simulated clock start (default: now)
    chunk_frames: int = 256  # frames per socket write at --rate max
    background_rate: int = 50  # at --rate max: trades/s for symbols only periodic streams use
    weight_limit: int = 6000  # REQUEST_WEIGHT per minute (docs/binance.md §5)
    ban_after_strikes: int = 3  # requests ignoring Retry-After before a 418
    ban_s: int = 120  # first ban: 2 minutes
    # Order books: levels per side at start, steps kept for book_at() and slow readers, and
    # --depth-max: diff streams send one event per book step as fast as the client reads.
    book_levels: int = DEFAULT_LEVELS
    book_history: int = DEFAULT_HISTORY
    depth_max: bool = False
    faults: Faults = attrs.field(factory=Faults)

    def __attrs_post_init__(self) -> None:
        if self.rate is not None and self.rate < 1:
            raise ValueError("rate must be >= 1 trade/s (or None for max)")
        if self.ping_interval_s <= 0 or self.pong_timeout_s <= 0:
            raise ValueError("ping interval and pong timeout must be positive")
        self.faults.validate()


class ExchangeState:
    def __init__(self, config: ExchangeConfig) -> None:
        self.config = config
        self.clock = SimClock(speed=config.speed, start_ms=config.start_time_ms)
        self.market = Market(
            config.symbols, seed=config.seed, retention=config.retention, clock_us=self.clock.now_us
        )
        self.books = Books(
            config.symbols,
            seed=config.seed,
            clock_us=self.clock.now_us,
            levels=config.book_levels,
            history=config.book_history,
        )
        self.faults = config.faults
        self.counters = FaultCounters()
        self.ledger = Ledger()
        self.connections: set[WsConnection] = set()
        self.connections_total = 0
        self.depth_drop_epoch = 0
        self.fired: set[str] = set()  # one-shot faults already injected ("drop", "stall", ...)
        self._windows: dict[tuple[str, str], RollingWindow] = {}

    def set_faults(self, changes: Mapping[str, Any]) -> Faults:
        self.faults = apply_changes(self.faults, changes, trio.current_time())
        # Re-arming a one-shot switch lets it fire again.
        if "depth_drop_after" in changes:
            self.depth_drop_epoch += 1  # connections count diff events afresh
        for key in ("drop", "stall", "shutdown", "depth_drop"):
            if f"{key}_after" in changes:
                self.fired.discard(key)
        for conn in self.connections:
            conn.poke()
        return self.faults

    def window(self, symbol: str, key: str, now_us: int) -> RollingWindow | None:
        """The shared rolling window `key` of a symbol, brought up to `now_us`."""
        tape = self.market.tape(symbol)
        if tape is None:
            return None
        win = self._windows.get((symbol, key))
        if win is None:
            win = self._windows[(symbol, key)] = RollingWindow(tape)
        win.update(self.window_start(key, now_us))
        return win

    @staticmethod
    def window_start(key: str, now_us: int) -> int:
        length, floor_minute = WINDOWS[key]
        start = now_us - length
        return start - start % (60 * US) if floor_minute else start

    def subscribed_symbols(self) -> set[str]:
        out: set[str] = set()
        for conn in self.connections:
            out |= conn.symbols()
        return out

    def tape_grew(self) -> None:
        for conn in self.connections:
            conn.poke()
