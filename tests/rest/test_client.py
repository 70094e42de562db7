"""BinanceRest against httpx.MockTransport (virtual time) and one real loopback socket."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from marketd.metrics import MetricsFactory
from marketd.rest import (
    BinanceRest,
    RestBadResponse,
    RestBanned,
    RestRateLimited,
    RestRejected,
    RestUnavailable,
    WeightBudget,
)

TRADE = {
    "id": 28457,
    "price": "4.00000100",
    "qty": "12.00000000",
    "quoteQty": "48.000012",
    "time": 1499865549590,
    "isBuyerMaker": True,
    "isBestMatch": True,
}
KLINE = [
    1499040000000, "0.01634790", "0.80000000", "0.01575800", "0.01577100", "148976.11427815",
    1499644799999, "2434.19055334", 308, "1756.87402397", "28.46694368", "0",
]  # fmt: skip


class Exchange:
    """A scripted REST endpoint: records each request with the (virtual) time it arrived."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.seen: list[tuple[float, httpx.Request]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((trio.current_time(), request))
        return self.respond(request)


def ok(body: Any, used: int | None = None) -> httpx.Response:
    headers = {"X-MBX-USED-WEIGHT-1M": str(used)} if used is not None else {}
    return httpx.Response(200, json=body, headers=headers)


def client(
    exchange: Exchange,
    budget: WeightBudget | None = None,
    base_url: str = "http://rest.test",
    metrics: MetricsFactory | None = None,
) -> BinanceRest:
    return BinanceRest(
        base_url,
        budget or WeightBudget(4800),
        transport=httpx.MockTransport(exchange),
        metrics=metrics,
    )


async def test_historical_trades_sends_from_id_and_parses_rows(
    autojump_clock: trio.abc.Clock,
) -> None:
    ex = Exchange(lambda r: ok([TRADE], used=25))
    budget = WeightBudget(4800)
    async with client(ex, budget) as rest:
        (trade,) = await rest.historical_trades("BTCUSDT", 28457, limit=500)
    assert (trade.id, trade.price, trade.qty, trade.time, trade.is_buyer_maker) == (
        28457, "4.00000100", "12.00000000", 1499865549590, True,
    )  # fmt: skip
    (_, request) = ex.seen[0]
    assert request.url.path == "/api/v3/historicalTrades"
    assert dict(request.url.params) == {"symbol": "BTCUSDT", "fromId": "28457", "limit": "500"}
    assert budget.used() == 25


