"""The order-book read API: GET /api/v1/book/{symbol}[?depth=N] from Redis `book:{SYMBOL}`.

Receives requests for the books this daemon keeps (`BookSettings.symbols`); reads the hash the
book writer stores (marketd/books/store.py) through the same batched, trio-native reader as the
tickers (marketd/api/reader.py: concurrent requests share one pipelined round trip), and answers
the book's top levels, its update id and age, 503 `out_of_sync` with the reason while the book
resynchronises. The pure shaping (`book_view`, `parse_depth`) is shared with the book stream
(marketd/api/stream.py). The reader task runs while the app serves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import msgspec
import trio
from quart import Blueprint, Response, current_app, request

from marketd import streams
from marketd.api.fanout import Pushed, id_key, sse_event
from marketd.api.hot import READ_TIMEOUT_S  # as the ticker reads: 503 within 2x this
from marketd.api.reader import TickerReader
from marketd.api.views import BadSymbol, normalise_symbol
from marketd.books.store import DEFAULT_REDIS_DEPTH, BookStore, book_key
from marketd.config import Config
from marketd.errors import StoreUnavailable
from marketd.logs import Throttle, get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)

_encode = msgspec.json.Encoder().encode
_levels = msgspec.json.Decoder(list[tuple[str, str]]).decode
_JSON = "application/json"


@attrs.frozen
class BookSettings:
    """Which books the API serves and how deep they are stored (book.symbols, book.redis_depth)."""

    symbols: tuple[str, ...]
    redis_depth: int = DEFAULT_REDIS_DEPTH


def book_symbols(cfg: Config) -> tuple[str, ...]:
    """Every symbol with a diff depth stream in binance.streams (book.symbols' default)."""
    return streams.book_symbols(cfg.binance.streams)


def settings(
    rt: Runtime,
    *,
    symbols: Sequence[str] | None = None,
    redis_depth: int = DEFAULT_REDIS_DEPTH,
) -> BookSettings:
    """`symbols` None or empty: every symbol with a diff depth stream."""
    chosen = tuple(s.strip().upper() for s in symbols or () if s.strip())
    return BookSettings(chosen or book_symbols(rt.config), redis_depth)


class BadDepth(ValueError):
    """`?depth=` is not an integer within 1..the Redis depth."""


def parse_depth(raw: str | None, redis_depth: int) -> int | None:
    """`?depth=N` -> N (1..redis_depth); None when absent (every stored level)."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        raise BadDepth(raw)
    depth = int(text)
    if not 1 <= depth <= redis_depth:
        raise BadDepth(raw)
    return depth


class CorruptBook(ValueError):
    """The stored hash is not a book as the writer stores it (something else wrote the key)."""


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return int(fields[name])
    except (KeyError, ValueError) as exc:
        raise CorruptBook(f"{name}={fields.get(name)!r}") from exc


def book_view(
    symbol: str, fields: Mapping[str, str], now_ms: int, depth: int | None = None
) -> dict[str, Any] | None:
    """The response object for one stored hash; None when there is none (absent, expired).

    Raises CorruptBook for a hash the writer did not produce.
    """
    if not fields:
        return None
    try:
        bids = _levels(fields.get("bids", ""))
        asks = _levels(fields.get("asks", ""))
    except msgspec.DecodeError as exc:
        raise CorruptBook(f"levels: {exc}") from exc
    in_sync = fields.get("in_sync")
    if in_sync not in ("true", "false"):
        raise CorruptBook(f"in_sync={in_sync!r}")
    event_time = _int(fields, "event_time")
    updated_at = _int(fields, "updated_at")
    # event_time 0: the keeper had no exchange time for it; age from the write instead.
    age_from = event_time if event_time > 0 else updated_at
    return {
        "symbol": symbol,
        "last_update_id": _int(fields, "last_update_id"),
        "event_time": event_time,
        "updated_at": updated_at,
        "bids": bids[:depth],
        "asks": asks[:depth],
        "age_ms": now_ms - age_from,
        "in_sync": in_sync == "true",
        "reason": None if in_sync == "true" else (fields.get("reason") or "unknown"),
    }


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encode(body), status=status, content_type=_JSON)


def _error(status: int, error: str, detail: str, **extra: Any) -> Response:
    return _json({"error": error, "detail": detail, **extra}, status)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def create_blueprint(
    rt: Runtime, books: BookSettings, *, reader: TickerReader | None = None
) -> Blueprint:
    """The book routes. Without `reader`, one is made on `rt.redis_url` (none: 503s)."""
    bp = Blueprint("book", __name__)
    tracked = frozenset(books.symbols)
    own_store: BookStore | None = None
    if reader is None and rt.redis_url is not None and books.symbols:
        own_store = BookStore(
            rt.redis_url, timeout_s=READ_TIMEOUT_S, client_name="marketd-api-books",
            max_connections=2,
        )  # fmt: skip
        reader = TickerReader(own_store, key=book_key, client_name="marketd-api-book-reads")
    the_reader = reader
    throttle = Throttle(60.0)

    @bp.before_app_serving
    async def _start_reader() -> None:
        if the_reader is not None:
            await current_app.nursery.start(the_reader.run)  # type: ignore[attr-defined]

    @bp.after_app_serving
    async def _stop_reader() -> None:
        if the_reader is not None:
            the_reader.stop()
            if own_store is not None:
                await the_reader.close_store()

    @bp.get("/api/v1/book/<path:symbol>")  # path: "BTC/USDT" is a malformed symbol, a 400
    async def book(symbol: str) -> Response:
        try:
            name = normalise_symbol(symbol)
        except BadSymbol:
            return _error(
                400, "invalid_symbol", "a symbol is 2 to 30 letters or digits", symbol=symbol[:64]
            )
        if name not in tracked:
            return _error(
                404, "unknown_symbol", "no order book is kept for this symbol", symbol=name
            )
        try:
            depth = parse_depth(request.args.get("depth"), books.redis_depth)
        except BadDepth:
            return _error(
                400,
                "invalid_depth",
                f"depth is an integer from 1 to {books.redis_depth}",
                depth=str(request.args.get("depth"))[:32],
            )
        if the_reader is None:
            raise StoreUnavailable("the API has no Redis (redis.url) to read books from")
        with trio.fail_after(READ_TIMEOUT_S * 2):
            (fields,) = await the_reader.read((name,))
        try:
            view = book_view(name, fields, _now_ms(), depth)
        except CorruptBook as exc:
            if throttle.should_log("corrupt", trio.current_time()) is not None:
                log.error("api.book_corrupt", symbol=name, key=book_key(name), detail=str(exc))
            return _error(500, "corrupt_book", "the stored book is unreadable", symbol=name)
        if view is None:
            return _error(404, "no_data", "no book stored yet, or expired", symbol=name)
        if not view["in_sync"]:
            return _error(
                503,
                "out_of_sync",
                "the book is resynchronising with the exchange",
                reason=view["reason"],
                symbol=name,
                last_update_id=view["last_update_id"],
            )
        return _json(view)

    return bp


# -- the book stream's updates (pure; the driver is marketd/api/stream.py) ----------------------


@attrs.frozen
class BookPushed(Pushed):
    """One stored book update (an entry of `books:updates`), encoded once per depth asked.

    `event_time` (of Pushed) is the time `age_ms` counts from; `view` is the book_view without
    age_ms. Clients of the same symbol and depth share the encoded body.
    """

    view: dict[str, Any]
    bodies: dict[int | None, bytes] = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def from_book_fields(
        cls, update_id: str, symbol: str, fields: Mapping[str, str]
    ) -> BookPushed | None:
        """None for an entry the writer did not produce (counted and logged by the caller)."""
        try:
            view = book_view(symbol, fields, 0)
        except CorruptBook:
            return None
        if view is None:
            return None
        age_from = -view.pop("age_ms")  # book_view(now=0) gave 0 - age_from
        return cls(
            id=update_id,
            key=id_key(update_id),
            symbol=symbol,
            event_time=age_from,
            body=b"",
            view=view,
        )

    def data(self, now_ms: int, depth: int | None) -> bytes:
        body = self.bodies.get(depth)
        if body is None:
            shown = self.view
            if depth is not None:
                shown = {**shown, "bids": shown["bids"][:depth], "asks": shown["asks"][:depth]}
            body = self.bodies[depth] = _encode(shown)[:-1]
        age = str(now_ms - (self.event_time or 0)).encode()
        return body + b',"age_ms":' + age + b"}"

    def event(self, now_ms: int) -> bytes:
        return self.book_event(now_ms, None)

    def book_event(self, now_ms: int, depth: int | None) -> bytes:
        return sse_event("book", self.data(now_ms, depth), self.id)
