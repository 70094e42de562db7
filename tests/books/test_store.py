"""The book store against a real redis-server: the hash, atomic conditional writes, resyncs,
the update stream, reads, and an outage as StoreUnavailable. Every write behaviour holds for both
write clients: redis-py (`BookStore.write`) and the trio-native one (`NativeBookWrites`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
import trio

from marketd.books.board import BookView
from marketd.books.store import (
    CONDITIONAL_WRITE_SHA,
    HASH_FIELDS,
    UPDATES_KEY,
    UPDATES_MAXLEN,
    BookStore,
    BookWrite,
    NativeBookWrites,
    WriteResult,
    WriteStatus,
    book_key,
    evalsha_commands,
    hash_fields,
)
from marketd.errors import StoreUnavailable
from marketd.redis_wire import command
from marketd.tickers.redis_server import RedisProcess

pytestmark = pytest.mark.redis


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def view(
    last: int,
    *,
    symbol: str = "BTCUSDT",
    in_sync: bool = True,
    reason: str | None = None,
    levels: int = 30,
    event_time: int = 1_700_000_000_000,
) -> BookView:
    return BookView(
        symbol=symbol,
        last_update_id=last,
        event_time=event_time,
        bids=tuple((f"{100 - i}.00", f"{i + 1}.5") for i in range(levels)),
        asks=tuple((f"{101 + i}.00", f"{i + 2}.25") for i in range(levels)),
        in_sync=in_sync,
        reason=reason,
    )


Put = Callable[[Sequence[BookWrite], int, int, int], list[WriteResult]]


def write(put: Put, *views: BookView, force: bool = False, depth: int = 20) -> list[WriteResult]:
    return put([BookWrite(v, force) for v in views], now_ms(), 60, depth)


@pytest.fixture
def store(redis_server: RedisProcess) -> Iterator[BookStore]:
    s = BookStore(redis_server.url, timeout_s=1.0)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["redis-py", "trio"])
def put(request: pytest.FixtureRequest, store: BookStore) -> Put:
    """One write client; the trio one connects per call (a trio socket lives in one trio.run)."""
    if request.param == "redis-py":
        return store.write
    address = store.tcp_address()
    assert address is not None

    def native(writes: Sequence[BookWrite], t: int, ttl_s: int, depth: int) -> list[WriteResult]:
        async def once() -> list[WriteResult]:
            client = NativeBookWrites(address)
            try:
                with trio.fail_after(10):
                    return await client.write(writes, t, ttl_s, depth)
            finally:
                await client.close()

        return trio.run(once)

    return native


@pytest.fixture
def raw(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def test_write_stores_the_top_levels_with_ids_times_and_ttl(put: Put, raw: redis.Redis) -> None:
    t = now_ms()
    [result] = put([BookWrite(view(42))], t, 60, 20)
    assert result.status is WriteStatus.STORED and result.stored_update_id == 42
    stored = raw.hgetall("book:BTCUSDT")
    assert tuple(sorted(stored)) == tuple(sorted(HASH_FIELDS))
    assert stored["last_update_id"] == "42" and stored["event_time"] == "1700000000000"
    assert stored["updated_at"] == str(t) and stored["in_sync"] == "true"
    assert stored["reason"] == "" and stored["depth"] == "20"
    bids, asks = json.loads(stored["bids"]), json.loads(stored["asks"])
    assert len(bids) == len(asks) == 20
    assert bids[0] == ["100.00", "1.5"] and asks[19] == ["120.00", "21.25"]
    assert 55 <= raw.ttl("book:BTCUSDT") <= 60


def test_an_older_or_equal_update_id_does_not_rewrite(put: Put, raw: redis.Redis) -> None:
    write(put, view(100))
    older, same = write(put, view(99))[0], write(put, view(100))[0]
    assert older.status is WriteStatus.OLDER and older.stored_update_id == 100
    assert same.status is WriteStatus.DUPLICATE
    assert raw.hget(book_key("BTCUSDT"), "last_update_id") == "100"
    assert write(put, view(101))[0].status is WriteStatus.STORED


def test_ids_beyond_double_precision_compare_exactly(put: Put, raw: redis.Redis) -> None:
    big = 2**62 + 1  # not representable as a double: Lua numbers would call these equal
    write(put, view(big))
    assert write(put, view(big - 1))[0].status is WriteStatus.OLDER
    assert write(put, view(big + 1))[0].status is WriteStatus.STORED
    assert raw.hget(book_key("BTCUSDT"), "last_update_id") == str(big + 1)
    assert write(put, view(999))[0].status is WriteStatus.OLDER  # shorter text, smaller


def test_in_sync_transitions_are_written_whatever_the_id(put: Put, raw: redis.Redis) -> None:
    write(put, view(500))
    [out] = write(put, view(500, in_sync=False, reason="gap"))
    assert out.status is WriteStatus.STORED
    assert raw.hget(book_key("BTCUSDT"), "in_sync") == "false"
    assert raw.hget(book_key("BTCUSDT"), "reason") == "gap"
    # The resynced book starts from a snapshot whose id may be below the last one stored.
    [back] = write(put, view(450))
    assert back.status is WriteStatus.STORED
    stored = raw.hgetall(book_key("BTCUSDT"))
    assert (stored["in_sync"], stored["reason"], stored["last_update_id"]) == ("true", "", "450")


def test_a_forced_write_replaces_a_newer_id(put: Put, raw: redis.Redis) -> None:
    write(put, view(900))
    assert write(put, view(10), force=True)[0].status is WriteStatus.STORED
    assert raw.hget(book_key("BTCUSDT"), "last_update_id") == "10"


def test_foreign_fields_go_and_a_shallow_book_stores_what_it_has(
    put: Put, raw: redis.Redis
) -> None:
    raw.hset(book_key("ETHUSDT"), mapping={"legacy": "x"})
    write(put, view(1, symbol="ETHUSDT", levels=3))
    stored = raw.hgetall(book_key("ETHUSDT"))
    assert "legacy" not in stored and len(json.loads(stored["bids"])) == 3


def test_every_stored_write_and_only_those_is_appended_to_the_stream(
    put: Put, raw: redis.Redis
) -> None:
    [first] = write(put, view(1))
    write(put, view(1), view(0))  # duplicate, older
    [second] = write(put, view(7, symbol="ETHUSDT"))
    entries: list[Any] = raw.xrange(UPDATES_KEY)  # type: ignore[assignment]
    assert [e[0] for e in entries] == [first.update_id, second.update_id]
    fields = entries[0][1]
    assert fields["symbol"] == "BTCUSDT" and fields["last_update_id"] == "1"
    assert fields["bids"] == raw.hget(book_key("BTCUSDT"), "bids")


def test_script_reloaded_after_flush(put: Put, raw: redis.Redis) -> None:
    write(put, view(1))
    raw.script_flush()
    results = write(put, view(2), view(3, symbol="ETHUSDT"))
    assert [r.status for r in results] == [WriteStatus.STORED, WriteStatus.STORED]


def test_a_wrong_type_key_is_refused_per_command(put: Put, raw: redis.Redis) -> None:
    raw.set(book_key("BTCUSDT"), "not a hash")
    results = write(put, view(1), view(1, symbol="ETHUSDT"))
    assert results[0].status is None and results[0].error and "WRONGTYPE" in results[0].error
    assert results[1].status is WriteStatus.STORED


def test_reads_snapshot_and_changes_since(store: BookStore, put: Put) -> None:
    [a] = write(put, view(1))
    btc, missing = store.read(["BTCUSDT", "ETHUSDT"])
    assert btc["last_update_id"] == "1" and missing == {}
    snap = store.snapshot(["BTCUSDT"])
    assert snap.last_id == a.update_id == store.last_update_id()
    write(put, view(5, symbol="ETHUSDT"))
    write(put, view(2))
    [last] = write(put, view(3))
    assert a.update_id is not None
    changes = store.changes_since(a.update_id, None, page=2)
    assert changes.known and changes.last_id == last.update_id
    assert [(u.symbol, u.fields["last_update_id"]) for u in changes.latest] == [
        ("ETHUSDT", "5"),
        ("BTCUSDT", "3"),
    ]
    assert not store.changes_since("1-0", None).known
    assert [u.id for u in store.wait_updates(a.update_id, 10)][-1] == last.update_id


def test_a_down_redis_is_store_unavailable(redis_server: RedisProcess) -> None:
    store = BookStore(redis_server.url, timeout_s=0.5)
    try:
        store.ping()
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            write(store.write, view(1))
        with pytest.raises(StoreUnavailable):
            store.read(["BTCUSDT"])
        with pytest.raises(StoreUnavailable):
            store.snapshot(["BTCUSDT"])
    finally:
        store.close()


def test_a_same_id_write_renews_the_ttl_an_older_one_does_not(put: Put, raw: redis.Redis) -> None:
    write(put, view(8))
    raw.expire(book_key("BTCUSDT"), 10)
    assert write(put, view(7))[0].status is WriteStatus.OLDER
    assert raw.ttl(book_key("BTCUSDT")) <= 10
    assert write(put, view(8))[0].status is WriteStatus.DUPLICATE
    assert raw.ttl(book_key("BTCUSDT")) > 50


@pytest.mark.parametrize("in_sync", [True, False])
def test_the_native_encoding_is_the_generic_encoding_of_the_same_arguments(
    in_sync: bool,
) -> None:
    v = view(2**63 - 1, in_sync=in_sync, reason=None if in_sync else "gap", levels=25)
    writes = [BookWrite(v, force=True), BookWrite(view(3, symbol="ETHUSDT", levels=2))]
    generic = b"".join(
        command(
            "EVALSHA",
            CONDITIONAL_WRITE_SHA,
            2,
            book_key(w.view.symbol),
            UPDATES_KEY,
            w.view.last_update_id,
            ("true|" if w.view.in_sync else f"false|{w.view.reason}"),
            "1" if w.force else "0",
            60,
            UPDATES_MAXLEN,
            w.view.symbol,
            *hash_fields(w.view, 1_700_000_000_123, 20),
        )
        for w in writes
    )
    assert evalsha_commands(writes, 1_700_000_000_123, 60, 20) == generic


async def test_native_writes_reload_the_script_and_reconnect_after_a_restart(
    redis_server: RedisProcess, raw: redis.Redis
) -> None:
    address = BookStore(redis_server.url, timeout_s=1.0).tcp_address()
    assert address is not None
    client = NativeBookWrites(address)
    try:
        with trio.fail_after(20):
            [first] = await client.write([BookWrite(view(1))], now_ms(), 60, 20)
            assert first.status is WriteStatus.STORED
            raw.script_flush()  # same connection: NOSCRIPT, loaded again, redone once
            results = await client.write(
                [BookWrite(view(2)), BookWrite(view(2, symbol="ETHUSDT"))], now_ms(), 60, 20
            )
            assert [r.status for r in results] == [WriteStatus.STORED, WriteStatus.STORED]
            redis_server.stop()
            with pytest.raises(StoreUnavailable):
                await client.write([BookWrite(view(3))], now_ms(), 60, 20)
            with pytest.raises(StoreUnavailable):
                await client.ping()
            redis_server.start()  # empty, no script cache: loaded on the fresh connection
            await client.ping()
            [again] = await client.write([BookWrite(view(3))], now_ms(), 60, 20)
            assert again.status is WriteStatus.STORED and again.update_id is not None
            fresh = redis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                assert fresh.hget(book_key("BTCUSDT"), "last_update_id") == "3"
            finally:
                fresh.close()
    finally:
        await client.close()
