"""REST endpoints, weights, 429/Retry-After, 418 bans and the time-unit header.

docs/binance.md §5."""

from __future__ import annotations

import httpx
import pytest

from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import http_url


async def test_ping_time_exchange_info_and_weight_header(start: Start) -> None:
    ex = await start()
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        r = await c.get("/api/v3/ping")
        assert r.json() == {} and r.headers["X-MBX-USED-WEIGHT-1M"] == "1"
        r = await c.get("/api/v3/time")
        assert isinstance(r.json()["serverTime"], int)
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "2"
        r = await c.get("/api/v3/exchangeInfo")
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "22"
        info = r.json()
        assert {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": 6000,
        } in info["rateLimits"]
        status = {s["symbol"]: s["status"] for s in info["symbols"]}
        assert status == {"BTCUSDT": "TRADING", "ETHUSDT": "TRADING", "MATICUSDT": "BREAK"}
        r = await c.get("/api/v3/exchangeInfo", params={"symbols": '["ETHUSDT"]'})
        assert [s["symbol"] for s in r.json()["symbols"]] == ["ETHUSDT"]


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/api/v3/historicalTrades", {}, -1102),
        ("/api/v3/historicalTrades", {"symbol": "NOPEUSDT"}, -1121),
        ("/api/v3/klines", {"symbol": "BTCUSDT"}, -1102),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "2m"}, -1120),
        ("/api/v3/trades", {"symbol": "BTCUSDT", "limit": "1001"}, -1130),
        ("/api/v3/aggTrades", {"symbol": "BTCUSDT", "fromId": "1", "startTime": "1"}, -1128),
    ],
)
async def test_bad_parameters_get_binance_error_codes(
    start: Start, path: str, params: dict[str, str], code: int
) -> None:
    ex = await start()
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        r = await c.get(path, params=params)
    assert r.status_code == 400 and r.json()["code"] == code
    assert "X-MBX-USED-WEIGHT-1M" in r.headers


async def test_historical_trades_from_before_retention_start_at_the_oldest(start: Start) -> None:
    ex = await start(symbols=("BTCUSDT", "MATICUSDT"), retention=500)
    tape = ex.market.tapes["BTCUSDT"]
    for _ in range(10):
        tape.generate(300, ex.state.clock.now_us())
    assert tape.first_id > tape.agg_first[0] - 1 and len(tape.price) <= 500 + 1024
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        r = await c.get(
            "/api/v3/historicalTrades", params={"symbol": "BTCUSDT", "fromId": 1, "limit": 5}
        )
        assert [t["id"] for t in r.json()] == list(range(tape.first_id, tape.first_id + 5))
        recent = (await c.get("/api/v3/trades", params={"symbol": "BTCUSDT", "limit": 3})).json()
        assert [t["id"] for t in recent] == list(range(tape.end_id - 3, tape.end_id))
        silent = await c.get("/api/v3/historicalTrades", params={"symbol": "MATICUSDT"})
    assert silent.json() == []


async def test_over_the_weight_limit_429_then_418_for_ignoring_retry_after(start: Start) -> None:
    ex = await start(weight_limit=60, ban_after_strikes=2)
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        params = {"symbol": "BTCUSDT", "limit": 1}
        assert (await c.get("/api/v3/trades", params=params)).status_code == 200
        assert (await c.get("/api/v3/trades", params=params)).status_code == 200
        r = await c.get("/api/v3/trades", params=params)
        assert r.status_code == 429 and r.json()["code"] == -1003
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "50"
        # Ignoring Retry-After: more 429s, then the ban, which covers every endpoint.
        statuses = [(await c.get("/api/v3/trades", params=params)).status_code for _ in range(2)]
        assert statuses == [429, 418]
        r = await c.get("/api/v3/ping")
        assert r.status_code == 418 and int(r.headers["Retry-After"]) > 60
    assert ex.counters["rest_418"] >= 2 and ex.counters["rest_429_weight"] >= 1


async def test_weight_resets_each_minute_of_the_exchange_clock(start: Start) -> None:
    ex = await start(weight_limit=30)
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        params = {"symbol": "BTCUSDT", "limit": 1}
        assert (await c.get("/api/v3/trades", params=params)).status_code == 200
        assert (await c.get("/api/v3/trades", params=params)).status_code == 429
        ex.advance_clock(60)
        r = await c.get("/api/v3/trades", params=params)
        assert r.status_code == 200 and r.headers["X-MBX-USED-WEIGHT-1M"] == "25"


async def test_microsecond_header_and_klines_without_range(start: Start) -> None:
    ex = await start()
    ex.market.generate("BTCUSDT", 50)
    async with httpx.AsyncClient(base_url=http_url(ex)) as c:
        r = await c.get(
            "/api/v3/trades",
            params={"symbol": "BTCUSDT", "limit": 1},
            headers={"X-MBX-TIME-UNIT": "MICROSECOND"},
        )
        assert len(str(r.json()[0]["time"])) == 16
        r = await c.get(
            "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m", "limit": 3}
        )
    rows = r.json()
    assert 1 <= len(rows) <= 3
    for row in rows:
        assert len(row) == 12 and row[6] == row[0] + 59_999 and row[11] == "0"
        assert [type(v) for v in row] == [
            int,
            str,
            str,
            str,
            str,
            str,
            int,
            str,
            int,
            str,
            str,
            str,
        ]
    assert sum(row[8] for row in rows) == 50
