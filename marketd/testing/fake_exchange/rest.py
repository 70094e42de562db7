"""Binance REST market-data endpoints served from the same tape as the WebSocket streams.

Receives parsed requests (path, query, headers); returns status, JSON body and headers. Every
answer carries `X-MBX-USED-WEIGHT-1M`; over the weight limit the client gets 429 + Retry-After,
and a client that keeps going before Retry-After is banned with 418 (docs/binance.md §5).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson
import trio

from marketd.testing.fake_exchange.frames import depth_book_dict, fmt8, fmt16
from marketd.testing.fake_exchange.market import Tape, spec_for
from marketd.testing.fake_exchange.state import ExchangeState
from marketd.testing.fake_exchange.stats import (
    KLINE_INTERVALS,
    kline_for,
    parse_tz,
    window_end,
    window_start,
)

MAX_LIMIT = 1000
MAX_BAN_S = 3 * 86400


@attrs.frozen
class Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class ApiError(Exception):
    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


def _missing(name: str) -> ApiError:
    return ApiError(
        400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


class WeightLimiter:
    """REQUEST_WEIGHT per minute of the exchange clock (one client IP: loopback)."""

    def __init__(self, state: ExchangeState) -> None:
        self.state = state
        self.minute = -1
        self.used = 0
        self.retry_until_us = 0  # the client was told to wait until then
        self.strikes = 0
        self.ban_until_us = 0
        self.ban_s = state.config.ban_s

    def _roll(self, now_us: int) -> None:
        minute = now_us // 60_000_000
        if minute != self.minute:
            self.minute, self.used = minute, 0

    def header(self) -> tuple[str, str]:
        return ("X-MBX-USED-WEIGHT-1M", str(self.used))

    def strike(self, now_us: int, retry_after_s: int) -> bool:
        """Record a 429; True when the client ignored an earlier Retry-After often enough."""
        if now_us < self.retry_until_us:
            self.strikes += 1
        self.retry_until_us = max(self.retry_until_us, now_us + retry_after_s * 1_000_000)
        if self.strikes >= self.state.config.ban_after_strikes:
            self.strikes = 0
            self.ban_until_us = now_us + self.ban_s * 1_000_000
            self.ban_s = min(self.ban_s * 2, MAX_BAN_S)  # bans grow for repeat offenders
            return True
        return False


Handler = Callable[["RestApi", Mapping[str, str], int], Any]


class RestApi:
    def __init__(self, state: ExchangeState) -> None:
        self.state = state
        self.limiter = WeightLimiter(state)

    def handle(self, path: str, params: Mapping[str, str], headers: Mapping[str, str]) -> Response:
        route = _ROUTES.get(path)
        if route is None:
            return Response(404, orjson.dumps({"code": -1000, "msg": f"Unknown path {path}"}))
        weight_of, handler = route
        state, lim = self.state, self.limiter
        now_us = state.clock.now_us()
        lim._roll(now_us)
        counters = state.counters
        if now_us < lim.ban_until_us:
            counters["rest_418"] += 1
            return self._limited(418, math.ceil((lim.ban_until_us - now_us) / 1e6), "banned")
        now = trio.current_time()
        faults = state.faults
        if now < faults.rest_503_until:
            counters["rest_503"] += 1
            body = {"code": -1008, "msg": "Service unavailable (fake exchange fault)."}
            return Response(503, orjson.dumps(body), (lim.header(),))
        if now < faults.rest_429_until:
            counters["rest_429_fault"] += 1
            return self._too_many(math.ceil(faults.rest_429_until - now), now_us)
        weight = weight_of(params)
        if lim.used + weight > state.config.weight_limit:
            counters["rest_429_weight"] += 1
            to_next_minute = 60 - (now_us // 1_000_000) % 60
            return self._too_many(to_next_minute, now_us)
        lim.used += weight
        div = 1 if headers.get("x-mbx-time-unit", "").upper() == "MICROSECOND" else 1000
        try:
            result = handler(self, params, div)
        except ApiError as err:
            error = orjson.dumps({"code": err.code, "msg": err.msg})
            return Response(err.status, error, (lim.header(),))
        return Response(200, orjson.dumps(result), (lim.header(),))

    def _too_many(self, retry_after_s: int, now_us: int) -> Response:
        if self.limiter.strike(now_us, retry_after_s):
            self.state.counters["rest_418"] += 1
            return self._limited(
                418, self.limiter.ban_until_us // 1_000_000 - now_us // 1_000_000, "banned"
            )
        return self._limited(429, retry_after_s, "limit")

    def _limited(self, status: int, retry_after_s: int, why: str) -> Response:
        limit = self.state.config.weight_limit
        msg = (
            f"Way too much request weight used; IP banned until {self.limiter.ban_until_us // 1000}"
            "."
            if why == "banned"
            else f"Too much request weight used; current limit is {limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
        )
        return Response(
            status,
            orjson.dumps({"code": -1003, "msg": msg}),
            (self.limiter.header(), ("Retry-After", str(max(1, retry_after_s)))),
        )

    # ---- helpers ----

    def _tape(self, params: Mapping[str, str]) -> Tape | None:
        symbol = params.get("symbol", "")
        if not symbol:
            raise _missing("symbol")
        if symbol.upper() not in self.state.market.symbols:
            raise ApiError(400, -1121, "Invalid symbol.")
        return self.state.market.tape(symbol.upper())


def _int(params: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.lstrip("-").isdigit() or len(raw) > 20:
        raise ApiError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(raw)


def _limit(params: Mapping[str, str], default: int = 500) -> int:
    limit = _int(params, "limit", default)
    assert limit is not None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
    return limit


def _time_us(params: Mapping[str, str], name: str) -> int | None:
    """startTime/endTime in ms or µs (docs/binance.md §5): 16 digits means µs.

    Both are inclusive, so an endTime in ms covers its whole millisecond.
    """
    value = _int(params, name)
    if value is None:
        return None
    if value >= 10**15:
        return value
    return value * 1000 + (999 if name == "endTime" else 0)


def _trade_json(tape: Tape, trade_id: int, div: int) -> dict[str, Any]:
    i = trade_id - tape.first_id
    p, q = tape.price[i], tape.qty[i]
    return {
        "id": trade_id,
        "price": fmt8(p),
        "qty": fmt8(q),
        "quoteQty": fmt16(p * q),
        "time": tape.time_us[i] // div,
        "isBuyerMaker": bool(tape.maker[i]),
        "isBestMatch": True,
    }


def _ping(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    return {}


def _time(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    return {"serverTime": api.state.clock.now_us() // div}


def _exchange_info(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    market = api.state.market
    wanted: list[str] = list(market.symbols)
    if params.get("symbol"):
        wanted = [params["symbol"].upper()]
    elif params.get("symbols"):
        try:
            names = orjson.loads(params["symbols"])
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, -1100, "Illegal characters found in parameter 'symbols'.") from exc
        wanted = [str(n).upper() for n in names]
    if any(s not in market.symbols for s in wanted):
        raise ApiError(400, -1121, "Invalid symbol.")
    cfg = api.state.config
    symbols = []
    for sym in wanted:
        spec = spec_for(sym)
        symbols.append(
            {
                "symbol": sym,
                # Binance lists delisted symbols as BREAK: no market data (docs/binance.md §7.7).
                "status": "BREAK" if sym in market.silent else "TRADING",
                "baseAsset": spec.base_asset,
                "baseAssetPrecision": 8,
                "quoteAsset": spec.quote_asset,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT"],
                "isSpotTradingAllowed": True,
                "permissions": [],
                "permissionSets": [["SPOT"]],
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": fmt8(spec.tick_e8),
                        "maxPrice": "1000000.00000000",
                        "tickSize": fmt8(spec.tick_e8),
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": fmt8(spec.lot_e8),
                        "maxQty": "9000000.00000000",
                        "stepSize": fmt8(spec.lot_e8),
                    },
                ],
            }
        )
    return {
        "timezone": "UTC",
        "serverTime": api.state.clock.now_us() // div,
        "rateLimits": [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": cfg.weight_limit,
            },
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            {
                "rateLimitType": "RAW_REQUESTS",
                "interval": "MINUTE",
                "intervalNum": 5,
                "limit": 300000,
            },
        ],
        "exchangeFilters": [],
        "symbols": symbols,
    }


def _trades(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    tape = api._tape(params)
    limit = _limit(params)
    if tape is None:
        return []
    start = max(tape.first_id, tape.end_id - limit)
    return [_trade_json(tape, t, div) for t in range(start, tape.end_id)]


def _historical_trades(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    tape = api._tape(params)
    limit = _limit(params)
    from_id = _int(params, "fromId")
    if tape is None:
        return []
    if from_id is None:
        start = max(tape.first_id, tape.end_id - limit)
    else:
        start = max(from_id, tape.first_id)  # older ids: from the oldest still available
    stop = min(tape.end_id, start + limit)
    return [_trade_json(tape, t, div) for t in range(start, stop)]


def _agg_json(tape: Tape, agg_id: int, div: int) -> dict[str, Any]:
    first, last = tape.agg_range(agg_id)
    i = first - tape.first_id
    return {
        "a": agg_id,
        "p": fmt8(tape.price[i]),
        "q": fmt8(sum(tape.qty[i : last - tape.first_id + 1])),
        "f": first,
        "l": last,
        "T": tape.time_us[i] // div,
        "m": bool(tape.maker[i]),
        "M": True,
    }


def _agg_trades(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    tape = api._tape(params)
    limit = _limit(params)
    from_id = _int(params, "fromId")
    start_us, end_us = _time_us(params, "startTime"), _time_us(params, "endTime")
    if from_id is not None and (start_us is not None or end_us is not None):
        raise ApiError(400, -1128, "Combination of optional parameters invalid.")
    if tape is None:
        return []
    lo, hi = tape.agg_base, tape.agg_end
    if from_id is not None:
        first = max(from_id, lo)
        return [_agg_json(tape, a, div) for a in range(first, min(hi, first + limit))]
    # All fills of an aggregate share its time, so the aggregate holding the first trade at or
    # after a time starts at or after it (filters are inclusive, on T).
    n = len(tape.time_us)

    def agg_at(index: int) -> int:
        return hi if index >= n else tape.agg_of_trade(tape.first_id + index)

    a0 = agg_at(tape.first_index_at(start_us)) if start_us is not None else lo
    a1 = agg_at(bisect_right(tape.time_us, end_us)) if end_us is not None else hi
    if start_us is not None:
        a1 = min(a1, a0 + limit)
    else:
        a0 = max(a0, a1 - limit)
    return [_agg_json(tape, a, div) for a in range(a0, a1)]


def _klines(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    tape = api._tape(params)
    interval = params.get("interval", "")
    if not interval:
        raise _missing("interval")
    if interval not in KLINE_INTERVALS:
        raise ApiError(400, -1120, "Invalid interval.")
    try:
        tz = parse_tz(params.get("timeZone") or "0")
    except ValueError as exc:
        raise ApiError(
            400, -1100, f"Illegal characters found in parameter 'timeZone': {exc}."
        ) from exc
    limit = _limit(params)
    start_us, end_us = _time_us(params, "startTime"), _time_us(params, "endTime")
    if tape is None:
        return []
    now = api.state.clock.now_us()
    first_time = tape.time_us[0] if len(tape.time_us) else now
    earliest = window_start(interval, first_time, tz)
    current = window_start(interval, now, tz)
    last = current if end_us is None else min(current, window_start(interval, end_us, tz))
    windows: list[int] = []
    if start_us is not None:
        w = max(window_start(interval, start_us, tz), earliest)
        if w < start_us:  # klines are identified by open time: only those opening at/after it
            w = window_end(interval, w, tz)
        while w <= last and len(windows) < limit:
            windows.append(w)
            w = window_end(interval, w, tz)
    else:
        w = last
        while w >= earliest and len(windows) < limit:
            windows.append(w)
            w = window_start(interval, w - 1, tz)
        windows.reverse()
    out = []
    for w in windows:
        end = window_end(interval, w, tz)
        k = kline_for(tape, w, end)
        out.append(
            [w // div, fmt8(k.o), fmt8(k.h), fmt8(k.l), fmt8(k.c), fmt8(k.v), end // div - 1,
             fmt16(k.q), k.n, fmt8(k.V), fmt16(k.Q), "0"]
        )  # fmt: skip
    return out


def _agg_weight(params: Mapping[str, str]) -> int:
    return 4


MAX_DEPTH_LIMIT = 5000


def _depth_weight(params: Mapping[str, str]) -> int:
    """5 / 25 / 50 / 250 for limit 1-100 / 101-500 / 501-1000 / 1001-5000 (docs/books.md)."""
    raw = params.get("limit") or "100"
    limit = int(raw) if raw.isdigit() and len(raw) < 10 else 100
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    return 50 if limit <= 1000 else 250


def _depth(api: RestApi, params: Mapping[str, str], div: int) -> Any:
    """`lastUpdateId` and the top `limit` levels (an older book once: stale_depth_snapshot)."""
    api._tape(params)  # symbol checks
    limit = _int(params, "limit", 100)
    assert limit is not None
    if not 1 <= limit <= MAX_DEPTH_LIMIT:
        raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
    state = api.state
    sim = state.books.get(params["symbol"].upper())
    if sim is None:  # listed but not trading: an empty book
        return depth_book_dict(0, [], [])
    sim.advance_to(state.clock.now_us())
    back = state.faults.stale_depth_snapshot
    if back is not None:
        state.faults = attrs.evolve(state.faults, stale_depth_snapshot=None)  # once
        state.counters["stale_depth_snapshot"] += 1
        steps = list(sim.history)
        at = steps[-back].first_id - 1 if back <= len(steps) else sim.first_known_id
        sim.stale_served.append(at)
        bids, asks = sim.top(limit, sim.book_at(at))
        return depth_book_dict(at, bids, asks)
    bids, asks = sim.top(limit)
    return depth_book_dict(sim.last_id, bids, asks)


_ROUTES: dict[str, tuple[Callable[[Mapping[str, str]], int], Handler]] = {
    "/api/v3/ping": (lambda _p: 1, _ping),
    "/api/v3/time": (lambda _p: 1, _time),
    "/api/v3/exchangeInfo": (lambda _p: 20, _exchange_info),
    "/api/v3/trades": (lambda _p: 25, _trades),
    "/api/v3/historicalTrades": (lambda _p: 25, _historical_trades),
    "/api/v3/aggTrades": (_agg_weight, _agg_trades),
    "/api/v3/depth": (_depth_weight, _depth),
    "/api/v3/klines": (lambda _p: 2, _klines),
    "/api/v3/uiKlines": (lambda _p: 2, _klines),
}
