"""A local order book: bids and asks keyed by exact Decimal price, bounded per side.

Receives snapshots and diff updates (already in sequence: `sync.BookSync` decides what to apply);
keeps the quantities as the decimal strings received and answers top-N, best prices and "crossed".
Each side knows how far it is exact (its horizon): beyond the last level of a truncated snapshot,
or beyond a level dropped because the side held `max_levels`, nothing is known, so updates there
are not stored. Inside the horizon the book equals the exchange's at `last_update_id`.
Pure: no I/O, no threads.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Final

from marketd.books.model import DepthSnapshot, DepthUpdate, Level, is_zero

DEFAULT_MAX_LEVELS: Final = 5000


class BookSide:
    """One side: a dict price -> Level and the prices in ascending order (for bids too).

    Inserting a new price is a bisect plus a list insert (a memmove of at most `max_levels`
    pointers), removing one the same; changing a quantity is a dict store. Top-N is a slice.
    """

    __slots__ = (
        "_keys",
        "_levels",
        "_prices",
        "dropped",
        "horizon",
        "horizon_inclusive",
        "is_bid",
        "max_levels",
    )

    def __init__(self, *, is_bid: bool, max_levels: int = DEFAULT_MAX_LEVELS) -> None:
        if max_levels < 1:
            raise ValueError(f"max_levels must be >= 1, not {max_levels!r}")
        self.is_bid = is_bid
        self.max_levels = max_levels
        self._levels: dict[Decimal, Level] = {}
        self._prices: list[Decimal] = []
        self._keys: dict[str, Decimal] = {}  # price spelling -> Decimal, a parse cache
        # The nearest price whose level is unknown (None: the whole side is known). Levels at it
        # are known when `horizon_inclusive` (the last level of a truncated snapshot).
        self.horizon: Decimal | None = None
        self.horizon_inclusive = False
        self.dropped = 0  # levels dropped because the side held max_levels

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, price: Decimal) -> bool:
        return price in self._levels

    def get(self, price: Decimal) -> Level | None:
        return self._levels.get(price)

    def clear(self) -> None:
        self._levels.clear()
        self._prices.clear()
        self.horizon = None
        self.horizon_inclusive = False

    def known(self, price: Decimal) -> bool:
        """Whether this side is exact at `price` (inside its horizon)."""
        h = self.horizon
        if h is None:
            return True
        if self.is_bid:
            return price > h or (price == h and self.horizon_inclusive)
        return price < h or (price == h and self.horizon_inclusive)

    def load(self, levels: Iterable[Level], *, truncated: bool) -> None:
        """Replace the side with `levels` (zero quantities skipped). `truncated`: the source cut
        the side at its last level (a snapshot side with `limit` levels)."""
        self.clear()
        store = self._levels
        for lv in levels:
            if not is_zero(lv.qty):
                store[Decimal(lv.price)] = lv
        prices = sorted(store)
        if truncated and prices:
            self.horizon = prices[-1] if not self.is_bid else prices[0]
            self.horizon_inclusive = True
        excess = len(prices) - self.max_levels
        if excess > 0:
            cut = prices[:excess] if self.is_bid else prices[-excess:]
            for p in cut:
                del store[p]
            prices = prices[excess:] if self.is_bid else prices[:-excess]
            self._set_horizon(cut[-1] if self.is_bid else cut[0])
            self.dropped += excess
        self._prices = prices

    def set(self, price: str, qty: str) -> None:
        """Apply one level of a diff: quantity "0" removes it, anything else sets it."""
        keys = self._keys
        key = keys.get(price)
        if key is None:
            # Parsing is the dearest step of an update and the same few hundred prices near the
            # top come back all the time: remember each spelling's Decimal (bounded).
            if len(keys) >= self.max_levels + 1024:
                keys.clear()
            key = keys[price] = Decimal(price)
        levels = self._levels
        if not qty.strip("0."):  # is_zero, inlined: this runs for every level of every diff
            if levels.pop(key, None) is not None:
                prices = self._prices
                del prices[bisect_left(prices, key)]
            return
        if key in levels:
            levels[key] = Level(price, qty)
            return
        if self.horizon is not None and not self.known(key):
            return  # beyond what we know: the level stays unknown (docs/books.md, "Depth kept")
        levels[key] = Level(price, qty)
        prices = self._prices
        insort(prices, key)
        if len(prices) > self.max_levels:
            worst = prices.pop(0) if self.is_bid else prices.pop()
            del levels[worst]
            self._set_horizon(worst)
            self.dropped += 1

    def _set_horizon(self, dropped_price: Decimal) -> None:
        """A level at `dropped_price` was dropped: from there outwards the side is unknown."""
        h = self.horizon
        nearer = (
            h is None
            or (dropped_price > h if self.is_bid else dropped_price < h)
            or (dropped_price == h)
        )
        if nearer:
            self.horizon = dropped_price
            self.horizon_inclusive = False

    def best(self) -> Decimal | None:
        prices = self._prices
        if not prices:
            return None
        return prices[-1] if self.is_bid else prices[0]

    def top(self, n: int) -> list[Level]:
        """The best `n` levels, best first."""
        levels, prices = self._levels, self._prices
        if n <= 0:
            return []
        if self.is_bid:
            return [levels[p] for p in reversed(prices[-n:])]
        return [levels[p] for p in prices[:n]]

    def prices(self) -> Iterator[Decimal]:
        """All prices, best first."""
        return reversed(self._prices) if self.is_bid else iter(self._prices)

    def items(self) -> Iterator[tuple[Decimal, Level]]:
        levels = self._levels
        return ((p, levels[p]) for p in self.prices())

    def copy(self) -> BookSide:
        other = BookSide(is_bid=self.is_bid, max_levels=self.max_levels)
        other._levels = dict(self._levels)
        other._prices = list(self._prices)
        other.horizon, other.horizon_inclusive = self.horizon, self.horizon_inclusive
        other.dropped = self.dropped
        return other


class OrderBook:
    """Both sides, the update id the book is at, and the event time of the last diff applied."""

    __slots__ = ("asks", "bids", "event_time_ms", "last_update_id")

    def __init__(self, *, max_levels: int = DEFAULT_MAX_LEVELS) -> None:
        self.bids = BookSide(is_bid=True, max_levels=max_levels)
        self.asks = BookSide(is_bid=False, max_levels=max_levels)
        self.last_update_id: int | None = None
        self.event_time_ms: int | None = None

    @property
    def max_levels(self) -> int:
        return self.bids.max_levels

    @property
    def dropped_levels(self) -> int:
        return self.bids.dropped + self.asks.dropped

    def load(self, snapshot: DepthSnapshot) -> None:
        """Become `snapshot` (no event time: a REST snapshot carries none)."""
        self.bids.load(snapshot.bids, truncated=len(snapshot.bids) >= snapshot.limit)
        self.asks.load(snapshot.asks, truncated=len(snapshot.asks) >= snapshot.limit)
        self.last_update_id = snapshot.last_update_id
        self.event_time_ms = None

    def apply(self, update: DepthUpdate) -> None:
        """Apply the levels of `update` and move to its `u` (sequence checks are the caller's)."""
        bset, aset = self.bids.set, self.asks.set
        for price, qty in update.bids:
            bset(price, qty)
        for price, qty in update.asks:
            aset(price, qty)
        self.last_update_id = update.last_update_id
        if update.event_time_ms is not None:
            self.event_time_ms = update.event_time_ms

    def crossed(self) -> bool:
        """Best bid >= best ask: impossible on the exchange, so this book is wrong."""
        bp, ap = self.bids._prices, self.asks._prices
        return bool(bp) and bool(ap) and bp[-1] >= ap[0]

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        return self.bids.top(n), self.asks.top(n)

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self.last_update_id = None
        self.event_time_ms = None

    def copy(self) -> OrderBook:
        other = OrderBook(max_levels=self.max_levels)
        other.bids, other.asks = self.bids.copy(), self.asks.copy()
        other.last_update_id, other.event_time_ms = self.last_update_id, self.event_time_ms
        return other
