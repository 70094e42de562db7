"""The push API: the pure per-client queue, and the SSE streams over a real Hypercorn socket
against a real redis-server (snapshot, live updates, resume with Last-Event-ID, filters, the
stream cap, slow clients, a Redis outage, health, drain)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from marketd.api.fanout import ClientQueue, Offer, Pushed, id_key
from marketd.api.server import hypercorn_config, run_api, serve_app
from marketd.api.stream import StreamApp, StreamLimits, StreamMetrics, TickerHub
from marketd.runtime import Runtime
from marketd.tickers.redis_server import RedisProcess, free_port
from marketd.tickers.store import TickerStore
from tests.support.sse import SSEClient
from tests.tickers.records import now_ms, runtime, ticker


def pushed(update_id: str, symbol: str = "BTCUSDT", price: str = "1.0") -> Pushed:
    return Pushed.from_fields(update_id, symbol, {"last_price": price, "event_time": "5"})


# -- the pure queue ----------------------------------------------------------------------------


def test_conflation_keeps_the_newest_per_symbol_in_id_order() -> None:
    q = ClientQueue(None)
    assert q.offer(pushed("1-0", "BTCUSDT", "1"), 0.0) is Offer.QUEUED
    assert q.offer(pushed("2-0", "ETHUSDT", "2"), 0.0) is Offer.QUEUED
    assert q.offer(pushed("3-0", "BTCUSDT", "3"), 0.0) is Offer.CONFLATED
    taken = q.take()
    assert [(u.symbol, u.id) for u in taken] == [("ETHUSDT", "2-0"), ("BTCUSDT", "3-0")]
    assert q.take() == [] and q.after == (3, 0) and q.behind_since is None


def test_filters_unfollowed_symbols_and_what_the_snapshot_covers() -> None:
    q = ClientQueue(frozenset({"ETHUSDT"}))
    assert q.offer(pushed("1-0", "BTCUSDT"), 0.0) is Offer.FILTERED
    q.offer(pushed("2-0", "ETHUSDT"), 0.0)
    q.offer(pushed("4-0", "ETHUSDT"), 0.0)
    q.reset((3, 0))  # a snapshot taken at 3-0 already has 2-0
    assert [u.id for u in q.take()] == ["4-0"]
    assert q.offer(pushed("4-0", "ETHUSDT"), 0.0) is Offer.FILTERED


def test_a_client_behind_too_long_overflows() -> None:
    q = ClientQueue(None, max_behind_s=10.0)
    q.offer(pushed("1-0"), 100.0)
    assert q.behind_s(105.0) == 5.0
    assert q.offer(pushed("2-0"), 109.0) is Offer.CONFLATED
    assert q.offer(pushed("3-0"), 110.5) is Offer.BEHIND


def test_without_conflation_every_update_queues_up_to_the_limit() -> None:
    q = ClientQueue(None, conflate=False, max_pending=2)
    assert q.offer(pushed("1-0"), 0.0) is Offer.QUEUED
    assert q.offer(pushed("2-0"), 0.0) is Offer.QUEUED
    assert q.offer(pushed("3-0"), 0.0) is Offer.OVERFLOW
    assert [u.id for u in q.take()] == ["1-0", "2-0"]


def test_event_carries_the_ticker_json_plus_age() -> None:
    update = Pushed.from_fields(
        "7-1", "BTCUSDT", {"last_price": "2.50", "event_time": "1000", "trades_count": "3"}
    )
    raw = update.event(1250).decode()
    lines = raw.split("\n")
    assert lines[0] == "id: 7-1" and lines[1] == "event: ticker" and raw.endswith("\n\n")
    body = json.loads(lines[2].removeprefix("data: "))
    assert body["symbol"] == "BTCUSDT" and body["last_price"] == "2.50"
    assert body["age_ms"] == 250 and body["trades_count"] == 3 and body["complete"] is False


# -- over HTTP ---------------------------------------------------------------------------------


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
async def api(rt: Runtime) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """The real API component (create_app + Hypercorn) on rt's port; drained on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(run_api, rt)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{rt.config.api.port}", timeout=10
        ) as client:
            yield client, rt.config.api.port
        rt.draining.set()


def make_rt(redis_server: RedisProcess, symbols: str = "BTCUSDT,ETHUSDT") -> Runtime:
    return runtime(
        redis_url=redis_server.url,
        env={"API_PORT": str(free_port()), "TICKER_SYMBOLS": symbols},
    )


