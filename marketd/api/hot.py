"""The two ticker reads that clients poll, answered in front of Quart.

    GET /api/v1/ticker/{symbol}     one ticker (400 malformed, 404 untracked or no data)
    GET /api/v1/tickers             every tracked ticker, and the tracked ones without data

`TickerReads` computes the answer (status and JSON body) of both; `HotReads` is raw ASGI that
serves those two GETs itself and passes every other request to the Quart app, which serves the
same answers for HEAD through the same `TickerReads`. Why a raw ASGI layer: these routes are
what pollers hammer, and Quart's per-request machinery (request context, routing, a two-task
nursery per request, response object) cost as much CPU as Hypercorn itself: measured with
bench/api.py, the API process served 0.6-0.7x of a bare Hypercorn-trio app, and the default
daemon (which shares the process with ingest) less (docs/performance.md §6). The answers,
status codes and headers are the same on both paths (tests/api/test_hot.py compares them).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import msgspec
import trio
from prometheus_client import Counter

from marketd.api.views import BadSymbol, normalise_symbol, ticker_view, tickers_view
from marketd.errors import StoreUnavailable
from marketd.logs import Throttle, get_logger
from marketd.metrics import FastHistogramCollector

log = get_logger(__name__)

TICKERS_PATH: Final = "/api/v1/tickers"
TICKER_PREFIX: Final = "/api/v1/ticker/"
TICKER_ROUTE: Final = "/api/v1/ticker/{symbol}"
TICKER_HEALTH_PATH: Final = "/api/v1/ticker/health"  # a Quart route of its own
READ_TIMEOUT_S: Final = 1.0  # every API read of Redis: a hung Redis answers 503 within twice this
JSON_HEADERS: Final = ((b"content-type", b"application/json"),)

_encode = msgspec.json.Encoder().encode
Answer = tuple[int, bytes]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _error(status: int, error: str, detail: str, **extra: Any) -> Answer:
    return status, _encode({"error": error, "detail": detail, **extra})


class TickerReads:
    """Status and JSON body of the two ticker reads, from a batched Redis `read`."""

    def __init__(
        self,
        read: Callable[[Sequence[str]], Awaitable[list[dict[str, str]]]],
        tracked: Sequence[str],
    ) -> None:
        self._read = read
        self.tracked = tuple(tracked)
        self._tracked_set = frozenset(self.tracked)

    async def _rows(self, symbols: Sequence[str]) -> list[dict[str, str]] | Answer:
        try:
            with trio.fail_after(READ_TIMEOUT_S * 2):
                return await self._read(symbols)
        except StoreUnavailable as exc:
            return _error(503, "redis_unavailable", str(exc))
        except trio.TooSlowError:
            detail = f"Redis did not answer in {READ_TIMEOUT_S * 2:g}s"
            return _error(503, "redis_unavailable", detail)

    async def one(self, raw_symbol: str) -> Answer:
        try:
            symbol = normalise_symbol(raw_symbol)
        except BadSymbol:
            detail = "a symbol is 2 to 30 letters or digits"
            return _error(400, "invalid_symbol", detail, symbol=raw_symbol[:64])
        if symbol not in self._tracked_set:
            return _error(404, "unknown_symbol", "this symbol is not tracked", symbol=symbol)
        rows = await self._rows((symbol,))
        if isinstance(rows, tuple):
            return rows
        view = ticker_view(symbol, rows[0], _now_ms())
        if view is None:
            return _error(404, "no_data", "tracked, but no data yet or expired", symbol=symbol)
        return 200, _encode(view)

    async def all(self) -> Answer:
        rows = await self._rows(self.tracked)
        if isinstance(rows, tuple):
            return rows
        return 200, _encode(tickers_view(self.tracked, rows, _now_ms()))


class HotReads:
    """ASGI: GET of the two ticker reads served here, with the API's request metrics; every
    other request (other paths and methods, HEAD included) goes to `app` unchanged."""

    def __init__(
        self,
        app: Any,
        reads: TickerReads,
        requests: Counter,
        latency: FastHistogramCollector,
    ) -> None:
        self.app = app
        self.reads = reads
        self._requests = requests
        self._latency = {r: latency.labels(r) for r in (TICKERS_PATH, TICKER_ROUTE)}
        self._counts: dict[tuple[str, int], Any] = {}  # (route, status) -> counter child
        self._unexpected = Throttle(60.0)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == TICKERS_PATH:
            route = TICKERS_PATH
        elif (
            path.startswith(TICKER_PREFIX)
            and len(path) > len(TICKER_PREFIX)
            and path != TICKER_HEALTH_PATH
        ):
            route = TICKER_ROUTE
        else:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        try:
            if route is TICKERS_PATH:
                status, body = await self.reads.all()
            else:
                status, body = await self.reads.one(path[len(TICKER_PREFIX) :])
        except Exception as exc:  # every answer is JSON, a bug's included
            suppressed = self._unexpected.should_log("api.unhandled", trio.current_time())
            if suppressed is not None:
                log.error("api.unhandled", path=path, suppressed=suppressed, exc_info=exc)
            detail = "unexpected server error; see the server log"
            status, body = _error(500, "internal_error", detail)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*JSON_HEADERS, (b"content-length", b"%d" % len(body))],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            self._count(route, status)
            self._latency[route].observe(time.perf_counter() - t0)

    def _count(self, route: str, status: int) -> None:
        child = self._counts.get((route, status))
        if child is None:
            child = self._counts[(route, status)] = self._requests.labels(route, str(status))
        child.inc()
