"""The Redis adapter against a real redis-server: conditional writes, TTL, exact fields, reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from marketd.errors import StoreUnavailable
from marketd.tickers.redis_server import RedisProcess
from marketd.tickers.rules import HASH_FIELDS
from marketd.tickers.store import UPDATES_KEY, TickerStore, WriteStatus, parse_update_id
from tests.tickers.records import now_ms, ticker

pytestmark = pytest.mark.redis


@pytest.fixture
def store(redis_server: RedisProcess) -> Iterator[TickerStore]:
    s = TickerStore(redis_server.url, timeout_s=1.0)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def raw(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def test_write_creates_spec_hash_with_ttl(store: TickerStore, raw: redis.Redis) -> None:
    t = now_ms()
    [result] = store.write([ticker("BTCUSDT", t)], t + 2, 60)
    assert result.status is WriteStatus.STORED and result.stored_event_time == t
    stored = raw.hgetall("ticker:BTCUSDT")
    assert tuple(sorted(stored)) == tuple(sorted(HASH_FIELDS))
    assert stored["last_price"] == "118234.56000000"
    assert stored["price_change"] == "-12.50000000"
    assert stored["trades_count"] == "101"
    assert stored["event_time"] == str(t) and stored["updated_at"] == str(t + 2)
    assert 55 <= raw.ttl("ticker:BTCUSDT") <= 60


def test_older_and_equal_event_times_do_not_rewrite(store: TickerStore, raw: redis.Redis) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t, last_price="2.0")], t, 60)
    raw.expire("ticker:BTCUSDT", 30)
    older, same = (
        store.write([ticker("BTCUSDT", t - 1, last_price="1.0")], t + 5, 60)[0],
        store.write([ticker("BTCUSDT", t, last_price="3.0")], t + 6, 60)[0],
    )
    assert older.status is WriteStatus.OLDER and older.stored_event_time == t
    assert same.status is WriteStatus.DUPLICATE
    assert raw.hget("ticker:BTCUSDT", "last_price") == "2.0"
    assert raw.hget("ticker:BTCUSDT", "updated_at") == str(t)
    assert raw.ttl("ticker:BTCUSDT") <= 30  # a skipped write does not refresh the TTL
    newer = store.write([ticker("BTCUSDT", t + 1, last_price="4.0")], t + 7, 60)[0]
    assert newer.status is WriteStatus.STORED
    assert raw.hget("ticker:BTCUSDT", "last_price") == "4.0"


def test_foreign_fields_are_removed_on_write(store: TickerStore, raw: redis.Redis) -> None:
    raw.hset("ticker:ETHUSDT", mapping={"event_time": "1", "legacy": "x"})
    store.write([ticker("ETHUSDT")], now_ms(), 60)
    assert "legacy" not in raw.hgetall("ticker:ETHUSDT")


def test_script_reloaded_after_flush(store: TickerStore, raw: redis.Redis) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t)], t, 60)
    raw.script_flush()
    results = store.write([ticker("BTCUSDT", t + 1), ticker("ETHUSDT", t)], t, 60)
    assert [r.status for r in results] == [WriteStatus.STORED, WriteStatus.STORED]


def test_wrong_type_key_is_refused_per_command(store: TickerStore, raw: redis.Redis) -> None:
    raw.set("ticker:BTCUSDT", "not a hash")
    results = store.write([ticker("BTCUSDT"), ticker("ETHUSDT")], now_ms(), 60)
    assert results[0].status is None and results[0].error and "WRONGTYPE" in results[0].error
    assert results[1].status is WriteStatus.STORED


def test_read_returns_hashes_in_order_and_empty_for_absent(store: TickerStore) -> None:
    t = now_ms()
    store.write([ticker("BTCUSDT", t)], t, 60)
    btc, missing = store.read(["BTCUSDT", "MATICUSDT"])
    assert btc["event_time"] == str(t) and missing == {}


def test_down_redis_is_store_unavailable(redis_server: RedisProcess) -> None:
    store = TickerStore(redis_server.url, timeout_s=0.5)
    try:
        store.ping()
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            store.write([ticker()], now_ms(), 60)
        with pytest.raises(StoreUnavailable):
            store.read(["BTCUSDT"])
        with pytest.raises(StoreUnavailable):
            store.ping()
    finally:
        store.close()


def test_each_stored_write_and_only_those_is_appended_to_the_update_stream(
    store: TickerStore, raw: redis.Redis
) -> None:
    t = now_ms()
    [first] = store.write([ticker("BTCUSDT", t, last_price="1.0")], t, 60)
    store.write([ticker("BTCUSDT", t - 1), ticker("BTCUSDT", t)], t, 60)  # older, duplicate
    [second] = store.write([ticker("ETHUSDT", t, last_price="2.0")], t, 60)
    entries: list[Any] = raw.xrange(UPDATES_KEY)  # type: ignore[assignment]
    assert [e[0] for e in entries] == [first.update_id, second.update_id]
    assert entries[0][1]["symbol"] == "BTCUSDT" and entries[0][1]["last_price"] == "1.0"
    assert entries[0][1]["event_time"] == str(t)


def test_snapshot_and_changes_since(store: TickerStore) -> None:
    t = now_ms()
    [a] = store.write([ticker("BTCUSDT", t)], t, 60)
    snap = store.snapshot(["BTCUSDT", "ETHUSDT"])
    assert snap.last_id == a.update_id and snap.rows[0]["event_time"] == str(t)
    assert snap.rows[1] == {}
    store.write([ticker("ETHUSDT", t, last_price="5.0")], t, 60)
    store.write([ticker("BTCUSDT", t + 1, last_price="6.0")], t, 60)
    [last] = store.write([ticker("BTCUSDT", t + 2, last_price="7.0")], t, 60)
    assert a.update_id is not None
    changes = store.changes_since(a.update_id, None, page=2)  # several pages
    assert changes.known and changes.last_id == last.update_id
    assert [(u.symbol, u.fields["last_price"]) for u in changes.latest] == [
        ("ETHUSDT", "5.0"),
        ("BTCUSDT", "7.0"),
    ]
    only_eth = store.changes_since(a.update_id, frozenset({"ETHUSDT"}))
    assert [u.symbol for u in only_eth.latest] == ["ETHUSDT"]
    assert not store.changes_since("1-0", None).known  # not in the stream: resynchronise
    assert store.wait_updates(last.update_id or "", 10) == []
    assert [u.id for u in store.wait_updates(a.update_id, 10)][-1] == last.update_id
    assert parse_update_id("12-3") == (12, 3) and parse_update_id("12") is None
