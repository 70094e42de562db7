"""The ticker consumer against the Kafka mock cluster (or MARKETD_TEST_KAFKA) and a real Redis.

Each test has its own topics and consumer group; the consumer runs in-process (run_tickers, the
daemon's entry point) with the real clock and `fail_after` guards.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import confluent_kafka
import pytest
import redis
import trio

from marketd.runtime import Runtime
from marketd.tickers.consume import run_tickers
from marketd.tickers.redis_server import RedisProcess
from marketd.tickers.rules import HASH_FIELDS
from marketd.tickers.state import running_state
from tests.support.kafka import TestKafka, unique_topic
from tests.tickers.records import as_dict, encode, now_ms, runtime, ticker

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def make_rt(
    kafka: TestKafka,
    server: RedisProcess,
    names: dict[str, str],
    consumer: dict[str, str] | None = None,
    **env: str,
) -> Runtime:
    return runtime(
        kafka=kafka.bootstrap_servers,
        redis_url=server.url,
        env={**names, **env},
        consumer=consumer,
    )


# librdkafka's mock cluster keeps a member that left until its session times out (a real broker
# handles LeaveGroup at once): a short session lets the restarted consumer join in seconds.
SHORT_SESSION = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def names() -> dict[str, str]:
    return {
        "KAFKA_TICKER_TOPIC": unique_topic("tickers"),
        "TOPIC_DLQ": unique_topic("dlq"),
        "TICKER_CONSUMER_GROUP": f"group-{uuid.uuid4().hex[:8]}",
        "TICKER_SYMBOLS": "btcusdt,ETHUSDT,bnbUSDT",
    }


@asynccontextmanager
async def running(rt: Runtime, *, wait_healthy: bool = True) -> AsyncIterator[None]:
    """run_tickers in a nursery (healthy: Redis answered, subscribed); drained (and awaited)
    when the block ends."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(run_tickers, rt)
        if wait_healthy:
            await eventually(lambda: rt.health.components["tickers"].healthy, what="healthy")
        try:
            yield
        finally:
            rt.draining.set()


async def produce(
    kafka: TestKafka, topic: str, values: list[tuple[bytes | None, bytes]], **where: int
) -> None:
    producer = kafka.producer()
    for key, value in values:
        producer.produce(topic, value, key, **where)
    remaining = await trio.to_thread.run_sync(producer.flush, 10)
    assert remaining == 0


def records(*tickers: Any) -> list[tuple[bytes | None, bytes]]:
    return [(t.symbol.encode(), encode(t)) for t in tickers]


async def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    try:
        with trio.fail_after(timeout):
            while not check():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"not true after {timeout}s: {what or check}") from None


def redis_client(server: RedisProcess) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=1)


def event_time(client: redis.Redis, symbol: str) -> int | None:
    try:
        value = client.hget(f"ticker:{symbol}", "event_time")
    except redis.ConnectionError:
        return None
    return int(value) if value is not None else None


def committed(kafka: TestKafka, group: str, topic: str) -> int:
    """Sum of the group's committed offsets over the topic's partitions."""
    consumer = kafka.consumer(group)
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [confluent_kafka.TopicPartition(topic, p) for p in md.partitions]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


