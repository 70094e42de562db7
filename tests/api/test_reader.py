"""The API's trio-native Redis reads (NativeReads) against a real redis-server."""

from __future__ import annotations

import pytest
import redis
import trio

from marketd.api.reader import NativeReads, TickerReader
from marketd.errors import StoreUnavailable
from marketd.tickers.redis_server import RedisProcess
from marketd.tickers.store import TickerStore
from tests.tickers.records import now_ms, ticker

pytestmark = pytest.mark.redis


async def test_native_reads_match_redis_py_and_survive_a_restart(
    redis_server: RedisProcess,
) -> None:
    store = TickerStore(redis_server.url, timeout_s=1.0)
    t = now_ms()
    store.write([ticker("BTCUSDT", t), ticker("ETHUSDT", t)], t, 60)
    address = store.tcp_address()
    assert address is not None
    native = NativeReads(address)
    try:
        with trio.fail_after(20):
            symbols = ["BTCUSDT", "NOPEUSDT", "ETHUSDT"]
            assert await native.read(symbols) == store.read(symbols)
            redis_server.stop()
            with pytest.raises(StoreUnavailable):
                await native.read(symbols)
            redis_server.start()
            assert await native.read(["BTCUSDT"]) == [{}]  # fresh, empty Redis: reconnected
            redis.Redis.from_url(redis_server.url).set("ticker:XRPUSDT", "not a hash")
            with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
                await native.read(["XRPUSDT"])
    finally:
        await native.close()
        store.close()


async def test_reader_uses_the_native_path_for_tcp_stores(redis_server: RedisProcess) -> None:
    store = TickerStore(redis_server.url, timeout_s=1.0)
    t = now_ms()
    store.write([ticker("BTCUSDT", t, last_price="3.00")], t, 60)
    reader = TickerReader(store)
    assert reader._native is not None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            [row] = await reader.read(["BTCUSDT"])
            assert row["last_price"] == "3.00"
            reader.stop()
    with pytest.raises(StoreUnavailable):
        await reader.read(["BTCUSDT"])
    store.close()
