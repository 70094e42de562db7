"""Deterministic market simulator: one trade tape per symbol from a seeded random walk.

Receives generation requests (how many trades, for which symbols; times come from the injected
clock) and keeps every trade in compact arrays, bounded by `retention` per symbol, so WebSocket
frames, klines, tickers and REST answers are all built from the same tape. Pure: no trio, no I/O.
Prices and quantities are integers in units of 1e-8 (exact 8-decimal strings, never floats).
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

import attrs

E8 = 100_000_000


@attrs.frozen
class SymbolSpec:
    """Static facts about a symbol: start price, tick and lot size (all x1e-8), max lots/trade."""

    symbol: str
    price_e8: int
    tick_e8: int
    lot_e8: int
    max_lots: int
    base_asset: str
    quote_asset: str


def _spec(symbol: str, price: str, tick: str, lot: str, max_lots: int) -> SymbolSpec:
    def e8(text: str) -> int:
        whole, _, frac = text.partition(".")
        return int(whole) * E8 + int((frac + "0" * 8)[:8])

    quote = next((q for q in ("USDT", "USDC", "BTC", "ETH") if symbol.endswith(q)), "USDT")
    base = symbol.removesuffix(quote) or symbol
    return SymbolSpec(symbol, e8(price), e8(tick), e8(lot), max_lots, base, quote)


# Realistic starting prices, Binance tick sizes and lot steps; max_lots keeps trade notionals in
# the tens-to-thousands of USDT.
_KNOWN: dict[str, SymbolSpec] = {
    s.symbol: s
    for s in (
        _spec("BTCUSDT", "95000.00", "0.01", "0.00001", 5000),
        _spec("ETHUSDT", "3300.00", "0.01", "0.0001", 5000),
        _spec("BNBUSDT", "650.00", "0.01", "0.001", 2000),
        _spec("SOLUSDT", "180.00", "0.01", "0.001", 5000),
        _spec("XRPUSDT", "2.2000", "0.0001", "0.1", 5000),
        _spec("ADAUSDT", "0.7000", "0.0001", "0.1", 5000),
        _spec("DOGEUSDT", "0.32000", "0.00001", "1", 3000),
        _spec("AVAXUSDT", "35.00", "0.01", "0.01", 3000),
        _spec("DOTUSDT", "6.500", "0.001", "0.01", 5000),
        _spec("LINKUSDT", "20.00", "0.01", "0.01", 3000),
        _spec("LTCUSDT", "100.00", "0.01", "0.001", 5000),
        _spec("UNIUSDT", "12.000", "0.001", "0.01", 5000),
        _spec("ATOMUSDT", "6.500", "0.001", "0.01", 5000),
        _spec("SHIBUSDT", "0.00002200", "0.00000001", "1", 50_000_000),
        _spec("POLUSDT", "0.4500", "0.0001", "0.1", 5000),
    )
}

# The 15 symbols of docs/contract.md §1. MATICUSDT was replaced by POL on Binance: it is listed
# (status BREAK) but never trades, so "a symbol that never delivers data shows as missing" can
# be demonstrated.
DEFAULT_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "DOTUSDT", "MATICUSDT", "LINKUSDT", "LTCUSDT", "UNIUSDT", "ATOMUSDT", "SHIBUSDT",
)  # fmt: skip
SILENT_SYMBOLS: frozenset[str] = frozenset({"MATICUSDT"})


def spec_for(symbol: str) -> SymbolSpec:
    """Known symbols get realistic figures; any other symbol starts at 100.00."""
    return _KNOWN.get(symbol) or _spec(symbol, "100.00", "0.01", "0.001", 1000)


# One 32-bit draw per taker order: 3 bits of price step (a symmetric walk), 1 bit of side,
# 4 bits of fill count (most orders fill once, some hit several makers at the same price).
_STEPS = (-2, -1, -1, 0, 0, 1, 1, 2)
_FILLS = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4)


class Tape:
    """All retained trades of one symbol, columnar. Trade ids and aggregate ids are contiguous."""

    __slots__ = (
        "_hi",
        "_lo",
        "_rng",
        "agg_base",
        "agg_first",
        "first_id",
        "generated",
        "last_price",
        "maker",
        "price",
        "qty",
        "retention",
        "spec",
        "time_us",
        "trim_hooks",
    )

    def __init__(self, spec: SymbolSpec, seed: int, retention: int, start_id: int) -> None:
        self.spec = spec
        # Per-symbol generator: a symbol's tape depends on the seed alone, not on which other
        # symbols were subscribed or in what order the clients read.
        self._rng = random.Random(f"{seed}:{spec.symbol}")
        self.retention = retention
        self.first_id = start_id
        self.price = array("q")
        self.qty = array("q")
        self.time_us = array("q")
        self.maker = bytearray()
        self.agg_first = array("q")  # first trade id of each aggregate trade
        self.agg_base = start_id // 2 + 7  # aggregate ids live in their own range, as on Binance
        self.last_price = spec.price_e8
        self.generated = 0
        self._lo = max(spec.tick_e8, spec.price_e8 // 2)
        self._hi = spec.price_e8 * 2
        self.trim_hooks: list[Callable[[Tape, int], None]] = []

    @property
    def end_id(self) -> int:
        """Id the next trade will get (one past the newest)."""
        return self.first_id + len(self.price)

    @property
    def agg_end(self) -> int:
        return self.agg_base + len(self.agg_first)

    def index_of(self, trade_id: int) -> int:
        return trade_id - self.first_id

    def generate(self, n: int, now_us: int) -> int:
        """Append taker orders until at least `n` trades were made; returns how many."""
        spec = self.spec
        tick, lot, max_lots = spec.tick_e8, spec.lot_e8, spec.max_lots
        lo, hi = self._lo, self._hi
        draw = self._rng.getrandbits
        price = self.last_price
        p_app, q_app, t_app, m_app = (
            self.price.append,
            self.qty.append,
            self.time_us.append,
            self.maker.append,
        )
        a_app = self.agg_first.append
        next_id = self.end_id
        made = 0
        while made < n:
            r = draw(32)
            step = _STEPS[r & 7]
            # Reflect the walk inside [start/2, start*2] so long runs stay realistic.
            if (price <= lo and step < 0) or (price >= hi and step > 0):
                step = -step
            price = max(tick, price + step * tick)
            side = (r >> 3) & 1
            fills = _FILLS[(r >> 4) & 15]
            a_app(next_id)
            for _ in range(fills):
                p_app(price)
                q_app(lot * (draw(30) % max_lots + 1))
                t_app(now_us)
                m_app(side)
            next_id += fills
            made += fills
        self.last_price = price
        self.generated += made
        if len(self.price) > self.retention + max(1024, self.retention // 8):
            self.trim()
        return made

    def trim(self) -> None:
        """Drop the oldest trades beyond `retention` (in one block: array deletes are memmoves)."""
        cut = len(self.price) - self.retention
        if cut <= 0:
            return
        new_first = self.first_id + cut
        for hook in self.trim_hooks:
            hook(self, new_first)
        del self.price[:cut], self.qty[:cut], self.time_us[:cut], self.maker[:cut]
        self.first_id = new_first
        # Aggregates that started before the new first trade are gone with it.
        k = bisect_left(self.agg_first, new_first)
        del self.agg_first[:k]
        self.agg_base += k

    def agg_range(self, agg_id: int) -> tuple[int, int]:
        """First and last trade id of a retained aggregate trade."""
        k = agg_id - self.agg_base
        first = self.agg_first[k]
        last = self.agg_first[k + 1] - 1 if k + 1 < len(self.agg_first) else self.end_id - 1
        return first, last

    def agg_of_trade(self, trade_id: int) -> int:
        """Aggregate id that contains a retained trade."""
        return self.agg_base + bisect_left(self.agg_first, trade_id + 1) - 1

    def first_index_at(self, t_us: int, lo: int = 0) -> int:
        """Index of the first retained trade with time >= t_us."""
        return bisect_left(self.time_us, t_us, lo)

    def price_before(self, index: int) -> int:
        """Price of the trade before `index`, or the start price when there is none."""
        return self.price[index - 1] if index > 0 else self.spec.price_e8


class Market:
    """The tapes of all trading symbols; generation spreads trades over symbols by seed."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        retention: int,
        clock_us: Callable[[], int],
        silent: Iterable[str] = SILENT_SYMBOLS,
    ) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1 trade")
        self.seed = seed
        self.clock_us = clock_us
        self.symbols = tuple(dict.fromkeys(s.upper() for s in symbols))
        silent_set = set(silent)
        self.silent = frozenset(s for s in self.symbols if s in silent_set)
        self.tapes: dict[str, Tape] = {}
        for sym in self.symbols:
            if sym not in self.silent:
                # Like the tape itself, a symbol's first id depends only on the seed.
                start = random.Random(f"{seed}:{sym}:ids").randrange(10**8, 5 * 10**9)
                self.tapes[sym] = Tape(spec_for(sym), seed, retention, start)
        self._pick = random.Random(f"{seed}:spread")

    def tape(self, symbol: str) -> Tape | None:
        return self.tapes.get(symbol)

    def generate(self, symbol: str, n: int) -> int:
        return self.tapes[symbol].generate(n, self.clock_us())

    def generate_spread(self, symbols: Sequence[str], n: int) -> int:
        """At least `n` trades over `symbols` (a seeded choice per taker order)."""
        now = self.clock_us()
        made = 0
        choice = self._pick.choice
        tapes = [self.tapes[s] for s in symbols if s in self.tapes]
        if not tapes:
            return 0
        if len(tapes) == 1:
            return tapes[0].generate(n, now)
        while made < n:
            made += choice(tapes).generate(1, now)
        return made
