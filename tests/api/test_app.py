"""The API through Quart's test client, reading a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from marketd.api.app import create_app
from marketd.runtime import Runtime
from marketd.tickers import state as ticker_state
from marketd.tickers.redis_server import RedisProcess
from marketd.tickers.store import TickerStore
from tests.tickers.records import now_ms, runtime, ticker

pytestmark = pytest.mark.redis

SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT,MATICUSDT"


@pytest.fixture
def store(redis_server: RedisProcess) -> Iterator[TickerStore]:
    s = TickerStore(redis_server.url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def rt(redis_server: RedisProcess) -> Runtime:
    return runtime(redis_url=redis_server.url, env={"TICKER_SYMBOLS": SYMBOLS})


@pytest.fixture
async def client(rt: Runtime) -> AsyncIterator[Any]:
    app = create_app(rt)
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def get(client: Any, path: str) -> tuple[int, Any, Any]:
    response = await client.get(path)
    assert response.content_type.startswith("application/json"), (path, response.content_type)
    return response.status_code, await response.get_json(), response


async def test_ticker_returns_spec_json(client: Any, store: TickerStore) -> None:
    t = now_ms() - 250
    store.write([ticker("BTCUSDT", t)], t + 1, 60)
    status, body, _ = await get(client, "/api/v1/ticker/btcusdt")
    assert status == 200
    assert body["symbol"] == "BTCUSDT"
    assert body["last_price"] == "118234.56000000" and body["price_change"] == "-12.50000000"
    assert body["trades_count"] == 101 and body["event_time"] == t and body["updated_at"] == t + 1
    assert body["complete"] is True
    assert 250 <= body["age_ms"] < 60_000
    expected = {
        "symbol", "last_price", "price_change", "price_change_pct", "open", "high", "low",
        "volume", "quote_volume", "trades_count", "event_time", "updated_at", "age_ms", "complete",
    }  # fmt: skip
    assert set(body) == expected


@pytest.mark.parametrize(
    "path",
    ["/api/v1/ticker/B", "/api/v1/ticker/BTC-USDT", "/api/v1/ticker/" + "A" * 31,
     "/api/v1/ticker/BTC%2A", "/api/v1/ticker/ticker:BTCUSDT",
     # Non-ASCII that str.upper() turns into ASCII: U+0131 -> I (LINKUSDT), "ß" -> SS, U+FB00 -> FF.
     "/api/v1/ticker/l%C4%B1nkusdt", "/api/v1/ticker/%C3%9F%C3%9F", "/api/v1/ticker/%EF%AC%80",
     "/api/v1/ticker/BTC/USDT", "/api/v1/ticker/BTC%2FUSDT"],
)  # fmt: skip
async def test_malformed_symbol_is_400_before_redis(client: Any, path: str) -> None:
    status, body, _ = await get(client, path)
    assert status == 400 and body["error"] == "invalid_symbol"


async def test_untracked_and_missing_symbols_are_404(client: Any, store: TickerStore) -> None:
    status, body, _ = await get(client, "/api/v1/ticker/SOLUSDT")
    assert status == 404 and body["error"] == "unknown_symbol"
    status, body, _ = await get(client, "/api/v1/ticker/MATICUSDT")
    assert status == 404 and body == {
        "error": "no_data",
        "detail": "tracked, but no data yet or expired",
        "symbol": "MATICUSDT",
    }


async def test_partial_hash_is_marked_incomplete(client: Any, redis_server: RedisProcess) -> None:
    import redis

    raw = redis.Redis.from_url(redis_server.url)
    raw.hset("ticker:ETHUSDT", mapping={"last_price": "1.5", "event_time": str(now_ms())})
    raw.close()
    status, body, _ = await get(client, "/api/v1/ticker/ETHUSDT")
    assert status == 200 and body["complete"] is False
    assert body["last_price"] == "1.5" and body["high"] is None and body["trades_count"] is None


async def test_tickers_lists_all_tracked_in_one_round_trip(
    client: Any, store: TickerStore, rt: Runtime
) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("ETHUSDT", t - 5)], t, 60)
    status, body, _ = await get(client, "/api/v1/tickers")
    assert status == 200
    assert [x["symbol"] for x in body["tickers"]] == ["BTCUSDT", "ETHUSDT"]
    assert body["missing"] == ["BNBUSDT", "MATICUSDT"] and body["count"] == 2


async def test_concurrent_reads_share_round_trips(rt: Runtime, store: TickerStore) -> None:
    from marketd.api.reader import TickerReader

    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("ETHUSDT", t)], t, 60)
    reader = TickerReader(store)
    app = create_app(rt, reader=reader)
    results: list[int] = []
    async with app.test_app() as test_app:
        client = test_app.test_client()

        async def one(path: str) -> None:
            response = await client.get(path)
            results.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, "/api/v1/ticker/BTCUSDT" if i % 2 else "/api/v1/tickers")
    assert results == [200] * 40
    assert reader.batches < 40


async def test_health_ok_when_half_fresh(client: Any, store: TickerStore) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("ETHUSDT", t - 1)], t, 60)
    status, body, _ = await get(client, "/api/v1/ticker/health")
    assert status == 200
    assert body == {
        "status": "ok",
        "redis": True,
        "tracked": 4,
        "fresh": 2,
        "stale": 0,
        "missing": 2,
        "consumer_lag": None,  # the consumer is not running in this process
        "last_message_age_ms": None,
    }


async def test_health_degraded_when_mostly_stale(
    client: Any, store: TickerStore, rt: Runtime
) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("ETHUSDT", t - 31_000)], t, 60)
    state, _ = ticker_state.attach(rt)
    state.running, state.consumer_lag, state.last_message_ms = True, 7, t - 40
    try:
        status, body, _ = await get(client, "/api/v1/ticker/health")
    finally:
        state.running = False
    assert status == 503
    assert body["status"] == "degraded" and body["fresh"] == 1 and body["stale"] == 1
    assert body["consumer_lag"] == 7 and body["last_message_age_ms"] >= 40


async def test_redis_down_gives_503_json(client: Any, redis_server: RedisProcess) -> None:
    redis_server.stop()
    status, body, _ = await get(client, "/api/v1/ticker/BTCUSDT")
    assert status == 503 and body["error"] == "redis_unavailable"
    status, body, _ = await get(client, "/api/v1/tickers")
    assert status == 503
    status, body, _ = await get(client, "/api/v1/ticker/health")
    assert status == 503 and body["redis"] is False and body["missing"] == 4


async def test_unknown_path_and_wrong_method_are_json(client: Any) -> None:
    status, body, _ = await get(client, "/nope")
    assert status == 404 and body["error"] == "not_found"
    response = await client.post("/api/v1/tickers")
    assert response.status_code == 405
    assert (await response.get_json())["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_healthz_readyz_and_metrics(client: Any, rt: Runtime) -> None:
    status, body, _ = await get(client, "/healthz")
    assert status == 200 and body == {"status": "alive"}
    status, body, _ = await get(client, "/readyz")
    assert status == 503 and body["ready"] is False
    assert set(body["components"]) == {"ingest", "tickers", "api"}
    for name in ("ingest", "tickers", "api"):
        rt.health.set(name, started=True, healthy=True, detail="ok")
    status, body, _ = await get(client, "/readyz")
    assert status == 200 and body["ready"] is True
    response = await client.get("/metrics")
    text = (await response.get_data()).decode()
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    assert 'marketd_api_requests_total{route="/readyz",status="503"} 1.0' in text
    assert "marketd_api_request_seconds_bucket" in text


async def test_openapi_describes_every_route(client: Any) -> None:
    status, doc, _ = await get(client, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in (
        "/api/v1/ticker/{symbol}",
        "/api/v1/tickers",
        "/api/v1/ticker/health",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert "get" in doc["paths"][path]
    assert doc["components"]["schemas"]["Ticker"]["properties"]["age_ms"]


async def test_unexpected_error_is_json_500_without_traceback(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marketd.api import hot as hot_module

    def boom(*_: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(hot_module, "ticker_view", boom)
    store = TickerStore(rt.redis_url or "")
    store.write([ticker("BTCUSDT")], now_ms(), 60)
    store.close()
    app = create_app(rt)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/api/v1/ticker/BTCUSDT")
        body = await response.get_data()
    assert response.status_code == 500
    assert b"secret" not in body and b"Traceback" not in body
    assert b'"internal_error"' in body
