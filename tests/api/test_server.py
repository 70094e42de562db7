"""The API component over a real Hypercorn socket (httpx client), with a real redis-server."""

from __future__ import annotations

import httpx
import pytest
import trio

from marketd.api.server import run_api
from marketd.tickers.redis_server import RedisProcess, free_port
from marketd.tickers.store import TickerStore
from tests.tickers.records import now_ms, runtime, ticker

pytestmark = pytest.mark.redis


async def test_serves_tickers_over_http_and_stops_on_drain(redis_server: RedisProcess) -> None:
    port = free_port()
    rt = runtime(
        redis_url=redis_server.url,
        env={"API_PORT": str(port), "TICKER_SYMBOLS": "BTCUSDT,ETHUSDT"},
    )
    t = now_ms()
    store = TickerStore(redis_server.url)
    store.write([ticker("BTCUSDT", t, last_price="42000.00")], t, 60)
    store.close()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_api, rt)
            assert rt.health.components["api"].healthy
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                one = await client.get("/api/v1/ticker/BTCUSDT")
                assert one.status_code == 200
                assert one.json()["last_price"] == "42000.00" and one.json()["event_time"] == t
                many = await client.get("/api/v1/tickers")
                assert many.json()["missing"] == ["ETHUSDT"]
                missing = await client.get("/no/such/path")
                assert missing.status_code == 404 and missing.json()["error"] == "not_found"
                metrics = await client.get("/metrics")
                assert "marketd_api_requests_total" in metrics.text
            rt.draining.set()
        # run_api returned: the port is closed and the component reports stopped.
        assert not rt.health.components["api"].healthy
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_a_port_in_use_is_a_config_error_naming_api_port(redis_server: RedisProcess) -> None:
    import socket

    from marketd.errors import ApiBindError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rt = runtime(redis_url=redis_server.url, env={"API_PORT": str(port)})
        with trio.fail_after(30), pytest.raises(ApiBindError) as info:
            await run_api(rt)
    assert info.value.key == "api.port" and "already in use" in info.value.problem
    assert not rt.health.components["api"].healthy


async def test_the_daemon_exits_2_when_the_api_cannot_bind() -> None:
    """Without the CLI's probe (or if the port is taken after it): still exit 2, not 1."""
    import socket

    from marketd.config import Value, load_config
    from marketd.daemon import EXIT_CONFIG, run_daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = {
            "supervisor.max_failures": Value("1", "test"),
            "supervisor.backoff_initial_s": Value("0.01", "test"),
            "supervisor.backoff_max_s": Value("0.01", "test"),
        }
        env = {
            "API_PORT": str(port),
            "MARKETD_COMPONENTS": "api",
            "REDIS_URL": "redis://127.0.0.1:1",
        }
        cfg = load_config(environ=env, dotenv=None, overrides=overrides).config
        with trio.fail_after(30):
            assert await run_daemon(cfg) == EXIT_CONFIG
