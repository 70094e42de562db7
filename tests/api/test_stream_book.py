"""The order-book stream (GET /api/v1/stream/book/{symbol}) over a real Hypercorn socket against a
real redis-server written by the book store: snapshot, one event per stored book, depth, resume
with Last-Event-ID, out of sync, errors, the shared client cap, a Redis outage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from marketd.api import book
from marketd.api.book import BookPushed, BookSettings
from marketd.api.fanout import id_key
from marketd.api.server import hypercorn_config, run_api, serve_app
from marketd.api.stream import StreamApp, StreamLimits, StreamMetrics, TickerHub
from marketd.books.board import BookView
from marketd.books.store import BookStore, BookWrite, WriteResult
from marketd.tickers.redis_server import RedisProcess, free_port
from marketd.tickers.store import TickerStore
from tests.support.sse import SSEClient
from tests.tickers.records import now_ms, runtime

pytestmark = pytest.mark.redis

BOOKS = ("BTCUSDT", "ETHUSDT")


@pytest.fixture(autouse=True)
def books_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API keeps books for BOOKS (independent of which depth streams the config accepts)."""
    monkeypatch.setattr(book, "book_symbols", lambda _cfg: BOOKS)


def view(
    last: int,
    symbol: str = "BTCUSDT",
    *,
    bid: str = "100.0",
    in_sync: bool = True,
    reason: str | None = None,
) -> BookView:
    return BookView(
        symbol=symbol,
        last_update_id=last,
        event_time=now_ms() - 20,
        bids=((bid, "1.0"), ("99.0", "2.0"), ("98.0", "3.0")),
        asks=(("101.0", "1.5"), ("102.0", "2.5"), ("103.0", "3.5")),
        in_sync=in_sync,
        reason=reason,
    )


def write(url: str, v: BookView) -> WriteResult:
    store = BookStore(url)
    try:
        [result] = store.write([BookWrite(v)], now_ms(), 60, 20)
        return result
    finally:
        store.close()


@asynccontextmanager
async def sse(
    port: int, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SSEClient]:
    client = await SSEClient.connect("127.0.0.1", port, path, headers)
    assert client.headers["content-type"].startswith("text/event-stream")
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def api(redis_server: RedisProcess) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    rt = runtime(redis_url=redis_server.url, env={"API_PORT": str(free_port())})
    async with trio.open_nursery() as nursery:
        await nursery.start(run_api, rt)
        port = rt.config.api.port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client, port
        rt.draining.set()


async def test_snapshot_then_one_event_per_stored_book(redis_server: RedisProcess) -> None:
    write(redis_server.url, view(10))
    with trio.fail_after(30):
        async with (
            api(redis_server) as (client, port),
            sse(port, "/api/v1/stream/book/btcusdt") as stream,
        ):
            snap = await stream.next()
            assert snap.event == "snapshot" and snap.id is not None
            assert snap.data["symbol"] == "BTCUSDT" and snap.data["book"]["last_update_id"] == 10
            polled = (await client.get("/api/v1/book/BTCUSDT")).json()
            assert snap.data["book"]["bids"] == polled["bids"]

            first = write(redis_server.url, view(11, bid="100.5"))
            write(redis_server.url, view(9))  # older: not stored, no event
            write(redis_server.url, view(50, "ETHUSDT"))  # another symbol: not followed
            second = write(redis_server.url, view(12, bid="100.7"))
            a = await stream.next()
            assert (a.event, a.id) == ("book", first.update_id)
            assert a.data["last_update_id"] == 11 and a.data["bids"][0] == ["100.5", "1.0"]
            assert a.data["in_sync"] is True and a.data["age_ms"] >= 0
            b = await stream.next()
            assert b.id == second.update_id and b.data["last_update_id"] == 12
            assert a.id is not None and b.id is not None and id_key(b.id) > id_key(a.id)
            expected = (await client.get("/api/v1/book/BTCUSDT")).json()
            assert {k: v for k, v in b.data.items() if k != "age_ms"} == {
                k: v for k, v in expected.items() if k != "age_ms"
            }
            metrics = (await client.get("/metrics")).text
            assert 'marketd_stream_clients{stream="book"} 1.0' in metrics
            assert 'marketd_stream_events_sent_total{stream="book"}' in metrics


