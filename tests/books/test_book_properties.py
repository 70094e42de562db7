"""The book's fast paths against plain references, for any input hypothesis finds.

- OrderBook (integer keys, best level last, rescaling) equals a dict-based book keyed by Decimal
  after any sequence of snapshots and updates: levels, spellings, horizons, drops, top-N,
  crossed; and it flags every change of its top `watch` levels.
- `price_key` orders and equates any two plain decimal strings exactly as Decimal does.
- `decode_diff` (typed decode, one pattern per level array) accepts exactly what the generic
  decode + `parse_diff` accepts in compact form, with the same result, and `depth_value_raw`
  gives the bytes `depth_value` gives.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.books import DepthDataError, Level, OrderBook, parse_diff, publish
from marketd.books.book import price_key
from marketd.books.model import decode_diff
from tests.books.helpers import diff, snap

# Prices that collide in value under different spellings ("12.5", "12.50"), and now and then
# carry more significant decimals than the book's starting scale (8): the side rescales.
_frac = st.one_of(
    st.just(""),
    st.text("05", min_size=1, max_size=2),
    st.text("0123456789", min_size=9, max_size=11),
)
prices = st.builds(
    lambda i, f, z: f"{i}.{f}{'0' * z}" if f or z else str(i),
    st.integers(1, 40),
    _frac,
    st.integers(0, 3),
)
qtys = st.sampled_from(["0", "0.000", "1", "2.5", "2.50", "3.14159265", "100"])
levels = st.lists(st.tuples(prices, qtys), max_size=12)


class RefSide:
    """docs/books.md §4 written the plain way: a dict keyed by Decimal, sorted on every read."""

    def __init__(self, *, is_bid: bool, max_levels: int) -> None:
        self.is_bid = is_bid
        self.max_levels = max_levels
        self.levels: dict[Decimal, tuple[str, str]] = {}
        self.horizon: Decimal | None = None
        self.inclusive = False
        self.dropped = 0

    def better(self, a: Decimal, b: Decimal) -> bool:
        return a > b if self.is_bid else a < b

    def ordered(self) -> list[Decimal]:
        return sorted(self.levels, reverse=self.is_bid)

    def known(self, p: Decimal) -> bool:
        h = self.horizon
        return h is None or self.better(p, h) or (p == h and self.inclusive)

    def drop_to_max(self) -> None:
        while len(self.levels) > self.max_levels:
            worst = self.ordered()[-1]
            del self.levels[worst]
            self.dropped += 1
            h = self.horizon
            if h is None or not self.better(h, worst):
                self.horizon, self.inclusive = worst, False

    def load(self, pairs: list[tuple[str, str]], truncated: bool) -> None:
        self.levels = {}
        self.horizon, self.inclusive = None, False
        for p, q in pairs:
            if Decimal(q) != 0:
                self.levels[Decimal(p)] = (p, q)
        if truncated and self.levels:
            self.horizon, self.inclusive = self.ordered()[-1], True
        self.drop_to_max()

    def set(self, p: str, q: str) -> None:
        key = Decimal(p)
        if Decimal(q) == 0:
            self.levels.pop(key, None)
        elif key in self.levels or self.known(key):
            self.levels[key] = (p, q)
            self.drop_to_max()

    def top(self, n: int) -> list[tuple[str, str]]:
        return [self.levels[p] for p in self.ordered()[:n]]


def _dedup(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One level per price value and side, as Binance sends them."""
    seen: dict[Decimal, tuple[str, str]] = {}
    for p, q in pairs:
        seen[Decimal(p)] = (p, q)
    return list(seen.values())


def _check(book: OrderBook, ref: dict[str, RefSide]) -> None:
    for name, side in (("bid", book.bids), ("ask", book.asks)):
        r = ref[name]
        assert [(p, tuple(lv)) for p, lv in side.items()] == [(p, r.levels[p]) for p in r.ordered()]
        assert len(side) == len(r.levels)
        assert side.horizon == r.horizon
        assert side.dropped == r.dropped
        assert side.top(5) == [Level(*lv) for lv in r.top(5)]
        for p in r.levels:
            assert p in side and side.get(p) == r.levels[p] and side.known(p)
    bids, asks = ref["bid"].ordered(), ref["ask"].ordered()
    assert book.crossed() == bool(bids and asks and bids[0] >= asks[0])