async def test_tickers_land_in_redis_with_spec_fields_and_ttl(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    n = names()
    rt = make_rt(kafka, redis_server, n, TICKER_TTL_SECONDS="45")
    client = redis_client(redis_server)
    t = now_ms()
    async with running(rt):
        assert rt.health.components["tickers"].healthy
        await produce(
            kafka,
            n["KAFKA_TICKER_TOPIC"],
            records(
                ticker("BTCUSDT", t - 3, last_price="100.5"),
                ticker("BTCUSDT", t - 2, last_price="100.7"),
                ticker("ETHUSDT", t - 1),
                ticker("SOLUSDT", t),  # not tracked here
                ticker("bnbusdt", t - 5),  # symbols are case-insensitive
            ),
        )
        await eventually(lambda: event_time(client, "BNBUSDT") == t - 5)
        await eventually(lambda: event_time(client, "BTCUSDT") == t - 2)
        await eventually(lambda: event_time(client, "ETHUSDT") == t - 1)
        state = running_state(rt)
        assert state is not None and state.last_message_ms is not None
    btc = client.hgetall("ticker:BTCUSDT")
    assert set(btc) == set(HASH_FIELDS)
    assert btc["last_price"] == "100.7" and btc["trades_count"] == "101"
    assert int(btc["updated_at"]) >= t - 2
    assert 40 <= client.ttl("ticker:BTCUSDT") <= 45
    assert not client.exists("ticker:SOLUSDT")
    m = rt.metrics.exposition().decode()
    assert 'marketd_tickers_skipped_total{reason="untracked"} 1.0' in m
    assert 'marketd_tickers_consumed_total{topic="' in m
    assert running_state(rt) is None  # stopped: the API reports null lag
    assert not rt.health.components["tickers"].healthy
    client.close()


async def test_late_future_duplicate_and_malformed_records(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    n = names()
    rt = make_rt(kafka, redis_server, n)
    client = redis_client(redis_server)
    t = now_ms()
    bad_price = as_dict(ticker("ETHUSDT", t))
    bad_price["last_price"] = "NaN"
    async with running(rt):
        topic = n["KAFKA_TICKER_TOPIC"]
        await produce(kafka, topic, records(ticker("BTCUSDT", t, last_price="2")))
        await eventually(lambda: event_time(client, "BTCUSDT") == t)
        await produce(
            kafka,
            topic,
            [
                *records(
                    ticker("BTCUSDT", t - 100, last_price="1"),  # older than stored
                    ticker("BTCUSDT", t, last_price="3"),  # duplicate: not rewritten
                    ticker("BTCUSDT", t - 60_000),  # behind the watermark
                    ticker("BTCUSDT", t + 60_000),  # too far in the future
                ),
                (b"ETHUSDT", b'{"symbol": "ETHUSDT", '),
                (b"ETHUSDT", json.dumps(bad_price).encode()),
                (None, b""),
            ],
        )
        state = running_state(rt)
        assert state is not None and state.metrics is not None
        metrics = state.metrics
        await eventually(
            lambda: (
                sum(metrics.skipped.values.values()) >= 4
                and sum(metrics.invalid.values.values()) >= 3
            )
        )
        await produce(kafka, topic, records(ticker("BTCUSDT", t + 1, last_price="4")))
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 1)
        assert dict(metrics.skipped.values) == {
            "older_than_stored": 1,
            "duplicate": 1,
            "watermark": 1,
            "future": 1,
        }
        assert dict(metrics.invalid.values) == {
            "bad_json": 1,
            "bad_decimal": 1,
            "empty_value": 1,
        }
    assert client.hget("ticker:BTCUSDT", "last_price") == "4"
    assert not client.exists("ticker:ETHUSDT")
    dlq = kafka.read_all([n["TOPIC_DLQ"]], expect=3)
    letters = [json.loads(m.value()) for m in dlq]
    assert sorted(d["reason"] for d in letters) == ["bad_decimal", "bad_json", "empty_value"]
    assert all(
        d["schema_version"] == 1 and d["detail"].startswith(n["KAFKA_TICKER_TOPIC"])
        for d in letters
    )
    assert {m.key() for m in dlq} == {b"ETHUSDT", None}
    client.close()


async def test_redis_outage_loses_nothing_and_commits_nothing_unstored(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    n = names()
    rt = make_rt(kafka, redis_server, n)
    topic, group = n["KAFKA_TICKER_TOPIC"], n["TICKER_CONSUMER_GROUP"]
    client = redis_client(redis_server)
    t = now_ms()
    async with running(rt):
        await produce(kafka, topic, records(*(ticker("BTCUSDT", t + i) for i in range(5))))
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 4)
        await eventually(lambda: committed(kafka, group, topic) == 5, what="first commit")

        redis_server.stop()
        await produce(
            kafka,
            topic,
            records(
                *(ticker("BTCUSDT", t + 10 + i, last_price=f"{i}.5") for i in range(5)),
                ticker("ETHUSDT", t + 3),
            ),
        )
        await eventually(lambda: not rt.health.components["tickers"].healthy)
        await trio.sleep(1.0)  # the consumer retries meanwhile
        assert committed(kafka, group, topic) == 5  # nothing committed that was not stored

        await trio.to_thread.run_sync(redis_server.start)
        client.close()
        client = redis_client(redis_server)
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 14)
        await eventually(lambda: event_time(client, "ETHUSDT") == t + 3)
        assert client.hget("ticker:BTCUSDT", "last_price") == "4.5"
        await eventually(lambda: rt.health.components["tickers"].healthy)
        await eventually(lambda: committed(kafka, group, topic) == 11)

        # A late straggler after recovery still cannot overwrite the newer value.
        await produce(kafka, topic, records(ticker("BTCUSDT", t + 12, last_price="0")))
        await produce(kafka, topic, records(ticker("BNBUSDT", t + 1)))
        await eventually(lambda: event_time(client, "BNBUSDT") == t + 1)
        assert event_time(client, "BTCUSDT") == t + 14
    client.close()


async def test_redis_down_at_start_is_a_state_not_a_failure(kafka: TestKafka) -> None:
    """Started at once; unhealthy with the reason for as long as Redis is away (no give-up);
    consumes once redis-server appears on that port."""
    n = names()
    server = RedisProcess()  # the port is chosen, nothing listens yet
    rt = make_rt(kafka, server, n)
    t = now_ms()
    try:
        async with running(rt, wait_healthy=False):
            health = rt.health.components["tickers"]
            assert health.started and not health.healthy
            await eventually(lambda: "unreachable" in health.reason, what="redis reason")
            assert health.reason.startswith(f"redis unreachable at 127.0.0.1:{server.port}: ")
            assert "Connection refused" in health.reason
            assert health.view()["reason"].endswith("Z")  # "..., since 12:48:06Z"
            assert not rt.health.dependencies["redis"].up
            await produce(kafka, n["KAFKA_TICKER_TOPIC"], records(ticker("BTCUSDT", t)))
            await trio.to_thread.run_sync(server.start)
            client = redis_client(server)
            await eventually(lambda: event_time(client, "BTCUSDT") == t, what="stored")
            await eventually(lambda: health.healthy, what="healthy again")
            assert rt.health.dependencies["redis"].up
            client.close()
    finally:
        server.close()


