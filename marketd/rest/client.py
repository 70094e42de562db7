"""Binance REST market-data client for backfill, on httpx (trio through anyio).

Every call reserves its documented weight in the shared `WeightBudget` first and reports the
response back to it. Responses are parsed strictly at the edge into typed rows (prices checked
as plain decimals: `Decimal('NaN')` parses, docs/binance.md §7.5); httpx and HTTP failures
become the errors in marketd.rest.errors. `aclose()` (or `async with`) closes the connection pool.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import httpx
import msgspec

from marketd.logs import Throttle, get_logger
from marketd.metrics import MetricsFactory
from marketd.rest.budget import WeightBudget
from marketd.rest.errors import (
    RestBadResponse,
    RestBanned,
    RestRateLimited,
    RestRejected,
    RestUnavailable,
)

log = get_logger(__name__)

T = TypeVar("T")

# Weights from docs/binance.md §5 (current values; aggTrades was raised 2 -> 4 on 2025-03-10).
WEIGHTS: Final = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/historicalTrades": 25,
    "/api/v3/aggTrades": 4,
    "/api/v3/klines": 2,
}
MAX_LIMIT: Final = 1000
SERVER_BUSY: Final = -1008
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class RestTrade(msgspec.Struct, frozen=True, rename="camel"):
    """One row of /api/v3/historicalTrades."""

    id: int
    price: str
    qty: str
    time: int
    is_buyer_maker: bool


class RestAggTrade(msgspec.Struct, frozen=True, rename={
    "agg_id": "a", "price": "p", "qty": "q", "first_id": "f", "last_id": "l", "time": "T",
    "is_buyer_maker": "m",
}):  # fmt: skip
    """One row of /api/v3/aggTrades (Binance's one-letter keys end here)."""

    agg_id: int
    price: str
    qty: str
    first_id: int
    last_id: int
    time: int
    is_buyer_maker: bool


class RestKline(msgspec.Struct, frozen=True, array_like=True):
    """One row of /api/v3/klines (an array; the trailing "ignore" element is dropped)."""

    open_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    close_time: int
    quote_volume: str
    trades_count: int
    taker_buy_base_volume: str
    taker_buy_quote_volume: str


class _ErrorBody(msgspec.Struct):
    code: int | None = None
    msg: str = ""


_trades = msgspec.json.Decoder(list[RestTrade])
_aggs = msgspec.json.Decoder(list[RestAggTrade])
_klines = msgspec.json.Decoder(list[RestKline])
_object = msgspec.json.Decoder(dict[str, Any])
_error = msgspec.json.Decoder(_ErrorBody)


class BinanceRest:
    def __init__(
        self,
        base_url: str,
        budget: WeightBudget,
        *,
        timeout_s: float = 10.0,
        metrics: MetricsFactory | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.budget = budget
        # One pool, keep-alive: backfill pages come in bursts to one host.
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            transport=transport,
            headers={"User-Agent": "marketd"},
            follow_redirects=False,
        )
        m = metrics or MetricsFactory()
        self._m_requests = m.counter(
            "rest_requests", "Binance REST requests by endpoint and outcome", ["endpoint", "status"]
        )
        self._m_seconds = m.histogram(
            "rest_request_seconds", "Binance REST request duration", ["endpoint"]
        )
        self._throttle = Throttle(60.0)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> BinanceRest:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- endpoints ------------------------------------------------------------------------------

    async def historical_trades(
        self, symbol: str, from_id: int, limit: int = MAX_LIMIT
    ) -> list[RestTrade]:
        """Trades of `symbol` with id >= from_id, oldest first, at most `limit`."""
        path = "/api/v3/historicalTrades"
        params = {"symbol": symbol, "fromId": from_id, "limit": _limit(limit)}
        rows = self._decode(path, _trades, await self._get(path, params))
        for row in rows:
            self._check_decimals(path, row.price, row.qty)
        return rows

    async def agg_trades(
        self, symbol: str, from_id: int, limit: int = MAX_LIMIT
    ) -> list[RestAggTrade]:
        """Aggregate trades of `symbol` with aggregate id >= from_id, oldest first."""
        path = "/api/v3/aggTrades"
        params = {"symbol": symbol, "fromId": from_id, "limit": _limit(limit)}
        rows = self._decode(path, _aggs, await self._get(path, params))
        for row in rows:
            self._check_decimals(path, row.price, row.qty)
        return rows

    async def klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int,
        limit: int = MAX_LIMIT,
        *,
        time_zone: str | None = None,
    ) -> list[RestKline]:
        """Klines with open time in [start_ms, end_ms], oldest first (the newest may be open)."""
        path = "/api/v3/klines"
        params: dict[str, Any] = {
            "symbol": symbol,
            "interval": interval,
            "startTime": start_ms,
            "endTime": end_ms,
            "limit": _limit(limit),
        }
        if time_zone is not None:
            params["timeZone"] = time_zone
        rows = self._decode(path, _klines, await self._get(path, params))
        for k in rows:
            self._check_decimals(
                path, k.open, k.high, k.low, k.close, k.volume, k.quote_volume,
                k.taker_buy_base_volume, k.taker_buy_quote_volume,
            )  # fmt: skip
        return rows

    async def exchange_info(self, symbols: list[str] | None = None) -> dict[str, Any]:
        path = "/api/v3/exchangeInfo"
        params = {"symbols": msgspec.json.encode(symbols).decode()} if symbols else {}
        return self._decode(path, _object, await self._get(path, params))

    async def depth(self, symbol: str, limit: int, weight: int) -> dict[str, Any]:
        """`/api/v3/depth?symbol=&limit=`: the body as JSON; the books core validates it
        (marketd.books.model.parse_snapshot). `weight` depends on `limit` (docs/books.md §2)."""
        path = "/api/v3/depth"
        params = {"symbol": symbol, "limit": limit}
        return self._decode(path, _object, await self._get(path, params, weight))

    async def ping(self) -> None:
        path = "/api/v3/ping"
        self._decode(path, _object, await self._get(path, {}))

    # -- plumbing -------------------------------------------------------------------------------

    async def _get(self, path: str, params: Mapping[str, Any], weight: int | None = None) -> bytes:
        await self.budget.acquire(WEIGHTS[path] if weight is None else weight)
        started = time.perf_counter()
        try:
            response = await self._http.get(path, params=dict(params))
        except httpx.TimeoutException as exc:
            self._count(path, "timeout")
            raise RestUnavailable(path, f"timeout: {exc!r}") from exc
        except httpx.HTTPError as exc:
            # Connection refused/reset, DNS, protocol errors: the service is not reachable now.
            self._count(path, "error")
            raise RestUnavailable(path, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._m_seconds.labels(path).observe(time.perf_counter() - started)
        status = response.status_code
        self._count(path, str(status))
        self.budget.observe(
            status,
            _int_header(response.headers, "x-mbx-used-weight-1m"),
            _retry_after(response.headers),
        )
        if status == 200:
            return response.content
        body = _error_body(response.content)
        detail = f"HTTP {status} code={body.code} {body.msg}".strip()
        if status in (429, 418):
            retry = _retry_after(response.headers)
            cls = RestBanned if status == 418 else RestRateLimited
            raise cls(path, detail, retry if retry is not None else 60.0)
        if status >= 500 or body.code == SERVER_BUSY:
            raise RestUnavailable(path, detail)
        raise RestRejected(path, status, body.code, body.msg)

    def _decode(self, path: str, decoder: msgspec.json.Decoder[T], content: bytes) -> T:
        try:
            return decoder.decode(content)
        except msgspec.DecodeError as exc:
            raise RestBadResponse(path, f"unexpected response: {exc}") from exc

    @staticmethod
    def _check_decimals(path: str, *values: str) -> None:
        for v in values:
            if not _DECIMAL.fullmatch(v):
                raise RestBadResponse(path, f"not a plain decimal: {v[:40]!r}")

    def _count(self, path: str, status: str) -> None:
        self._m_requests.labels(path, status).inc()


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit {limit} outside 1..{MAX_LIMIT}")
    return limit


def _int_header(headers: httpx.Headers, name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _retry_after(headers: httpx.Headers) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None  # an HTTP-date: Binance documents seconds; the caller uses its default
    return value if value >= 0 else None


def _error_body(content: bytes) -> _ErrorBody:
    try:
        return _error.decode(content)
    except msgspec.DecodeError:
        return _ErrorBody(None, content[:200].decode("utf-8", "replace"))