def write(url: str, *records: Any) -> list[Any]:
    store = TickerStore(url)
    try:
        return store.write(list(records), now_ms(), 60)
    finally:
        store.close()


@pytest.mark.redis
async def test_snapshot_then_one_event_per_stored_update(redis_server: RedisProcess) -> None:
    t = now_ms() - 100
    write(redis_server.url, ticker("BTCUSDT", t, last_price="100.00"))
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with api(rt) as (client, port), sse(port, "/api/v1/stream/tickers") as stream:
            snap = await stream.next()
            assert snap.event == "snapshot" and snap.id is not None
            assert [x["symbol"] for x in snap.data["tickers"]] == ["BTCUSDT"]
            assert snap.data["missing"] == ["ETHUSDT"]
            polled = (await client.get("/api/v1/ticker/BTCUSDT")).json()
            assert snap.data["tickers"][0]["last_price"] == polled["last_price"] == "100.00"

            [stored] = write(redis_server.url, ticker("BTCUSDT", t + 1, last_price="101.00"))
            write(redis_server.url, ticker("BTCUSDT", t, last_price="99.00"))  # older: no event
            write(redis_server.url, ticker("ETHUSDT", t + 2, last_price="5.00"))
            first, second = await stream.next(), await stream.next()
            assert (first.event, first.id) == ("ticker", stored.update_id)
            assert first.data["last_price"] == "101.00" and first.data["event_time"] == t + 1
            assert first.data["age_ms"] >= 0 and first.data["complete"] is True
            expected = (await client.get("/api/v1/ticker/BTCUSDT")).json()
            assert {k: v for k, v in first.data.items() if k != "age_ms"} == {
                k: v for k, v in expected.items() if k != "age_ms"
            }
            assert second.data["symbol"] == "ETHUSDT"
            assert second.id is not None and first.id is not None
            assert id_key(second.id) > id_key(first.id)  # ids order as written
            metrics = (await client.get("/metrics")).text
            assert 'marketd_stream_clients{stream="tickers"} 1.0' in metrics
            assert "marketd_stream_events_sent_total" in metrics


@pytest.mark.redis
async def test_last_event_id_resumes_with_what_changed(redis_server: RedisProcess) -> None:
    t = now_ms() - 100
    write(redis_server.url, ticker("BTCUSDT", t), ticker("ETHUSDT", t))
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with api(rt) as (_client, port):
            async with sse(port, "/api/v1/stream/tickers") as stream:
                last_id = (await stream.next()).id
            assert last_id is not None
            # Gone: three updates, two of the same symbol.
            write(redis_server.url, ticker("BTCUSDT", t + 1, last_price="1.00"))
            write(redis_server.url, ticker("ETHUSDT", t + 1, last_price="2.00"))
            [newest] = write(redis_server.url, ticker("BTCUSDT", t + 2, last_price="3.00"))
            async with sse(port, "/api/v1/stream/tickers", {"Last-Event-ID": last_id}) as stream:
                a, b = await stream.next(), await stream.next()
                assert (a.event, a.data["symbol"], a.data["last_price"]) == (
                    "ticker",
                    "ETHUSDT",
                    "2.00",
                )
                assert (b.data["symbol"], b.data["last_price"], b.id) == (
                    "BTCUSDT",
                    "3.00",
                    newest.update_id,
                )
                # Live from there on, without repeating what the resume sent.
                write(redis_server.url, ticker("ETHUSDT", t + 3, last_price="4.00"))
                c = await stream.next()
                assert (c.data["symbol"], c.data["last_price"]) == ("ETHUSDT", "4.00")
            # An id the stream does not know (trimmed, or another Redis): a fresh snapshot.
            async with sse(port, "/api/v1/stream/tickers", {"Last-Event-ID": "1-0"}) as s:
                snap = await s.next()
                assert snap.event == "snapshot" and len(snap.data["tickers"]) == 2


