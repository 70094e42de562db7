"""A local order book: bids and asks keyed by exact price, bounded per side.

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
# Decimals a side's integer keys start with (Binance's prices have at most 8); a price with more
# significant decimals rescales the side (docs/books.md §4).
DEFAULT_SCALE: Final = 8
_new_level = tuple.__new__  # Level(price, qty) without NamedTuple's Python-level __new__


def price_key(price: str, scale: int) -> int | None:
    """The exact integer key of a validated plain decimal string: its value x 10^scale, or None
    when it has more significant decimals than `scale` (the side must rescale first)."""
    dot = price.find(".")
    if dot < 0:
        return int(price) * int(10**scale)
    frac = price[dot + 1 :].rstrip("0")
    extra = scale - len(frac)
    if extra < 0:
        return None
    return int(price[:dot] + frac) * int(10**extra)


def _decimals(price: str) -> int:
    """Significant decimals of a plain decimal string."""
    dot = price.find(".")
    return 0 if dot < 0 else len(price[dot + 1 :].rstrip("0"))


class BookSide:
    """One side: a dict key -> Level and the keys in ascending order, best last.

    A key is the price as an exact integer (price x 10^scale, `price_key`), negated on the ask
    side, so that on both sides a larger key is a better price and the best level is the last
    element of the ordered list: inserting or removing a level near the top (where most updates
    are) is a bisect plus a list insert that moves only the few keys above it. Changing a
    quantity is a dict store; top-N is a slice. docs/performance.md §8 has the measurements
    behind this (against Decimal keys and a sorted container).
    """

    __slots__ = (
        "_hkey",
        "_keys",
        "_levels",
        "_order",
        "_sign",
        "dropped",
        "horizon_inclusive",
        "is_bid",
        "max_levels",
        "scale",
        "top_changed",
        "watch",
    )

    def __init__(self, *, is_bid: bool, max_levels: int = DEFAULT_MAX_LEVELS) -> None:
        if max_levels < 1:
            raise ValueError(f"max_levels must be >= 1, not {max_levels!r}")
        self.is_bid = is_bid
        self.max_levels = max_levels
        self.scale = DEFAULT_SCALE
        self._sign = 1 if is_bid else -1
        self._levels: dict[int, Level] = {}
        self._order: list[int] = []  # keys ascending: the best level last
        self._keys: dict[str, int] = {}  # price spelling -> key, a parse cache
        # The nearest key whose level is unknown (None: the whole side is known). Levels at it
        # are known when `horizon_inclusive` (the last level of a truncated snapshot).
        self._hkey: int | None = None
        self.horizon_inclusive = False
        self.dropped = 0  # levels dropped because the side held max_levels
        # Set when a change reached the best `watch` levels (the driver clears it): a reader of
        # the top `watch` levels can only see a change then.
        self.watch = 0
        self.top_changed = False

    # -- keys -----------------------------------------------------------------------------------

    def _key(self, price: str) -> int:
        key = price_key(price, self.scale)
        if key is None:
            self._rescale(_decimals(price))
            key = price_key(price, self.scale)
            assert key is not None
        return key * self._sign

    def _rescale(self, scale: int) -> None:
        """A price with more decimals than the keys hold: multiply every key (rare: O(n))."""
        f = 10 ** (scale - self.scale)
        self.scale = scale
        self._levels = {k * f: lv for k, lv in self._levels.items()}
        self._order = [k * f for k in self._order]
        self._keys.clear()
        if self._hkey is not None:
            self._hkey *= f

    def _decimal(self, key: int) -> Decimal:
        return Decimal(f"{key * self._sign}E-{self.scale}")  # from a string: exact, no context

    def _key_of(self, price: Decimal) -> int | None:
        """The key of a Decimal price; None if no key here can be that price."""
        if not price.is_finite():
            return None
        sign, digits, exp = price.as_tuple()
        assert isinstance(exp, int)
        n = int("".join(map(str, digits)) or "0")
        e = exp + self.scale
        if e >= 0:
            value = n * 10**e
        else:
            value, rest = divmod(n, 10**-e)
            if rest:
                return None
        return int((-value if sign else value) * self._sign)

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, price: Decimal) -> bool:
        key = self._key_of(price)
        return key is not None and key in self._levels

    def get(self, price: Decimal) -> Level | None:
        key = self._key_of(price)
        return None if key is None else self._levels.get(key)

    @property
    def horizon(self) -> Decimal | None:
        """The nearest price this side knows nothing about (None: the whole side is known)."""
        return None if self._hkey is None else self._decimal(self._hkey)

    def known(self, price: Decimal) -> bool:
        """Whether this side is exact at `price` (inside its horizon)."""
        h = self.horizon
        if h is None:
            return True
        if self.is_bid:
            return price > h or (price == h and self.horizon_inclusive)
        return price < h or (price == h and self.horizon_inclusive)

    def best(self) -> Decimal | None:
        order = self._order
        return self._decimal(order[-1]) if order else None

    def top(self, n: int) -> list[Level]:
        """The best `n` levels, best first."""
        if n <= 0:
            return []
        levels = self._levels
        return [levels[k] for k in reversed(self._order[-n:])]

    def prices(self) -> Iterator[Decimal]:
        """All prices, best first."""
        return (self._decimal(k) for k in reversed(self._order))

    def items(self) -> Iterator[tuple[Decimal, Level]]:
        levels = self._levels
        return ((self._decimal(k), levels[k]) for k in reversed(self._order))

    # -- changing -------------------------------------------------------------------------------

    def clear(self) -> None:
        self._levels.clear()
        self._order.clear()
        self._hkey = None
        self.horizon_inclusive = False
        self.top_changed = True

    def load(self, levels: Iterable[tuple[str, str]], *, truncated: bool) -> None:
        """Replace the side with `levels` (zero quantities skipped). `truncated`: the source cut
        the side at its last level (a snapshot side with `limit` levels)."""
        self.clear()
        kept = [(p, q) for p, q in levels if not is_zero(q)]
        need = max((_decimals(p) for p, _ in kept), default=0)
        if need > self.scale:
            self._rescale(need)
        key = self._key
        store = self._levels
        for p, q in kept:
            store[key(p)] = _new_level(Level, (p, q))
        order = sorted(store)
        if truncated and order:
            self._hkey = order[0]  # the worst level received: known, beyond it unknown
            self.horizon_inclusive = True
        excess = len(order) - self.max_levels
        if excess > 0:
            cut = order[:excess]
            for k in cut:
                del store[k]
            order = order[excess:]
            self._set_horizon(cut[-1])
            self.dropped += excess
        self._order = order

    def set(self, price: str, qty: str) -> None:
        """Apply one level of a diff: quantity "0" removes it, anything else sets it."""
        self.update((Level(price, qty),))

    def update(self, changes: Iterable[Level]) -> None:
        """Apply the levels of one side of a diff in order (`set` for each, in one loop: this
        runs for every level of every diff, so everything it touches is a local). The Levels
        are stored as they are (they are immutable)."""
        keys = self._keys
        levels = self._levels
        order = self._order
        max_keys = self.max_levels + 1024
        # The best key this batch changed. The top `watch` levels changed iff it is at or above
        # the watch-th best key afterwards: a level removed from the top leaves a lower key there.
        touched: int | None = None
        for lv in changes:
            price, qty = lv
            key = keys.get(price)
            if key is None:
                # Parsing is the dearest step of an update and the same few hundred prices near
                # the top come back all the time: remember each spelling's key (bounded).
                if len(keys) >= max_keys:
                    keys.clear()
                key = self._key(price)
                if order is not self._order:  # the key rescaled the side (rare)
                    levels, order = self._levels, self._order
                    self.top_changed = True
                    touched = None
                keys[price] = key
            if not qty.strip("0."):  # is_zero, inlined
                if levels.pop(key, None) is None:
                    continue
                del order[bisect_left(order, key)]
            elif key in levels:
                levels[key] = lv
            else:
                h = self._hkey
                if h is not None and (key < h or (key == h and not self.horizon_inclusive)):
                    continue  # beyond what we know: stays unknown (docs/books.md, "Depth kept")
                levels[key] = lv
                insort(order, key)
                if len(order) > self.max_levels:
                    worst = order.pop(0)
                    del levels[worst]
                    self._set_horizon(worst)
                    self.dropped += 1
            if touched is None or key > touched:
                touched = key
        watch = self.watch
        if watch and touched is not None and (len(order) < watch or touched >= order[-watch]):
            self.top_changed = True

    def _set_horizon(self, dropped_key: int) -> None:
        """A level at `dropped_key` was dropped: from there outwards the side is unknown."""
        h = self._hkey
        if h is None or dropped_key >= h:
            self._hkey = dropped_key
            self.horizon_inclusive = False

    def copy(self) -> BookSide:
        other = BookSide(is_bid=self.is_bid, max_levels=self.max_levels)
        other.scale = self.scale
        other._levels = dict(self._levels)
        other._order = list(self._order)
        other._hkey, other.horizon_inclusive = self._hkey, self.horizon_inclusive
        other.dropped = self.dropped
        other.watch = self.watch
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

    def watch_top(self, n: int) -> None:
        """Flag changes that reach the best `n` levels of a side (`top_changed`, `seen_top`)."""
        self.bids.watch = self.asks.watch = n

    @property
    def top_changed(self) -> bool:
        return self.bids.top_changed or self.asks.top_changed

    def seen_top(self) -> None:
        self.bids.top_changed = self.asks.top_changed = False

    def load(self, snapshot: DepthSnapshot) -> None:
        """Become `snapshot` (no event time: a REST snapshot carries none)."""
        self.bids.load(snapshot.bids, truncated=len(snapshot.bids) >= snapshot.limit)
        self.asks.load(snapshot.asks, truncated=len(snapshot.asks) >= snapshot.limit)
        self.last_update_id = snapshot.last_update_id
        self.event_time_ms = None

    def apply(self, update: DepthUpdate) -> None:
        """Apply the levels of `update` and move to its `u` (sequence checks are the caller's)."""
        if update.bids:
            self.bids.update(update.bids)
        if update.asks:
            self.asks.update(update.asks)
        self.last_update_id = update.last_update_id
        if update.event_time_ms is not None:
            self.event_time_ms = update.event_time_ms

    def crossed(self) -> bool:
        """Best bid >= best ask: impossible on the exchange, so this book is wrong."""
        bids, asks = self.bids, self.asks
        bo, ao = bids._order, asks._order
        if not bo or not ao:
            return False
        if bids.scale == asks.scale:
            return bo[-1] >= -ao[-1]  # ask keys are negated prices
        best_bid, best_ask = bids.best(), asks.best()
        assert best_bid is not None and best_ask is not None
        return best_bid >= best_ask

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
