"""Stream names the fake exchange understands (Binance's grammar, docs/binance.md §1, §4).

Receives names from URLs (percent-decoded here) and SUBSCRIBE params; emits `Sub`s saying what
to send. Streams Binance has but the simulator does not produce (referencePrice, blockTrade,
!ticker_<w>@arr) are accepted and stay silent, like a symbol with no trades.
"""

from __future__ import annotations

import enum
import re
from urllib.parse import unquote

import attrs

from marketd.testing.fake_exchange.stats import KLINE_INTERVALS, US, parse_tz


class Kind(enum.Enum):
    TRADE = "trade"
    AGG_TRADE = "aggTrade"
    BOOK_TICKER = "bookTicker"
    KLINE = "kline"
    TICKER = "ticker"
    MINI_TICKER = "miniTicker"
    ALL_MINI_TICKERS = "!miniTicker@arr"
    ROLLING_TICKER = "rollingTicker"
    AVG_PRICE = "avgPrice"
    DEPTH = "depth"  # diff events
    DEPTH_PARTIAL = "depthPartial"  # top 5/10/20 levels
    SILENT = "silent"


TAPE_KINDS = frozenset({Kind.TRADE, Kind.AGG_TRADE, Kind.BOOK_TICKER})
MAX_STREAMS = 1024  # per connection (docs/binance.md §2)


@attrs.frozen
class Sub:
    name: str
    kind: Kind
    symbol: str | None  # upper case; None for all-market streams
    interval: str | None = None
    tz_us: int = 0
    window: str | None = None
    levels: int | None = None  # partial depth: 5, 10 or 20
    period_ms: int = 1000  # depth streams: 1000 or 100 (`@100ms`)


class BadStream(ValueError):
    pass


_SIMPLE = {
    "trade": Kind.TRADE,
    "aggTrade": Kind.AGG_TRADE,
    "bookTicker": Kind.BOOK_TICKER,
    "ticker": Kind.TICKER,
    "miniTicker": Kind.MINI_TICKER,
    "avgPrice": Kind.AVG_PRICE,
    "referencePrice": Kind.SILENT,
    "blockTrade": Kind.SILENT,
}
_DEPTH = re.compile(r"depth(5|10|20)?(@100ms|@1000ms)?")
_ROLLING_WINDOWS = ("1h", "4h", "1d")


def parse(name: str) -> Sub:
    """One stream name -> Sub; raises BadStream for anything Binance would not accept."""
    if name == "!miniTicker@arr":
        return Sub(name, Kind.ALL_MINI_TICKERS, None)
    if re.fullmatch(r"!ticker_(1h|4h|1d)@arr", name):
        return Sub(name, Kind.SILENT, None)
    sym, at, rest = name.partition("@")
    if not at or not sym or sym != sym.lower() or any(c in sym for c in "!/ "):
        raise BadStream(name)
    symbol = sym.upper()
    if rest in _SIMPLE:
        return Sub(name, _SIMPLE[rest], symbol)
    depth = _DEPTH.fullmatch(rest)
    if depth:
        levels = int(depth.group(1)) if depth.group(1) else None
        period = 100 if depth.group(2) == "@100ms" else 1000
        kind = Kind.DEPTH if levels is None else Kind.DEPTH_PARTIAL
        return Sub(name, kind, symbol, levels=levels, period_ms=period)
    if rest.startswith("kline_"):
        interval, _, tz = rest.removeprefix("kline_").partition("@")
        if interval not in KLINE_INTERVALS or (tz and tz != "+08:00"):
            raise BadStream(name)
        return Sub(name, Kind.KLINE, symbol, interval=interval, tz_us=parse_tz(tz) if tz else 0)
    if rest.startswith("ticker_") and rest.removeprefix("ticker_") in _ROLLING_WINDOWS:
        return Sub(name, Kind.ROLLING_TICKER, symbol, window=rest.removeprefix("ticker_"))
    raise BadStream(name)


WINDOW_US = {"1h": 3600 * US, "4h": 4 * 3600 * US, "1d": 86400 * US}


@attrs.frozen
class Target:
    """A parsed WebSocket request target."""

    combined: bool
    micros: bool
    streams: tuple[str, ...]


def parse_target(target: str) -> Target:
    """`/stream?streams=a/b`, `/ws`, `/ws/a/b`, each with optional `timeUnit=`.

    Stream names may be percent-encoded (docs/binance.md §1). The query is split by hand: `+` is a
    literal plus here (`@+08:00`), not a space as in form encoding.
    """
    path, _, query = target.partition("?")
    params: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        params[unquote(key)] = value
    unit = unquote(params.get("timeUnit", "MILLISECOND"))
    if unit.upper() not in ("MILLISECOND", "MICROSECOND") or unit not in (
        unit.upper(),
        unit.lower(),
    ):
        raise BadStream(f"timeUnit={unit}")
    micros = unit.upper() == "MICROSECOND"
    if path == "/stream":
        names = tuple(n for n in unquote(params.get("streams", "")).split("/") if n)
        return Target(True, micros, names)
    if path == "/ws" or path.startswith("/ws/"):
        names = tuple(n for n in unquote(path.removeprefix("/ws")).split("/") if n)
        return Target(False, micros, names)
    raise BadStream(f"unknown path {path}")
