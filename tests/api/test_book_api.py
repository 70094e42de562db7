"""GET /api/v1/book/{symbol}: the pure shaping (depth, views, stream payloads), then the real API
component (Hypercorn + Quart-Trio) against a real redis-server written by the book store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import trio

from marketd.api import book
from marketd.api.book import BadDepth, BookPushed, CorruptBook, book_view, parse_depth
from marketd.api.server import run_api
from marketd.books.board import BookView
from marketd.books.store import BookStore, BookWrite, book_key
from marketd.runtime import Runtime
from marketd.tickers.redis_server import RedisProcess, free_port
from tests.tickers.records import now_ms, runtime

BOOKS = ("BTCUSDT", "ETHUSDT")


def fields(**over: str) -> dict[str, str]:
    base = {
        "last_update_id": "42",
        "event_time": "1000",
        "updated_at": "1005",
        "in_sync": "true",
        "reason": "",
        "depth": "20",
        "bids": '[["100.5","1.0"],["100.0","2.0"]]',
        "asks": '[["101.0","3.0"],["102.0","4.0"]]',
    }
    return {**base, **over}


# -- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("1", 1), ("20", 20), (" 5 ", 5)])
def test_depth_is_absent_or_within_the_redis_depth(raw: str | None, expected: int | None) -> None:
    assert parse_depth(raw, 20) == expected


@pytest.mark.parametrize("raw", ["0", "21", "-1", "abc", "", "1.5", "²", "9" * 40])
def test_a_bad_depth_is_refused(raw: str) -> None:
    with pytest.raises(BadDepth):
        parse_depth(raw, 20)


def test_view_has_the_contract_fields_and_cuts_to_depth() -> None:
    view = book_view("BTCUSDT", fields(), 1500, 1)
    assert view == {
        "symbol": "BTCUSDT",
        "last_update_id": 42,
        "event_time": 1000,
        "updated_at": 1005,
        "bids": [("100.5", "1.0")],
        "asks": [("101.0", "3.0")],
        "age_ms": 500,
        "in_sync": True,
        "reason": None,
    }
    assert book_view("BTCUSDT", {}, 0) is None
    out = book_view("BTCUSDT", fields(in_sync="false", reason="gap", event_time="0"), 2005)
    assert out is not None and out["reason"] == "gap" and out["age_ms"] == 1000


@pytest.mark.parametrize(
    "bad",
    [{"bids": "nope"}, {"asks": '[["1"]]'}, {"in_sync": "yes"}, {"last_update_id": "x"}],
)
def test_a_hash_the_writer_did_not_write_is_corrupt(bad: dict[str, str]) -> None:
    with pytest.raises(CorruptBook):
        book_view("BTCUSDT", fields(**bad), 0)


def test_stream_payload_is_the_view_plus_age_at_send_time_per_depth() -> None:
    pushed = BookPushed.from_book_fields("7-1", "BTCUSDT", fields())
    assert pushed is not None and pushed.key == (7, 1)
    raw = pushed.book_event(1250, 1).decode()
    lines = raw.split("\n")
    assert lines[0] == "id: 7-1" and lines[1] == "event: book"
    data = json.loads(lines[2].removeprefix("data: "))
    assert data["age_ms"] == 250 and data["bids"] == [["100.5", "1.0"]]
    full = json.loads(pushed.data(1000, None))
    assert len(full["asks"]) == 2 and full["in_sync"] is True
    assert BookPushed.from_book_fields("8-0", "BTCUSDT", fields(bids="[")) is None


def test_book_symbols_default_to_the_diff_depth_streams() -> None:
    cfg: Any = SimpleNamespace(
        binance=SimpleNamespace(
            streams=("btcusdt@depth@100ms", "ethusdt@depth10", "bnbusdt@depth", "btcusdt@trade")
        )
    )
    assert book.book_symbols(cfg) == ("BTCUSDT", "BNBUSDT")


# -- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture
def books_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API keeps books for BOOKS (independent of which depth streams the config accepts)."""
    monkeypatch.setattr(book, "book_symbols", lambda _cfg: BOOKS)


@asynccontextmanager
async def api(redis_server: RedisProcess) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    rt = runtime(redis_url=redis_server.url, env={"API_PORT": str(free_port())})
    async with trio.open_nursery() as nursery:
        await nursery.start(run_api, rt)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{rt.config.api.port}", timeout=10
        ) as client:
            yield client, rt
        rt.draining.set()


def view(last: int, *, in_sync: bool = True, reason: str | None = None) -> BookView:
    return BookView(
        symbol="BTCUSDT",
        last_update_id=last,
        event_time=now_ms() - 50,
        bids=tuple((f"{100 - i}.0", "1.0") for i in range(25)),
        asks=tuple((f"{101 + i}.0", "2.0") for i in range(25)),
        in_sync=in_sync,
        reason=reason,
    )