async def test_restarted_consumer_resumes_from_committed_offsets(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    n = names()
    topic, group = n["KAFKA_TICKER_TOPIC"], n["TICKER_CONSUMER_GROUP"]
    client = redis_client(redis_server)
    t = now_ms()
    first = make_rt(kafka, redis_server, n, SHORT_SESSION)
    async with running(first):
        await produce(kafka, topic, records(*(ticker("BTCUSDT", t + i) for i in range(4))))
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 3)
    # Drained: the final commit covers everything stored.
    assert committed(kafka, group, topic) == 4

    # Messages produced while no consumer runs are picked up; old ones are not re-read.
    await produce(kafka, topic, records(ticker("ETHUSDT", t), ticker("BTCUSDT", t + 5)))
    second = make_rt(kafka, redis_server, n, SHORT_SESSION)
    async with running(second):
        # Joining the group waits for the mock broker's rebalance after the first consumer
        # left: seconds when idle, longer on a loaded machine (a CI run next to benchmarks
        # once took more than 30 s).
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 5, timeout=90.0)
        await eventually(lambda: event_time(client, "ETHUSDT") == t)
        state = running_state(second)
        assert state is not None and state.metrics is not None
        assert sum(state.metrics.consumed.values.values()) == 2
    assert committed(kafka, group, topic) == 6
    client.close()


async def test_instance_without_history_cannot_overwrite_newer_value(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    """Rule 2 across instances: only the Redis-side compare knows what another instance wrote."""
    n = names()
    other = {**n, "KAFKA_TICKER_TOPIC": unique_topic("tickers-b"), "TICKER_CONSUMER_GROUP": "b"}
    client = redis_client(redis_server)
    t = now_ms()
    a, b = make_rt(kafka, redis_server, n), make_rt(kafka, redis_server, other)
    async with running(a), running(b):
        await produce(kafka, n["KAFKA_TICKER_TOPIC"], records(ticker("BTCUSDT", t, last_price="2")))
        await eventually(lambda: event_time(client, "BTCUSDT") == t)
        # b has never seen BTCUSDT: its in-process view cannot reject this older record.
        await produce(
            kafka, other["KAFKA_TICKER_TOPIC"], records(ticker("BTCUSDT", t - 5, last_price="1"))
        )
        state = running_state(b)
        assert state is not None and state.metrics is not None
        skipped = state.metrics.skipped
        await eventually(lambda: skipped.get("older_than_stored") == 1)
        assert client.hget("ticker:BTCUSDT", "last_price") == "2"
        assert state.stored["BTCUSDT"] == t  # it learnt the newer value from Redis
    client.close()


async def test_two_instances_racing_never_move_a_ticker_back(
    kafka: TestKafka, redis_server: RedisProcess
) -> None:
    """Stress: shuffled event times, two instances; a reader never sees the value go back."""
    n = names()
    topic = n["KAFKA_TICKER_TOPIC"]
    client = redis_client(redis_server)
    # Two groups: both instances read every record and race on the same key.
    a = make_rt(kafka, redis_server, n)
    b = make_rt(
        kafka, redis_server, {**n, "TICKER_CONSUMER_GROUP": n["TICKER_CONSUMER_GROUP"] + "b"}
    )
    t = now_ms()
    seen: list[int] = []
    shuffled = list(range(600))
    random.Random(7).shuffle(shuffled)
    async with running(a), running(b), trio.open_nursery() as watch:

        async def sample() -> None:
            reader = redis_client(redis_server)
            try:
                while True:
                    value = event_time(reader, "BTCUSDT")
                    if value is not None:
                        seen.append(value)
                    await trio.sleep(0.0005)
            finally:
                reader.close()

        watch.start_soon(sample)
        producer = kafka.producer()
        for i, offset in enumerate(shuffled):
            producer.produce(topic, encode(ticker("BTCUSDT", t + offset)), partition=i % 4)
            if i % 50 == 49:
                producer.poll(0)
                await trio.sleep(0.002)  # spread over several fetches of both instances
        assert await trio.to_thread.run_sync(producer.flush, 10) == 0
        await eventually(lambda: event_time(client, "BTCUSDT") == t + 599)
        await trio.sleep(0.3)
        watch.cancel_scope.cancel()
    assert seen and seen == sorted(seen)
    assert event_time(client, "BTCUSDT") == t + 599
    client.close()