@pytest.mark.redis
async def test_symbols_filter_and_bad_requests(redis_server: RedisProcess) -> None:
    t = now_ms() - 100
    write(redis_server.url, ticker("BTCUSDT", t), ticker("ETHUSDT", t))
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with api(rt) as (client, port):
            async with sse(port, "/api/v1/stream/tickers?symbols=ethusdt") as stream:
                snap = await stream.next()
                assert [x["symbol"] for x in snap.data["tickers"]] == ["ETHUSDT"]
                write(redis_server.url, ticker("BTCUSDT", t + 1))
                write(redis_server.url, ticker("ETHUSDT", t + 1, last_price="7.00"))
                event = await stream.next()
                assert event.data["symbol"] == "ETHUSDT" and event.data["last_price"] == "7.00"
            bad = await client.get("/api/v1/stream/tickers?symbols=BTC/USDT")
            assert bad.status_code == 400 and bad.json()["error"] == "invalid_symbol"
            unknown = await client.get("/api/v1/stream/tickers?symbols=DOGEUSDT")
            assert unknown.status_code == 400 and unknown.json()["error"] == "unknown_symbol"
            book = await client.get("/api/v1/stream/book/BTCUSDT")  # no depth stream: no book
            assert book.status_code == 404 and book.json()["error"] == "unknown_symbol"
            post = await client.post("/api/v1/stream/tickers")
            assert post.status_code == 405


@asynccontextmanager
async def bare_stream_app(
    rt: Runtime, limits: StreamLimits
) -> AsyncIterator[tuple[TickerHub, httpx.AsyncClient, int]]:
    """A hub with test limits behind a StreamApp on Hypercorn (no Quart in front)."""
    assert rt.redis_url is not None
    tail = TickerStore(rt.redis_url, timeout_s=3.0)
    reads = TickerStore(rt.redis_url, timeout_s=1.0)
    hub = TickerHub(tail, reads, StreamMetrics(rt.metrics), limits, tracked=("BTCUSDT", "ETHUSDT"))

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = StreamApp(fallback, rt, hub, ("BTCUSDT", "ETHUSDT"))
    port = free_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run, stop)
        await nursery.start(serve_app, app, hypercorn_config("127.0.0.1", port), stop.wait)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            yield hub, c, port
        stop.set()
    tail.close()
    reads.close()


@pytest.mark.redis
async def test_stream_cap_answers_503(redis_server: RedisProcess) -> None:
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with (
            bare_stream_app(rt, StreamLimits(max_clients=1)) as (hub, client, port),
            sse(port, "/api/v1/stream/tickers") as first,
        ):
            await first.next()
            refused = await client.get("/api/v1/stream/tickers")
            assert refused.status_code == 503 and refused.json()["error"] == "too_many_streams"
            assert hub.metrics.rejected._value.get() >= 1


@pytest.mark.redis
async def test_a_client_that_disconnects_leaves_the_hub(redis_server: RedisProcess) -> None:
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with bare_stream_app(rt, StreamLimits()) as (hub, _client, port):
            async with sse(port, "/api/v1/stream/tickers") as stream:
                await stream.next()
                assert len(hub.clients) == 1
            # The socket closed: Hypercorn reports http.disconnect and the stream's task ends.
            while hub.clients:
                await trio.sleep(0.01)
            assert hub.metrics.clients.labels("tickers")._value.get() == 0


@pytest.mark.redis
async def test_keep_alive_comments_while_nothing_changes(redis_server: RedisProcess) -> None:
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with (
            bare_stream_app(rt, StreamLimits(keepalive_s=0.1)) as (_hub, _client, port),
            sse(port, "/api/v1/stream/tickers") as stream,
        ):
            assert (await stream.next()).event == "snapshot"
            while stream.comments < 2:
                with trio.move_on_after(0.5):
                    await stream.next()  # no update comes: only comments arrive


