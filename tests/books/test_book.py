"""The order book: exact levels, removal at quantity 0, top-N, crossed, bounded depth."""

from __future__ import annotations

from decimal import Decimal

from marketd.books import Level, OrderBook
from tests.books.helpers import as_dict, diff, snap


def test_snapshot_then_diffs() -> None:
    book = OrderBook()
    book.load(snap(10, bids=[("100.0", "1"), ("99.5", "2")], asks=[("101", "3")]))
    book.apply(diff(11, 12, bids=[("100.00", "0"), ("99.9", "5")], asks=[("102", "1")]))
    bids, asks = book.top(5)
    assert bids == [Level("99.9", "5"), Level("99.5", "2")]  # "100.00" removed "100.0": same price
    assert asks == [Level("101", "3"), Level("102", "1")]
    assert book.last_update_id == 12


def test_quantity_strings_are_kept_as_received() -> None:
    book = OrderBook()
    book.load(snap(1, bids=[("1.10000000", "2.50000000")]))
    book.apply(diff(2, 2, bids=[("1.1", "3.00")]))
    assert book.bids.top(1) == [Level("1.1", "3.00")]


def test_removing_an_absent_level_is_harmless() -> None:
    book = OrderBook()
    book.load(snap(1, bids=[("1", "1")]))
    book.apply(diff(2, 2, bids=[("2", "0")], asks=[("3", "0.000")]))
    assert as_dict(book) == ({Decimal(1): "1"}, {})


def test_crossed() -> None:
    book = OrderBook()
    book.load(snap(1, bids=[("10", "1")], asks=[("11", "1")]))
    assert not book.crossed()
    book.apply(diff(2, 2, bids=[("11", "1")]))
    assert book.crossed()


def test_top_n_best_first() -> None:
    book = OrderBook()
    book.load(
        snap(
            1,
            bids=[(str(p), "1") for p in range(1, 50)],
            asks=[(str(p), "1") for p in range(50, 99)],
        )
    )
    bids, asks = book.top(3)
    assert [b.price for b in bids] == ["49", "48", "47"]
    assert [a.price for a in asks] == ["50", "51", "52"]


def test_levels_beyond_max_are_dropped_and_counted() -> None:
    book = OrderBook(max_levels=3)
    book.load(snap(1, bids=[("10", "1"), ("9", "1"), ("8", "1"), ("7", "1")]))
    assert len(book.bids) == 3 and book.dropped_levels == 1
    book.apply(diff(2, 2, bids=[("11", "1")]))  # pushes 8 out
    assert [b.price for b in book.bids.top(5)] == ["11", "10", "9"]
    assert book.dropped_levels == 2
    # Beyond what is kept the side is unknown: a level there is not stored...
    book.apply(diff(3, 3, bids=[("7.5", "1")]))
    assert len(book.bids) == 3 and not book.bids.known(Decimal("7.5"))
    # ... while a new level inside the known range is.
    book.apply(diff(4, 4, bids=[("10", "0"), ("9.5", "1")]))
    assert [b.price for b in book.bids.top(5)] == ["11", "9.5", "9"]


def test_truncated_snapshot_side_knows_its_last_level() -> None:
    book = OrderBook()
    book.load(snap(1, asks=[("10", "1"), ("11", "1")], bids=[("9", "1")], limit=2))
    assert book.asks.known(Decimal("11")) and not book.asks.known(Decimal("11.5"))
    assert book.bids.horizon is None  # fewer levels than the limit: the whole side
    book.apply(diff(2, 2, asks=[("12", "4")]))
    assert len(book.asks) == 2


def test_copy_is_independent() -> None:
    book = OrderBook()
    book.load(snap(1, bids=[("1", "1")]))
    other = book.copy()
    other.apply(diff(2, 2, bids=[("1", "0")]))
    assert len(book.bids) == 1 and len(other.bids) == 0
