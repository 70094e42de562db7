"""Builders for the books tests: diffs, snapshots and a reference book as plain dicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from marketd.books import DepthSnapshot, DepthUpdate, Level, OrderBook

SYM = "BTCUSDT"


def lv(pairs: Iterable[tuple[str, str]]) -> tuple[Level, ...]:
    return tuple(Level(p, q) for p, q in pairs)


def diff(
    first: int,
    last: int,
    bids: Iterable[tuple[str, str]] = (),
    asks: Iterable[tuple[str, str]] = (),
    *,
    event_time_ms: int | None = None,
) -> DepthUpdate:
    return DepthUpdate(
        symbol=SYM,
        first_update_id=first,
        last_update_id=last,
        event_time_ms=event_time_ms,
        bids=lv(bids),
        asks=lv(asks),
    )


def snap(
    last: int,
    bids: Iterable[tuple[str, str]] = (),
    asks: Iterable[tuple[str, str]] = (),
    *,
    limit: int = 5000,
) -> DepthSnapshot:
    return DepthSnapshot(symbol=SYM, last_update_id=last, bids=lv(bids), asks=lv(asks), limit=limit)


def as_dict(book: OrderBook) -> tuple[dict[Decimal, str], dict[Decimal, str]]:
    return (
        {p: level.qty for p, level in book.bids.items()},
        {p: level.qty for p, level in book.asks.items()},
    )


def top_snapshot(
    last: int, bids: Mapping[Decimal, str], asks: Mapping[Decimal, str], limit: int
) -> DepthSnapshot:
    """The exchange's answer to /api/v3/depth?limit=: the best `limit` levels per side."""
    b = sorted(bids.items(), reverse=True)[:limit]
    a = sorted(asks.items())[:limit]
    return DepthSnapshot(
        symbol=SYM,
        last_update_id=last,
        bids=tuple(Level(str(p), q) for p, q in b),
        asks=tuple(Level(str(p), q) for p, q in a),
        limit=limit,
    )
