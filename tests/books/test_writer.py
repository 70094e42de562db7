"""The book writer against a real redis-server: board views land in Redis, newest per symbol; a
Redis outage is the `books` health state while views keep conflating; resyncs; drain. The
writes and the outage hold for both write clients (trio-native for a plain TCP Redis, redis-py in a
thread otherwise)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import redis
import trio
import trio.lowlevel

from marketd.books.board import BookBoard, BookView
from marketd.books.store import BookStore, book_key
from marketd.books.writer import COMPONENT, BookWriter, run_book_writer
from marketd.runtime import Runtime
from marketd.tickers.redis_server import RedisProcess
from tests.tickers.records import runtime

pytestmark = pytest.mark.redis


def view(last: int, *, symbol: str = "BTCUSDT", in_sync: bool = True, price: str = "100.00",
         reason: str | None = None) -> BookView:  # fmt: skip
    return BookView(
        symbol=symbol,
        last_update_id=last,
        event_time=1_700_000_000_000 + last,
        bids=((price, "1.0"), ("99.00", "2.0")),
        asks=(("101.00", "3.0"),),
        in_sync=in_sync,
        reason=reason,
        received_at=time.monotonic(),
    )


async def until(check: Callable[[], bool]) -> None:
    """Bounded poll of a real server's state (the caller's fail_after is the bound)."""
    while not check():
        await trio.sleep(0.02)


def stored(client: redis.Redis, symbol: str = "BTCUSDT") -> dict[str, str]:
    return client.hgetall(book_key(symbol))  # type: ignore[return-value]


@asynccontextmanager
async def writer(
    rt: Runtime, board: BookBoard, depth: int = 20, *, native: bool = True
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(run_book_writer, rt, board, redis_depth=depth, native=native)
        )
        yield
        rt.draining.set()


def healthy(rt: Runtime) -> bool:
    h = rt.health.components.get(COMPONENT)
    return h is not None and h.healthy


NATIVE = pytest.mark.parametrize("native", [True, False], ids=["trio", "redis-py"])


@NATIVE
async def test_views_land_in_redis_newest_per_symbol(
    redis_server: RedisProcess, native: bool
) -> None:
    rt = runtime(redis_url=redis_server.url)
    board = BookBoard()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        enabled = rt.config.components.enabled()
        assert COMPONENT not in rt.health.entries(enabled)  # no books kept: no entry in /readyz
        with trio.fail_after(20):
            async with writer(rt, board, depth=1, native=native):
                await until(lambda: healthy(rt))
                entry = rt.health.entries(enabled)[COMPONENT]
                assert entry["healthy"] and entry["reason"].startswith("writing books to redis")
                board.publish(view(1))
                board.publish(view(2, price="100.50"))
                board.publish(view(7, symbol="ETHUSDT"))
                await until(lambda: stored(client, "ETHUSDT").get("last_update_id") == "7")
                await until(lambda: stored(client).get("last_update_id") == "2")
                book = stored(client)
                assert json.loads(book["bids"]) == [["100.50", "1.0"]]  # depth 1
                assert book["in_sync"] == "true"
                # A resync: out of sync (written), then a book from an older snapshot id.
                board.publish(view(2, in_sync=False, reason="gap"))
                await until(lambda: stored(client).get("in_sync") == "false")
                assert stored(client)["reason"] == "gap"
                board.publish(view(1, price="98.00"))
                await until(lambda: stored(client).get("last_update_id") == "1")
            metrics = rt.metrics.exposition().decode()
            assert 'marketd_book_redis_writes_total{result="stored"}' in metrics
            assert 'marketd_book_update_to_redis_seconds_count{symbol="BTCUSDT"}' in metrics
            entries = client.xlen("books:updates")
            assert entries >= 4
    finally:
        client.close()


@NATIVE
async def test_a_redis_outage_is_a_health_state_and_the_newest_view_is_written_after(
    redis_server: RedisProcess, native: bool
) -> None:
    rt = runtime(redis_url=redis_server.url)
    board = BookBoard()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with trio.fail_after(30):
            async with writer(rt, board, native=native):
                board.publish(view(1))
                await until(lambda: stored(client).get("last_update_id") == "1")
                redis_server.stop()
                for last in range(2, 200):  # never blocks: the board conflates
                    board.publish(view(last))
                    await trio.lowlevel.checkpoint()
                await until(lambda: not healthy(rt))
                reason = rt.health.components[COMPONENT].reason
                assert reason.startswith("redis unreachable at 127.0.0.1:")
                assert rt.health.dependencies["redis"].up is False
                board.publish(view(200))
                redis_server.start()
                client.close()
                client = redis.Redis.from_url(redis_server.url, decode_responses=True)
                await until(lambda: stored(client).get("last_update_id") == "200")
                await until(lambda: healthy(rt))
                # The restarted Redis (no persistence) was empty: the writer wrote the newest.
                assert client.xlen("books:updates") <= 3
        metrics = rt.metrics.exposition().decode()
        conflated = [
            line
            for line in metrics.splitlines()
            if line.startswith("marketd_book_views_conflated_total")
        ]
        assert conflated and float(conflated[0].split()[-1]) > 100
    finally:
        client.close()


async def test_drain_writes_what_is_pending_and_returns(redis_server: RedisProcess) -> None:
    rt = runtime(redis_url=redis_server.url)
    board = BookBoard()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_book_writer, rt, board)
                board.publish(view(3))
                rt.draining.set()
            assert stored(client).get("last_update_id") == "3"
            assert rt.health.components[COMPONENT].reason == "stopped"
    finally:
        client.close()


async def test_quiet_books_are_rewritten_within_a_third_of_the_ttl() -> None:
    rt = runtime(redis_url="redis://127.0.0.1:1/0")
    board = BookBoard()
    w = BookWriter(rt, board, BookStore("redis://127.0.0.1:1/0"), ttl_s=30)
    board.publish(view(5))
    board.publish(view(6, symbol="ETHUSDT"))
    w.take()
    w.pending.clear()
    w.written_at = {"BTCUSDT": 100.0, "ETHUSDT": 105.0}
    w.refresh_quiet(109.0)
    assert list(w.pending) == []
    w.refresh_quiet(110.0)  # BTCUSDT: 10 s = ttl/3 without a write
    assert [(s, v.last_update_id) for s, v in w.pending.items()] == [("BTCUSDT", 5)]


async def test_the_trio_client_only_for_plain_tcp_stores() -> None:
    rt = runtime(redis_url="redis://127.0.0.1:1/0")
    board = BookBoard()
    stores = {
        url: BookStore(url)
        for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/nope.sock")
    }
    try:
        native = {url: BookWriter(rt, board, s).native is not None for url, s in stores.items()}
        assert native == {
            "redis://127.0.0.1:1/0": True,
            "rediss://127.0.0.1:1/0": False,
            "unix:///tmp/nope.sock": False,
        }
        assert BookWriter(rt, board, stores["redis://127.0.0.1:1/0"], native=False).native is None
    finally:
        for s in stores.values():
            s.close()