async def test_depth_out_of_sync_and_a_symbol_without_a_book(redis_server: RedisProcess) -> None:
    with trio.fail_after(30):
        async with (
            api(redis_server) as (_client, port),
            sse(port, "/api/v1/stream/book/BTCUSDT?depth=1") as stream,
        ):
            snap = await stream.next()
            assert snap.event == "snapshot" and snap.data == {"symbol": "BTCUSDT", "book": None}
            write(redis_server.url, view(3))
            event = await stream.next()
            assert event.data["bids"] == [["100.0", "1.0"]] and len(event.data["asks"]) == 1
            write(redis_server.url, view(3, in_sync=False, reason="gap"))
            event = await stream.next()
            assert event.data["in_sync"] is False and event.data["reason"] == "gap"


async def test_last_event_id_resumes_with_the_newest_book(redis_server: RedisProcess) -> None:
    write(redis_server.url, view(1))
    with trio.fail_after(30):
        async with api(redis_server) as (_client, port):
            async with sse(port, "/api/v1/stream/book/BTCUSDT") as stream:
                last_id = (await stream.next()).id
            assert last_id is not None
            write(redis_server.url, view(2))
            write(redis_server.url, view(7, "ETHUSDT"))
            newest = write(redis_server.url, view(3, bid="100.9"))
            headers = {"Last-Event-ID": last_id}
            async with sse(port, "/api/v1/stream/book/BTCUSDT", headers) as stream:
                resumed = await stream.next()
                assert (resumed.event, resumed.id) == ("book", newest.update_id)
                assert resumed.data["last_update_id"] == 3
                write(redis_server.url, view(4))
                live = await stream.next()
                assert live.data["last_update_id"] == 4  # live from there, nothing repeated
            async with sse(port, "/api/v1/stream/book/BTCUSDT", {"Last-Event-ID": "1-0"}) as s:
                snap = await s.next()
                assert snap.event == "snapshot" and snap.data["book"]["last_update_id"] == 4


async def test_bad_requests(redis_server: RedisProcess) -> None:
    with trio.fail_after(30):
        async with api(redis_server) as (client, _port):

            async def error(path: str) -> tuple[int, str]:
                r = await client.get(path)
                return r.status_code, r.json()["error"]

            assert await error("/api/v1/stream/book/DOGEUSDT") == (404, "unknown_symbol")
            assert await error("/api/v1/stream/book/BTC-USDT") == (400, "invalid_symbol")
            assert await error("/api/v1/stream/book/BTCUSDT?depth=21") == (400, "invalid_depth")
            assert (await client.post("/api/v1/stream/book/BTCUSDT")).status_code == 405


async def test_the_client_cap_is_shared_with_the_ticker_stream(redis_server: RedisProcess) -> None:
    rt = runtime(redis_url=redis_server.url)
    url = redis_server.url
    limits = StreamLimits(max_clients=1)
    metrics = StreamMetrics(rt.metrics)
    tickers = TickerHub(TickerStore(url), TickerStore(url), metrics, limits, tracked=BOOKS)
    books = TickerHub(
        BookStore(url, timeout_s=3.0),
        BookStore(url),
        metrics,
        limits,
        tracked=BOOKS,
        stream="book",
        source="books:updates",
        pushed=BookPushed.from_book_fields,
    )
    tickers.peer, books.peer = books, tickers
    app = StreamApp(_not_found, rt, tickers, BOOKS, book_hub=books, books=BookSettings(BOOKS))
    port = free_port()
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(tickers.run, stop)
            await nursery.start(books.run, stop)
            await nursery.start(serve_app, app, hypercorn_config("127.0.0.1", port), stop.wait)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
                sse(port, "/api/v1/stream/tickers") as first,
            ):
                await first.next()
                refused = await client.get("/api/v1/stream/book/BTCUSDT")
                assert refused.status_code == 503
                assert refused.json()["error"] == "too_many_streams"
            stop.set()
    for hub in (tickers, books):
        hub._tail.close()
        hub._reads.close()


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_redis_outage_is_reported_then_a_fresh_snapshot(redis_server: RedisProcess) -> None:
    write(redis_server.url, view(5))
    with trio.fail_after(60):
        async with (
            api(redis_server) as (_client, port),
            sse(port, "/api/v1/stream/book/BTCUSDT") as stream,
        ):
            assert (await stream.next()).event == "snapshot"
            redis_server.stop()
            status = await stream.next(timeout=20)
            assert status.event == "status" and status.data["redis"] is False
            redis_server.start()
            write(redis_server.url, view(6, bid="100.2"))
            while (event := await stream.next(timeout=20)).event != "snapshot":
                assert event.event in ("status", "book")
            assert event.data["book"]["last_update_id"] == 6