@pytest.mark.redis
async def test_a_client_that_stops_reading_is_dropped_and_others_keep_up(
    redis_server: RedisProcess,
) -> None:
    rt = make_rt(redis_server)
    limits = StreamLimits(max_behind_s=0.5, max_pending=10**9)
    with trio.fail_after(60):
        async with bare_stream_app(rt, limits) as (hub, _client, port):
            # The stuck client: asks for every update (no conflation) and never reads.
            stuck = socket.socket()
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.connect(("127.0.0.1", port))
            stuck.sendall(b"GET /api/v1/stream/tickers?conflate=0 HTTP/1.1\r\nHost: x\r\n\r\n")
            seen: list[int] = []

            async def follow(healthy: SSEClient) -> None:
                while True:
                    event = await healthy.next(timeout=30)
                    if event.event == "ticker":
                        seen.append(event.data["event_time"])

            try:
                async with (
                    sse(port, "/api/v1/stream/tickers") as healthy,
                    trio.open_nursery() as nursery,
                ):
                    assert (await healthy.next()).event == "snapshot"
                    nursery.start_soon(follow, healthy)
                    with trio.fail_after(5):
                        while len(hub.clients) < 2:
                            await trio.sleep(0.01)
                    t = now_ms()
                    n = 0
                    store = TickerStore(redis_server.url)
                    try:
                        while hub.metrics.dropped.labels("behind")._value.get() < 1:
                            # Enough bytes to fill the stuck socket's buffers (a few MB).
                            batch = [ticker("BTCUSDT", t + n + i) for i in range(1000)]
                            await trio.to_thread.run_sync(store.write, batch, t, 60)
                            n += len(batch)
                            assert n < 300_000, "the stuck client was never dropped"
                    finally:
                        store.close()
                    # The reading client gets the newest price, despite the stuck one.
                    with trio.fail_after(10):
                        while not seen or seen[-1] != t + n - 1:
                            await trio.sleep(0.01)
                    assert len(hub.clients) == 1 and hub.parked == 1
                    assert hub.metrics.dropped.labels("behind")._value.get() == 1
                    nursery.cancel_scope.cancel()
                # Once the stuck client reads, its stream ends: the server closes it.
                stuck.setblocking(False)
                with trio.fail_after(20):
                    while True:
                        await trio.lowlevel.wait_readable(stuck)
                        if not stuck.recv(1 << 20):
                            break
                with trio.fail_after(5):
                    while hub.parked:
                        await trio.sleep(0.01)
            finally:
                stuck.close()


@pytest.mark.redis
async def test_redis_outage_is_reported_then_a_fresh_snapshot(redis_server: RedisProcess) -> None:
    t = now_ms() - 100
    write(redis_server.url, ticker("BTCUSDT", t))
    rt = make_rt(redis_server)
    with trio.fail_after(60):
        async with (
            api(rt) as (client, port),
            sse(port, "/api/v1/stream/tickers") as tickers,
            sse(port, "/api/v1/stream/health") as health,
        ):
            assert (await tickers.next()).event == "snapshot"
            first = await health.next()
            assert first.event == "health" and first.id is not None
            assert first.data["components"]["api"]["healthy"] is True
            redis_server.stop()
            status = await tickers.next(timeout=20)
            assert status.event == "status" and status.data["redis"] is False
            while (await health.next(timeout=20)).data["stream"]["redis"]:
                pass
            polled = await client.get("/api/v1/ticker/BTCUSDT")
            assert polled.status_code == 503  # the API itself stays up
            redis_server.start()
            write(redis_server.url, ticker("BTCUSDT", t + 5, last_price="9.00"))
            while (event := await tickers.next(timeout=20)).event != "snapshot":
                assert event.event == "status"
            # Redis came back empty but for the new write: the snapshot says exactly that.
            assert [x["last_price"] for x in event.data["tickers"]] == ["9.00"]
            while not (await health.next(timeout=20)).data["stream"]["redis"]:
                pass


@pytest.mark.redis
async def test_drain_ends_open_streams(redis_server: RedisProcess) -> None:
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_api, rt)
            port = rt.config.api.port
            tickers = await SSEClient.connect("127.0.0.1", port, "/api/v1/stream/tickers")
            health = await SSEClient.connect("127.0.0.1", port, "/api/v1/stream/health")
            await tickers.next()
            await health.next()
            rt.draining.set()
            await tickers.wait_closed()
            await health.wait_closed()
            await tickers.aclose()
            await health.aclose()
        # run_api returned well within Hypercorn's graceful timeout: nothing held it open.


@pytest.mark.redis
async def test_dashboard_page_assets_stats_and_openapi(redis_server: RedisProcess) -> None:
    rt = make_rt(redis_server)
    with trio.fail_after(30):
        async with api(rt) as (client, _port):
            page = await client.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "unsafe" not in csp
            assert "<script>" not in page.text  # no inline script: only src=
            script = await client.get("/assets/dashboard.js")
            assert script.status_code == 200 and "javascript" in script.headers["content-type"]
            assert "innerHTML" not in script.text and "eval(" not in script.text
            assert (await client.get("/assets/../app.py")).status_code == 404
            stats = (await client.get("/api/v1/dashboard/stats")).json()
            assert stats["symbols"] == ["BTCUSDT", "ETHUSDT"] and "series" in stats
            doc = (await client.get("/openapi.json")).json()
            for path in ("/api/v1/stream/tickers", "/api/v1/stream/health"):
                assert (
                    "text/event-stream" in doc["paths"][path]["get"]["responses"]["200"]["content"]
                )
