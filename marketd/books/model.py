"""Depth payloads as the books core takes them: validated levels, diff events and snapshots.

Receives decoded JSON (the `data` of a diff or partial-depth frame, the body of a REST
`/api/v3/depth` answer); returns frozen records whose prices and quantities are the exact decimal
strings received, or raises `DepthDataError` naming what was wrong. `decode_diff` is the fast
path of a diff frame's own bytes in Binance's compact form (one typed decode, the level arrays
checked by one pattern each and kept as bytes for the record). Formats: docs/books.md.
Pure: no I/O, no threads.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgspec

INT64_MAX: Final = 2**63 - 1
MAX_SNAPSHOT_LIMIT: Final = 5000  # REST /api/v3/depth (docs/books.md, "REST snapshot")
PARTIAL_DEPTHS: Final = (5, 10, 20)

# A plain, non-negative decimal: what Binance sends for prices and quantities. Rules out signs,
# exponents, NaN and Infinity (Decimal("NaN") would parse), spaces and empty strings, and more
# than 40 digits on either side of the point (Binance's largest, a capped quantity, has 11 + 8;
# the book turns prices into integers, and a string of thousands of digits is no price).
_UDEC = re.compile(r"[0-9]{1,40}(?:\.[0-9]{1,40})?")
# The same, as one pattern over a whole `[[price, qty], ...]` array in compact JSON (no spaces,
# no escapes), plus a search for a zero price (a string of zeros and dots right after `["`):
# every string they pass is one `_UDEC` accepts, so a frame they pass needs no check per level.
# Possessive quantifiers leave nothing to backtrack into (about half the time of the plain form).
_RAW_DEC = rb"[0-9]{1,40}+(?:\.[0-9]{1,40}+)?+"
_RAW_LEVEL = rb'\["' + _RAW_DEC + rb'","' + _RAW_DEC + rb'"\]'
_RAW_SIDE = re.compile(rb"\[(?:" + _RAW_LEVEL + rb"(?:," + _RAW_LEVEL + rb")*+)?+\]")
_RAW_ZERO_PRICE = re.compile(rb'\["[0.]*+"')


def _raw_side_ok(side: msgspec.Raw) -> bool:
    """Whether a compact `[[price, qty], ...]` array holds only plain decimals, prices > 0."""
    if _RAW_SIDE.fullmatch(side) is None:
        return False
    return _RAW_ZERO_PRICE.search(side) is None


_STREAM = re.compile(r"(?P<sym>[^@/!\s]+)@depth(?P<levels>5|10|20)?(?:@(?P<ms>100|1000)ms)?")


class Level(NamedTuple):
    """One price level exactly as received: price and quantity as decimal strings."""

    price: str
    qty: str


def is_zero(qty: str) -> bool:
    """Whether a validated quantity string is zero ("0", "0.00000000"): the level goes away."""
    return not qty.strip("0.")


class DepthError(enum.Enum):
    """Why a depth payload was refused (the dead-letter reason)."""

    BAD_LEVEL = "bad_level"  # a price/quantity that is not a plain non-negative decimal, price 0
    BAD_FIELD = "bad_field"  # a missing field or one of the wrong JSON type
    BAD_ID = "bad_id"  # an update id outside 0..2^63-1, or U > u
    WRONG_SYMBOL = "wrong_symbol"  # `s` differs from the stream's symbol
    WRONG_EVENT = "wrong_event"  # `e` is not "depthUpdate"
    TOO_DEEP = "too_deep"  # a partial book with more levels than its stream name says


class DepthDataError(ValueError):
    def __init__(self, reason: DepthError, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True, kw_only=True)
class DepthUpdate:
    """A diff event (`<symbol>@depth[@100ms]`): update ids U..u and the levels that changed."""

    symbol: str
    first_update_id: int  # U
    last_update_id: int  # u
    event_time_ms: int | None  # E (None when the caller has none, e.g. in tests)
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RawDiff:
    """A diff decoded by `decode_diff`: the update, and its `b` and `a` arrays as the frame's own
    bytes (compact JSON, exactly what encoding `update.bids` / `update.asks` would give)."""

    update: DepthUpdate
    bids_json: msgspec.Raw
    asks_json: msgspec.Raw


@dataclass(frozen=True, slots=True, kw_only=True)
class DepthSnapshot:
    """A REST snapshot: the top `limit` levels per side at update id `last_update_id`.

    A side with `limit` levels may be cut short: what lies beyond its last level is unknown.
    """

    symbol: str
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialDepth:
    """A partial-book frame (`<symbol>@depth<5|10|20>[@100ms]`): the top `depth` levels."""

    symbol: str
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    depth: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DepthStream:
    """A parsed depth stream name. `levels` None = the diff stream; 5/10/20 = partial book."""

    name: str
    symbol: str  # upper case
    levels: int | None
    interval_ms: int  # 1000 (default) or 100

    @property
    def is_diff(self) -> bool:
        return self.levels is None


def parse_depth_stream(name: str) -> DepthStream | None:
    """`btcusdt@depth`, `btcusdt@depth@100ms`, `btcusdt@depth20@100ms`, ...; None otherwise."""
    m = _STREAM.fullmatch(name)
    if m is None or m["sym"] != m["sym"].lower():
        return None
    levels = int(m["levels"]) if m["levels"] else None
    return DepthStream(
        name=name, symbol=m["sym"].upper(), levels=levels, interval_ms=int(m["ms"] or 1000)
    )


def snapshot_weight(limit: int) -> int:
    """REQUEST_WEIGHT of `GET /api/v3/depth?limit=N` (docs/books.md, "REST snapshot")."""
    if not 1 <= limit <= MAX_SNAPSHOT_LIMIT:
        raise ValueError(f"depth limit must be within 1..{MAX_SNAPSHOT_LIMIT}, not {limit!r}")
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    return 50 if limit <= 1000 else 250


# -- validation -----------------------------------------------------------------------------------


def _update_id(payload: Mapping[str, Any], key: str) -> int:
    value = payload.get(key)
    if type(value) is not int:  # bool is an int subclass: refused too
        raise DepthDataError(DepthError.BAD_FIELD, f"{key}={value!r} is not an integer")
    if not 0 <= value <= INT64_MAX:
        raise DepthDataError(DepthError.BAD_ID, f"{key}={value} outside 0..2^63-1")
    return value


def parse_levels(raw: Any, field: str) -> tuple[Level, ...]:
    """`[[price, qty], ...]` -> Levels; price > 0 and qty >= 0, both plain decimal strings."""
    if not isinstance(raw, list):
        raise DepthDataError(DepthError.BAD_FIELD, f"{field} is not a list")
    out: list[Level] = []
    match = _UDEC.fullmatch
    for i, item in enumerate(raw):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise DepthDataError(DepthError.BAD_LEVEL, f"{field}[{i}]={item!r} is not [price, qty]")
        price, qty = item
        if (
            type(price) is not str
            or type(qty) is not str
            or match(price) is None
            or match(qty) is None
            or is_zero(price)
        ):
            raise DepthDataError(DepthError.BAD_LEVEL, f"{field}[{i}]={item!r}")
        out.append(Level(price, qty))
    return tuple(out)


def parse_diff(payload: Any, *, symbol: str | None = None) -> DepthUpdate:
    """A diff event's payload -> DepthUpdate. `symbol`: the stream's (upper case), checked."""
    if not isinstance(payload, Mapping):
        raise DepthDataError(DepthError.BAD_FIELD, "payload is not an object")
    if payload.get("e") != "depthUpdate":
        raise DepthDataError(DepthError.WRONG_EVENT, f"e={payload.get('e')!r}")
    sym = payload.get("s")
    if type(sym) is not str or not sym:
        raise DepthDataError(DepthError.BAD_FIELD, f"s={sym!r}")
    if symbol is not None and sym != symbol:
        raise DepthDataError(DepthError.WRONG_SYMBOL, f"s={sym!r} on a {symbol} stream")
    event_time = payload.get("E")
    if type(event_time) is not int or not 0 <= event_time <= INT64_MAX:
        raise DepthDataError(DepthError.BAD_FIELD, f"E={event_time!r}")
    first = _update_id(payload, "U")
    last = _update_id(payload, "u")
    if first > last:
        raise DepthDataError(DepthError.BAD_ID, f"U={first} > u={last}")
    return DepthUpdate(
        symbol=sym,
        first_update_id=first,
        last_update_id=last,
        event_time_ms=event_time,
        bids=parse_levels(payload.get("b"), "b"),
        asks=parse_levels(payload.get("a"), "a"),
    )


class _DiffWire(msgspec.Struct):
    e: str
    E: int
    s: str
    U: int
    u: int
    b: msgspec.Raw
    a: msgspec.Raw


_DIFF_WIRE = msgspec.json.Decoder(_DiffWire)
_LEVELS = msgspec.json.Decoder(tuple[Level, ...])  # Levels made in C


def decode_diff(data: bytes | str | msgspec.Raw, *, symbol: str | None = None) -> RawDiff | None:
    """A diff event's own bytes in Binance's compact form -> RawDiff, with every check
    `parse_diff` makes. None when the frame is anything else (spaces or escapes in its level
    arrays, a wrong type, a missing field, a bad value): the caller then decodes it generically
    and `parse_diff` accepts it or says what is wrong (docs/performance.md §8)."""
    try:
        w = _DIFF_WIRE.decode(data)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None
    b, a = w.b, w.a
    if (
        w.e != "depthUpdate"
        or not w.s
        or (symbol is not None and w.s != symbol)
        or not 0 <= w.E <= INT64_MAX
        or not 0 <= w.U <= w.u <= INT64_MAX
        or not _raw_side_ok(b)
        or not _raw_side_ok(a)
    ):
        return None
    update = DepthUpdate(
        symbol=w.s,
        first_update_id=w.U,
        last_update_id=w.u,
        event_time_ms=w.E,
        bids=_LEVELS.decode(b),
        asks=_LEVELS.decode(a),
    )
    return RawDiff(update=update, bids_json=b, asks_json=a)


def _book_body(payload: Any) -> tuple[int, tuple[Level, ...], tuple[Level, ...]]:
    if not isinstance(payload, Mapping):
        raise DepthDataError(DepthError.BAD_FIELD, "payload is not an object")
    last = _update_id(payload, "lastUpdateId")
    return (
        last,
        parse_levels(payload.get("bids"), "bids"),
        parse_levels(payload.get("asks"), "asks"),
    )


def parse_snapshot(payload: Any, *, symbol: str, limit: int) -> DepthSnapshot:
    """A REST `/api/v3/depth?symbol=&limit=` body -> DepthSnapshot (the `limit` that was asked)."""
    last, bids, asks = _book_body(payload)
    for side, levels in (("bids", bids), ("asks", asks)):
        if len(levels) > limit:
            raise DepthDataError(DepthError.TOO_DEEP, f"{len(levels)} {side} for limit {limit}")
    return DepthSnapshot(symbol=symbol, last_update_id=last, bids=bids, asks=asks, limit=limit)


def parse_partial(payload: Any, *, symbol: str, depth: int) -> PartialDepth:
    """A partial-book payload (no e/E/s on the wire: the symbol comes from the stream name)."""
    last, bids, asks = _book_body(payload)
    for side, levels in (("bids", bids), ("asks", asks)):
        if len(levels) > depth:
            raise DepthDataError(DepthError.TOO_DEEP, f"{len(levels)} {side} on a depth{depth}")
    return PartialDepth(symbol=symbol, last_update_id=last, bids=bids, asks=asks, depth=depth)


def levels_json(levels: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Levels as the wire and the record contract write them: `[[price, qty], ...]`."""
    return [[price, qty] for price, qty in levels]
