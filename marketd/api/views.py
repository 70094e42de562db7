"""Pure JSON shaping of the ticker API: Redis hash fields in, response dicts out.

The contract is docs/contract.md §5 (responses) and §3 (the hash).

No Quart, trio or Redis here. Prices stay the exact strings that were stored; counts and times
become integers; `complete` says whether every hash field was present and well-formed, and
`age_ms` (now - event_time) lets a reader judge freshness instead of trusting a cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from marketd.tickers.rules import SYMBOL_RE

PRICE_FIELDS: Final = (
    "last_price", "price_change", "price_change_pct", "open", "high", "low", "volume",
    "quote_volume",
)  # fmt: skip
INT_FIELDS: Final = ("trades_count", "event_time", "updated_at")


class BadSymbol(ValueError):
    """The path segment is not a symbol (checked before any Redis access: no key injection)."""


def normalise_symbol(raw: str) -> str:
    # ASCII first: str.upper() maps some non-ASCII letters onto ASCII (U+0131 -> "I", "ß" -> "SS",
    # U+FB00 -> "FF"), which would let a malformed segment pass as (or collide with) a symbol.
    if not raw.isascii():
        raise BadSymbol(raw)
    symbol = raw.upper()
    if SYMBOL_RE.fullmatch(symbol) is None:
        raise BadSymbol(raw)
    return symbol


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def ticker_view(symbol: str, fields: Mapping[str, str], now_ms: int) -> dict[str, Any] | None:
    """The response object for one stored hash; None when there is no hash (absent, expired)."""
    if not fields:
        return None
    out: dict[str, Any] = {"symbol": symbol}
    complete = True
    for name in PRICE_FIELDS:
        value = fields.get(name)
        out[name] = value
        complete = complete and value is not None
    for name in INT_FIELDS:
        number = _int(fields.get(name))
        out[name] = number
        complete = complete and number is not None
    event_time = out["event_time"]
    out["age_ms"] = now_ms - event_time if event_time is not None else None
    out["complete"] = complete
    return out


def tickers_view(
    symbols: Sequence[str], rows: Sequence[Mapping[str, str]], now_ms: int
) -> dict[str, Any]:
    """GET /api/v1/tickers: every tracked ticker with data, and the tracked ones without."""
    tickers: list[dict[str, Any]] = []
    missing: list[str] = []
    for symbol, fields in zip(symbols, rows, strict=True):
        view = ticker_view(symbol, fields, now_ms)
        if view is None:
            missing.append(symbol)
        else:
            tickers.append(view)
    return {"tickers": tickers, "missing": missing, "count": len(tickers)}


def freshness(
    rows: Iterable[Mapping[str, str]], now_ms: int, stale_ms: float
) -> tuple[int, int, int]:
    """(fresh, stale, missing) over the tracked tickers; a hash without event_time is stale."""
    fresh = stale = missing = 0
    for fields in rows:
        if not fields:
            missing += 1
            continue
        event_time = _int(fields.get("event_time"))
        if event_time is not None and now_ms - event_time <= stale_ms:
            fresh += 1
        else:
            stale += 1
    return fresh, stale, missing


def health_view(
    *,
    redis_ok: bool,
    tracked: int,
    counts: tuple[int, int, int] | None,
    consumer_lag: int | None,
    last_message_age_ms: int | None,
) -> tuple[int, dict[str, Any]]:
    """GET /api/v1/ticker/health: 200 when Redis answers and at least half are fresh."""
    fresh, stale, missing = counts if counts is not None else (0, 0, tracked)
    ok = redis_ok and fresh * 2 >= tracked
    body = {
        "status": "ok" if ok else "degraded",
        "redis": redis_ok,
        "tracked": tracked,
        "fresh": fresh,
        "stale": stale,
        "missing": missing,
        "consumer_lag": consumer_lag,
        "last_message_age_ms": last_message_age_ms,
    }
    return (200 if ok else 503), body
