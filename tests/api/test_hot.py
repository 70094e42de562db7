"""HotReads (marketd/api/hot.py) answers the polled ticker GETs in front of Quart: the same
status, headers and body as the Quart routes, request metrics counted, everything else passed on."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from marketd.api.app import create_app
from marketd.api.hot import HotReads
from marketd.runtime import Runtime
from marketd.tickers.redis_server import RedisProcess
from marketd.tickers.store import TickerStore
from tests.tickers.records import now_ms, runtime, ticker

pytestmark = pytest.mark.redis

PATHS = [
    "/api/v1/ticker/BTCUSDT",
    "/api/v1/ticker/btcusdt",  # normalised
    "/api/v1/ticker/ETHUSDT",  # tracked, no data
    "/api/v1/ticker/XRPUSDT",  # not tracked
    "/api/v1/ticker/B@D",  # malformed
    "/api/v1/ticker/BTC/USDT",  # a slash inside the symbol: malformed too
    "/api/v1/ticker/" + "A" * 200,  # too long, echoed truncated
    "/api/v1/tickers",
]


@pytest.fixture
def rt(redis_server: RedisProcess) -> Runtime:
    store = TickerStore(redis_server.url)
    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("BNBUSDT", t)], t, 60)
    store.close()
    return runtime(redis_url=redis_server.url, env={"TICKER_SYMBOLS": "BTCUSDT,ETHUSDT,BNBUSDT"})


async def call(app: Any, method: str, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through an ASGI callable, as Hypercorn would make it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await _forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


async def _forever() -> None:
    await trio.sleep_forever()


def _answer(status: int, headers: dict[bytes, bytes], body: bytes) -> tuple[Any, ...]:
    # Age and updated times move between the two calls: compare the JSON without them.
    data = json.loads(body)
    for item in [data, *data.get("tickers", [])] if isinstance(data, dict) else []:
        item.pop("age_ms", None)
    return status, headers[b"content-type"], int(headers[b"content-length"]) > 0, data


async def test_hot_path_answers_like_the_quart_routes(rt: Runtime) -> None:
    app = create_app(rt)
    hot = app.asgi_app
    assert isinstance(hot, HotReads)
    async with app.test_app():  # lifespan: the reader task runs
        for path in PATHS:
            fast = await call(app, "GET", path)
            slow = await call(hot.app, "GET", path)  # the chain behind HotReads: Quart
            assert _answer(*fast) == _answer(*slow), path
            assert int(fast[1][b"content-length"]) == len(fast[2])
        # HEAD goes to Quart (Hypercorn drops the body on the wire).
        status, headers, _ = await call(app, "HEAD", "/api/v1/ticker/BTCUSDT")
        assert status == 200 and headers[b"content-type"] == b"application/json"
        status, headers, _ = await call(app, "POST", "/api/v1/tickers")
        assert status == 405 and b"GET" in headers[b"allow"]
        status, _, _ = await call(app, "GET", "/api/v1/ticker/health")
        assert status in (200, 503)  # Quart's route, not a symbol


async def test_hot_path_counts_requests_by_route_and_status(rt: Runtime) -> None:
    app = create_app(rt)
    async with app.test_app():
        await call(app, "GET", "/api/v1/ticker/BTCUSDT")
        await call(app, "GET", "/api/v1/ticker/XRPUSDT")
        await call(app, "GET", "/api/v1/tickers")
    text = rt.metrics.exposition().decode()
    assert 'api_requests_total{route="/api/v1/ticker/{symbol}",status="200"} 1.0' in text
    assert 'api_requests_total{route="/api/v1/ticker/{symbol}",status="404"} 1.0' in text
    assert 'api_requests_total{route="/api/v1/tickers",status="200"} 1.0' in text


async def test_redis_down_is_a_json_503_on_the_hot_path(rt: Runtime, redis_server: Any) -> None:
    app = create_app(rt)
    async with app.test_app():
        redis_server.stop()
        status, headers, body = await call(app, "GET", "/api/v1/ticker/BTCUSDT")
    assert status == 503 and headers[b"content-type"] == b"application/json"
    assert b'"redis_unavailable"' in body