@settings(max_examples=300, deadline=None)
@given(
    max_levels=st.integers(1, 12),
    watch=st.integers(0, 4),
    start=st.tuples(levels, levels, st.integers(1, 12)),
    steps=st.lists(st.tuples(levels, levels), max_size=25),
    probes=st.lists(prices, max_size=5),
)
def test_book_equals_a_decimal_dict_book(
    max_levels: int,
    watch: int,
    start: tuple[list[tuple[str, str]], list[tuple[str, str]], int],
    steps: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]],
    probes: list[str],
) -> None:
    book = OrderBook(max_levels=max_levels)
    book.watch_top(watch)
    ref = {"bid": RefSide(is_bid=True, max_levels=max_levels)}
    ref["ask"] = RefSide(is_bid=False, max_levels=max_levels)
    b0, a0, limit = _dedup(start[0]), _dedup(start[1]), start[2]
    book.load(snap(1, bids=b0, asks=a0, limit=limit))
    ref["bid"].load(b0, len(b0) >= limit)
    ref["ask"].load(a0, len(a0) >= limit)
    _check(book, ref)
    for i, (step_b, step_a) in enumerate(steps):
        b, a = _dedup(step_b), _dedup(step_a)
        before = book.top(watch) if watch else None
        book.seen_top()
        book.apply(diff(i + 2, i + 2, bids=b, asks=a))
        for p, q in b:
            ref["bid"].set(p, q)
        for p, q in a:
            ref["ask"].set(p, q)
        _check(book, ref)
        if watch and book.top(watch) != before:
            assert book.top_changed  # never a missed change of what readers see
    for p in probes:
        d = Decimal(p)
        assert book.bids.known(d) == ref["bid"].known(d)
        assert book.asks.known(d) == ref["ask"].known(d)
    copy = book.copy()
    _check(copy, ref)


decimals = st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,12})?\Z")


@given(a=decimals, b=decimals, scale=st.integers(0, 12))
def test_price_key_is_exact(a: str, b: str, scale: int) -> None:
    ka, kb = price_key(a, scale), price_key(b, scale)
    da, db = Decimal(a), Decimal(b)
    if ka is None or kb is None:
        frac = max(-da.normalize().as_tuple().exponent, -db.normalize().as_tuple().exponent)  # type: ignore[operator]
        assert frac > scale
        return
    assert ka == da.scaleb(scale)
    assert (ka < kb) == (da < db) and (ka == kb) == (da == db)


# -- decode_diff against the generic path --------------------------------------------------------

_strings = st.one_of(
    decimals,
    st.sampled_from(["0", "0.000", "", ".5", "5.", "1.2.3", "-1", "1e3", "NaN", " 1", "1 ", "x"]),
    st.from_regex(r"\A[0-9]{38,42}(\.[0-9]{1,3})?\Z"),
)
_items: Any = st.one_of(
    st.tuples(_strings, _strings).map(list),
    st.lists(_strings, max_size=3),
    st.just([1, "1"]),
)
_sides = st.lists(_items, max_size=6)


def _frame(b: Any, a: Any, u: int, spaced: bool) -> bytes:
    payload = {"e": "depthUpdate", "E": 1_700_000_000_000, "s": "BTCUSDT", "U": 5, "u": u}
    payload.update({"b": b, "a": a})
    if spaced:
        return json.dumps(payload).encode()  # ", " and ": ": not the compact form
    return msgspec.json.encode(payload)


@settings(max_examples=400, deadline=None)
@given(b=_sides, a=_sides, u=st.sampled_from([4, 5, 9, 2**63 - 1, 2**63]), spaced=st.booleans())
def test_decode_diff_agrees_with_parse_diff(b: Any, a: Any, u: int, spaced: bool) -> None:
    raw = _frame(b, a, u, spaced)
    fast = decode_diff(raw, symbol="BTCUSDT")
    try:
        slow = parse_diff(json.loads(raw), symbol="BTCUSDT")
    except DepthDataError:
        assert fast is None
        return
    if not spaced:
        assert fast is not None  # Binance's compact frames take the fast path
    if fast is None:
        return
    assert fast.update == slow
    kw: dict[str, Any] = {
        "symbol": "BTCUSDT",
        "first_update_id": slow.first_update_id,
        "last_update_id": slow.last_update_id,
        "event_time_ms": 1,
        "ingested_at_ms": 2,
        "stream": "btcusdt@depth@100ms",
    }
    assert publish.depth_value_raw(
        bids_json=fast.bids_json, asks_json=fast.asks_json, **kw
    ) == publish.depth_value(bids=slow.bids, asks=slow.asks, **kw)
