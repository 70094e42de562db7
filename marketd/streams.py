"""Binance stream names: parse, validate and shard them.

Pure module, shared by the configuration (which validates `binance.streams` with it) and ingest.
Receives the configured stream list, returns `StreamSpec`s, and splits them over
connections (at most 1024 streams each, docs/binance.md §2) and over ingest instances
(`--shard K/N`).
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Sequence

import attrs

from marketd.errors import StreamNameError

# All 16 kline intervals, case-sensitive: 1m is a minute, 1M a month (docs/binance.md §4.3).
KLINE_INTERVALS: tuple[str, ...] = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h",
    "1d", "3d", "1w", "1M",
)  # fmt: skip
ROLLING_WINDOWS: tuple[str, ...] = ("1h", "4h", "1d")
MAX_STREAMS_PER_CONNECTION = 1024

_INTERVAL_MS: dict[str, int] = {
    "1s": 1_000, "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000,
    "30m": 1_800_000, "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000,
    "6h": 21_600_000, "8h": 28_800_000, "12h": 43_200_000, "1d": 86_400_000,
    "3d": 259_200_000, "1w": 604_800_000, "1M": 31 * 86_400_000,
}  # fmt: skip


def interval_ms(interval: str) -> int:
    """Nominal length of a kline interval in ms (a month counts as its longest, 31 days)."""
    return _INTERVAL_MS[interval]


class StreamKind(enum.StrEnum):
    """What a stream carries; the values are the `[routes]` keys for the non-core kinds."""

    TRADE = "trade"
    AGG_TRADE = "aggTrade"
    KLINE = "kline"
    TICKER = "ticker"
    MINI_TICKER = "miniTicker"
    ROLLING_TICKER = "rollingTicker"
    BOOK_TICKER = "bookTicker"
    AVG_PRICE = "avgPrice"
    REFERENCE_PRICE = "referencePrice"
    BLOCK_TRADE = "blockTrade"
    DEPTH = "depth"  # diff depth: <symbol>@depth[@100ms], feeds a local order book
    DEPTH_PARTIAL = "depthPartial"  # partial book: <symbol>@depth<5|10|20>[@100ms]


# Kinds with their own `[topics]` entries (not routed through `[routes]`).
TOPIC_KINDS: tuple[StreamKind, ...] = (
    StreamKind.TRADE,
    StreamKind.KLINE,
    StreamKind.TICKER,
    StreamKind.DEPTH,
    StreamKind.DEPTH_PARTIAL,
)
ROUTED_KINDS: tuple[StreamKind, ...] = tuple(k for k in StreamKind if k not in TOPIC_KINDS)
PARTIAL_DEPTHS: tuple[int, ...] = (5, 10, 20)


@attrs.frozen
class StreamSpec:
    """One validated stream name. `symbol` is upper-case, or None for all-market streams."""

    name: str
    kind: StreamKind
    symbol: str | None
    interval: str | None = None
    window: str | None = None
    timezone: str | None = None
    depth: int | None = None  # levels per side of a partial book stream (5, 10, 20)
    update_ms: int | None = None  # depth streams: 1000 or 100 (the @100ms suffix)

    @property
    def all_market(self) -> bool:
        return self.symbol is None


_TZ_RE = re.compile(r"^[+-]\d{2}:\d{2}$")
_SIMPLE_KINDS = {
    "trade": StreamKind.TRADE,
    "aggTrade": StreamKind.AGG_TRADE,
    "ticker": StreamKind.TICKER,
    "miniTicker": StreamKind.MINI_TICKER,
    "bookTicker": StreamKind.BOOK_TICKER,
    "avgPrice": StreamKind.AVG_PRICE,
    "referencePrice": StreamKind.REFERENCE_PRICE,
    "blockTrade": StreamKind.BLOCK_TRADE,
}
_ALLOWED_HINT = (
    "allowed: <symbol>@trade, @aggTrade, @kline_<interval>[@+08:00], @ticker, @miniTicker, "
    "@ticker_<1h|4h|1d>, @bookTicker, @avgPrice, @referencePrice, @blockTrade, "
    "@depth[@100ms], @depth<5|10|20>[@100ms], "
    "!miniTicker@arr, !ticker_<1h|4h|1d>@arr; intervals: " + " ".join(KLINE_INTERVALS)
)


def _check_symbol(symbol: str, name: str) -> str:
    # Symbols may start with digits (1000SATSUSDT) or be non-ASCII (docs/binance.md §7.8), but
    # stream names always carry them in lower case.
    if not symbol or any(ch.isspace() or ch in "@/!?&#%\"'" for ch in symbol):
        raise StreamNameError(f"{name!r}: bad symbol {symbol!r}")
    if symbol != symbol.lower():
        raise StreamNameError(
            f"{name!r}: symbols in stream names are lower-case ({symbol.lower()})"
        )
    return symbol.upper()


def parse_stream(name: str) -> StreamSpec:
    """Validate one stream name; raises StreamNameError saying what is allowed."""
    raw = name
    name = name.strip()
    if not name:
        raise StreamNameError("empty stream name")
    if name.startswith("!"):
        return _parse_all_market(name)
    parts = name.split("@")
    if len(parts) < 2:
        raise StreamNameError(f"{raw!r}: expected <symbol>@<kind>; {_ALLOWED_HINT}")
    symbol = _check_symbol(parts[0], name)
    kind, rest = parts[1], parts[2:]
    if kind.startswith("depth"):
        return _parse_depth(name, symbol, kind, rest)
    if kind in _SIMPLE_KINDS and not rest:
        return StreamSpec(name, _SIMPLE_KINDS[kind], symbol)
    if kind.startswith("kline_"):
        interval = kind.removeprefix("kline_")
        if interval not in KLINE_INTERVALS:
            raise StreamNameError(
                f"{name!r}: unknown kline interval {interval!r}; "
                f"allowed: {' '.join(KLINE_INTERVALS)}"
            )
        tz = None
        if rest:
            if len(rest) != 1 or not _TZ_RE.match(rest[0]) or rest[0] != "+08:00":
                raise StreamNameError(f"{name!r}: the only kline timezone suffix is @+08:00")
            tz = rest[0]
        return StreamSpec(name, StreamKind.KLINE, symbol, interval=interval, timezone=tz)
    if kind.startswith("ticker_") and not rest:
        window = kind.removeprefix("ticker_")
        if window not in ROLLING_WINDOWS:
            raise StreamNameError(f"{name!r}: rolling-window tickers are 1h, 4h or 1d")
        return StreamSpec(name, StreamKind.ROLLING_TICKER, symbol, window=window)
    raise StreamNameError(f"{raw!r}: unknown stream kind {kind!r}; {_ALLOWED_HINT}")


def _parse_depth(name: str, symbol: str, kind: str, rest: list[str]) -> StreamSpec:
    """`@depth`, `@depth@100ms` (diff) and `@depth<5|10|20>[@100ms]` (partial), docs/books.md §1."""
    levels = kind.removeprefix("depth")
    if levels and (not levels.isdigit() or int(levels) not in PARTIAL_DEPTHS):
        raise StreamNameError(f"{name!r}: partial depth streams are @depth5, @depth10 or @depth20")
    if rest not in ([], ["100ms"]):
        raise StreamNameError(f"{name!r}: the only depth speed suffix is @100ms")
    update_ms = 100 if rest == ["100ms"] else 1000
    if not levels:
        return StreamSpec(name, StreamKind.DEPTH, symbol, update_ms=update_ms)
    return StreamSpec(
        name, StreamKind.DEPTH_PARTIAL, symbol, depth=int(levels), update_ms=update_ms
    )


def _parse_all_market(name: str) -> StreamSpec:
    if name == "!miniTicker@arr":
        return StreamSpec(name, StreamKind.MINI_TICKER, None)
    if name == "!ticker@arr":
        raise StreamNameError(
            "'!ticker@arr' was retired by Binance on 2026-03-26; "
            "use <symbol>@ticker or !miniTicker@arr"
        )
    if name == "!bookTicker":
        raise StreamNameError(
            "'!bookTicker' was removed by Binance in 2022-12; use <symbol>@bookTicker"
        )
    m = re.fullmatch(r"!ticker_(1h|4h|1d)@arr", name)
    if m:
        return StreamSpec(name, StreamKind.ROLLING_TICKER, None, window=m.group(1))
    raise StreamNameError(f"{name!r}: unknown all-market stream; {_ALLOWED_HINT}")


def parse_streams(names: Iterable[str]) -> tuple[StreamSpec, ...]:
    """Validate a stream list; duplicates are an error (they would publish every event twice)."""
    specs: list[StreamSpec] = []
    seen: set[str] = set()
    for name in names:
        spec = parse_stream(name)
        if spec.name in seen:
            raise StreamNameError(f"{spec.name!r} is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    if not specs:
        raise StreamNameError("no streams configured")
    return tuple(specs)


@attrs.frozen
class Shard:
    """This instance's slice of the stream list: `index` of `count`, 1-based (`--shard 2/4`)."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"{text!r}: expected K/N, e.g. 2/4")
        index, count = int(m.group(1)), int(m.group(2))
        if not 1 <= index <= count:
            raise ValueError(f"{text!r}: need 1 <= K <= N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, stream: str) -> bool:
        # A stable hash (not Python's salted hash()): every instance, on every machine and after
        # every restart, agrees on who owns a stream, and adding streams never moves others.
        digest = hashlib.blake2b(stream.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


def book_symbols(names: Iterable[str], chosen: Iterable[str] = ()) -> tuple[str, ...]:
    """Symbols whose local order book is kept: `chosen` (book.symbols) when given, else every
    symbol with a diff depth stream among `names` (binance.streams), in order."""
    picked = tuple(dict.fromkeys(s.strip().upper() for s in chosen if s.strip()))
    if picked:
        return picked
    return tuple(
        dict.fromkeys(
            spec.symbol
            for spec in parse_streams(names)
            if spec.kind is StreamKind.DEPTH and spec.symbol is not None
        )
    )


def shard_streams(specs: Sequence[StreamSpec], shard: Shard) -> tuple[StreamSpec, ...]:
    return tuple(s for s in specs if shard.owns(s.name))


def split_connections(
    specs: Sequence[StreamSpec], per_connection: int = MAX_STREAMS_PER_CONNECTION
) -> list[tuple[StreamSpec, ...]]:
    """Chunk streams into connections of at most `per_connection` (Binance allows 1024)."""
    if not 1 <= per_connection <= MAX_STREAMS_PER_CONNECTION:
        raise ValueError(f"per_connection must be 1..{MAX_STREAMS_PER_CONNECTION}")
    return [tuple(specs[i : i + per_connection]) for i in range(0, len(specs), per_connection)]