async def test_each_endpoint_reserves_its_documented_weight(
    autojump_clock: trio.abc.Clock,
) -> None:
    def respond(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/api/v3/klines":
            return ok([KLINE])
        if r.url.path == "/api/v3/aggTrades":
            return ok([{"a": 1, "p": "1.0", "q": "2.0", "f": 10, "l": 12, "T": 5, "m": False}])
        return ok({})

    budget = WeightBudget(4800)
    async with client(Exchange(respond), budget) as rest:
        await rest.ping()
        assert budget.used() == 1
        await rest.exchange_info(["BTCUSDT"])
        assert budget.used() == 21
        (agg,) = await rest.agg_trades("BTCUSDT", 1)
        assert (agg.agg_id, agg.first_id, agg.last_id, agg.time) == (1, 10, 12, 5)
        assert budget.used() == 25
        (k,) = await rest.klines("BTCUSDT", "1w", 0, 1499040000000, time_zone="+08:00")
        assert (k.open_time, k.close_time, k.trades_count, k.close) == (
            1499040000000, 1499644799999, 308, "0.01577100",
        )  # fmt: skip
        assert budget.used() == 27


async def test_server_weight_header_is_reconciled(autojump_clock: trio.abc.Clock) -> None:
    budget = WeightBudget(4800)
    async with client(Exchange(lambda r: ok({}, used=4000)), budget) as rest:
        await rest.ping()
    assert budget.used() == 4000


async def test_429_blocks_all_requests_until_retry_after(autojump_clock: trio.abc.Clock) -> None:
    state = {"limited": True}

    def respond(r: httpx.Request) -> httpx.Response:
        if state["limited"]:
            state["limited"] = False
            return httpx.Response(
                429, json={"code": -1003, "msg": "Too much request weight used"},
                headers={"Retry-After": "7"},
            )  # fmt: skip
        return ok({})

    ex = Exchange(respond)
    budget = WeightBudget(4800)
    async with client(ex, budget) as rest:
        start = trio.current_time()
        with pytest.raises(RestRateLimited) as info:
            await rest.ping()
        assert info.value.retry_after_s == 7
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(rest.ping)
    times = [t - start for t, _ in ex.seen]
    assert times[0] == 0
    assert times[1:] == [pytest.approx(7)] * 3  # nothing was sent while blocked


async def test_418_is_a_ban(autojump_clock: trio.abc.Clock) -> None:
    ex = Exchange(
        lambda r: httpx.Response(418, json={"code": -1003}, headers={"Retry-After": "120"})
    )
    budget = WeightBudget(4800)
    async with client(ex, budget) as rest:
        with pytest.raises(RestBanned) as info:
            await rest.ping()
    assert info.value.retry_after_s == 120
    assert budget.blocked_until == pytest.approx(trio.current_time() + 120)


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(503, text="<html>busy</html>"), RestUnavailable),
        (httpx.Response(400, json={"code": -1008, "msg": "Server is busy"}), RestUnavailable),
        (httpx.Response(400, json={"code": -1121, "msg": "Invalid symbol."}), RestRejected),
        (httpx.Response(200, text="not json"), RestBadResponse),
        (httpx.Response(200, json=[{**TRADE, "price": "NaN"}]), RestBadResponse),
        (httpx.Response(200, json=[{"id": "x"}]), RestBadResponse),
    ],
)
async def test_failures_are_mapped_at_the_edge(
    autojump_clock: trio.abc.Clock, response: httpx.Response, error: type[Exception]
) -> None:
    async with client(Exchange(lambda r: response)) as rest:
        with pytest.raises(error):
            await rest.historical_trades("BTCUSDT", 1)


async def test_rejection_carries_binance_code(autojump_clock: trio.abc.Clock) -> None:
    ex = Exchange(lambda r: httpx.Response(400, json={"code": -1121, "msg": "Invalid symbol."}))
    async with client(ex) as rest:
        with pytest.raises(RestRejected) as info:
            await rest.klines("NOPE", "1m", 0, 1)
    assert (info.value.status, info.value.code, info.value.message) == (
        400, -1121, "Invalid symbol.",
    )  # fmt: skip


async def test_timeouts_and_connection_errors_are_unavailable(
    autojump_clock: trio.abc.Clock,
) -> None:
    metrics = MetricsFactory()

    def respond(r: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=r)

    async with client(Exchange(respond), metrics=metrics) as rest:
        with pytest.raises(RestUnavailable, match="timeout"):
            await rest.ping()
    assert (
        metrics.registry.get_sample_value(
            "marketd_rest_requests_total", {"endpoint": "/api/v3/ping", "status": "timeout"}
        )
        == 1
    )


async def test_base_url_with_a_path_prefix(autojump_clock: trio.abc.Clock) -> None:
    ex = Exchange(lambda r: ok({}))
    async with client(ex, base_url="http://fake.test:8080/binance") as rest:
        await rest.ping()
    (_, request) = ex.seen[0]
    assert str(request.url) == "http://fake.test:8080/binance/api/v3/ping"


async def _serve_one_json(body: bytes, task_status: trio.TaskStatus[int]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    async with listeners[0]:
        stream = await listeners[0].accept()
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"X-MBX-USED-WEIGHT-1M: 26\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )


async def test_real_socket_on_trio() -> None:
    budget = WeightBudget(4800)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve_one_json, json.dumps([TRADE]).encode())
            async with BinanceRest(f"http://127.0.0.1:{port}", budget, timeout_s=5) as rest:
                (trade,) = await rest.historical_trades("BTCUSDT", 28457)
    assert trade.id == 28457
    assert budget.used() == 26


async def test_refused_connection_is_unavailable() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nobody listens there now
    with trio.fail_after(10):
        async with BinanceRest(f"http://127.0.0.1:{port}", WeightBudget(), timeout_s=5) as rest:
            with pytest.raises(RestUnavailable):
                await rest.ping()