def store_book(url: str, v: BookView) -> None:
    store = BookStore(url)
    try:
        store.write([BookWrite(v, force=True)], now_ms(), 60, 20)
    finally:
        store.close()


@pytest.mark.redis
@pytest.mark.usefixtures("books_kept")
async def test_get_book_answers_the_stored_top_levels(redis_server: RedisProcess) -> None:
    store_book(redis_server.url, view(77))
    with trio.fail_after(30):
        async with api(redis_server) as (client, _rt):
            r = await client.get("/api/v1/book/btcusdt")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["symbol"] == "BTCUSDT" and body["last_update_id"] == 77
            assert body["in_sync"] is True and 0 <= body["age_ms"] < 60_000
            assert len(body["bids"]) == len(body["asks"]) == 20  # all stored
            assert body["bids"][0] == ["100.0", "1.0"] and body["asks"][0] == ["101.0", "2.0"]
            shallow = (await client.get("/api/v1/book/BTCUSDT?depth=3")).json()
            assert len(shallow["bids"]) == 3 and shallow["asks"][2] == ["103.0", "2.0"]
            metrics = (await client.get("/metrics")).text
            assert 'route="/api/v1/book/{symbol}"' in metrics


@pytest.mark.redis
@pytest.mark.usefixtures("books_kept")
async def test_errors_untracked_malformed_bad_depth_no_data_out_of_sync_corrupt(
    redis_server: RedisProcess,
) -> None:
    with trio.fail_after(30):
        async with api(redis_server) as (client, _rt):

            async def get(path: str) -> tuple[int, dict[str, Any]]:
                r = await client.get(path)
                assert r.headers["content-type"].startswith("application/json")
                return r.status_code, r.json()

            status, body = await get("/api/v1/book/XRPUSDT")
            assert (status, body["error"]) == (404, "unknown_symbol")
            assert (await get("/api/v1/book/BTC-USDT"))[0] == 400
            assert (await get("/api/v1/book/BTC/USDT"))[0] == 400
            for depth in ("0", "21", "x"):
                status, body = await get(f"/api/v1/book/BTCUSDT?depth={depth}")
                assert (status, body["error"]) == (400, "invalid_depth")
            status, body = await get("/api/v1/book/ETHUSDT")
            assert (status, body["error"]) == (404, "no_data")

            store_book(redis_server.url, view(5, in_sync=False, reason="gap"))
            status, body = await get("/api/v1/book/BTCUSDT")
            assert status == 503 and body["error"] == "out_of_sync" and body["reason"] == "gap"

            raw = redis.Redis.from_url(redis_server.url)
            try:
                raw.hset(book_key("ETHUSDT"), mapping={"bids": "{", "in_sync": "true"})
                status, body = await get("/api/v1/book/ETHUSDT")
                assert (status, body["error"]) == (500, "corrupt_book")
            finally:
                raw.close()

            redis_server.stop()
            status, body = await get("/api/v1/book/BTCUSDT")
            assert (status, body["error"]) == (503, "redis_unavailable")


@pytest.mark.redis
@pytest.mark.usefixtures("books_kept")
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/v1/book/BTCUSDT HTTP/1.0\r\n\r\n",
        b"GET /api/v1/book/BTCUSDT?depth=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/book/NOPEUSDT HTTP/1.0\r\n\r\n",
    ],
)
async def test_http10_and_connection_close_are_answered_and_closed(
    redis_server: RedisProcess, request_bytes: bytes
) -> None:
    store_book(redis_server.url, view(9))
    with trio.fail_after(30):
        async with api(redis_server) as (_client, rt):
            stream = await trio.open_tcp_stream("127.0.0.1", rt.config.api.port)
            async with stream:
                await stream.send_all(request_bytes)
                data = bytearray()
                while chunk := await stream.receive_some():  # ends only when the server closes
                    data += chunk
            status = int(bytes(data).split(b" ", 2)[1])
            assert status == (404 if b"NOPE" in request_bytes else 200)


@pytest.mark.redis
@pytest.mark.usefixtures("books_kept")
async def test_openapi_documents_the_book_endpoint_and_stream(redis_server: RedisProcess) -> None:
    with trio.fail_after(30):
        async with api(redis_server) as (client, _rt):
            doc = (await client.get("/openapi.json")).json()
            get = doc["paths"]["/api/v1/book/{symbol}"]["get"]
            assert {"200", "400", "404", "503"} <= set(get["responses"])
            assert "Book" in doc["components"]["schemas"]
            stream = doc["paths"]["/api/v1/stream/book/{symbol}"]["get"]
            assert "text/event-stream" in stream["responses"]["200"]["content"]
            stats = (await client.get("/api/v1/dashboard/stats")).json()
            assert stats["books"] == list(BOOKS)
