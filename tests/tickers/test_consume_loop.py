"""The consume loop's bookkeeping with stand-in parts (no Kafka, no Redis), on virtual time."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from marketd.errors import StoreUnavailable
from marketd.tickers.consume import TickerConsumer
from marketd.tickers.state import running_state
from tests.tickers.records import now_ms, runtime, ticker


class _IdleFeed:
    """A feed whose partitions are assigned after the first poll; every poll returns nothing."""

    topic = "raw_tickers"

    def __init__(self, rt: Any, polls: int) -> None:
        self.rt = rt
        self.polls_left = polls
        self.assigned = False

    async def fetch(self) -> list[Any]:
        self.polls_left -= 1
        if self.polls_left <= 0:
            self.rt.draining.set()
        return []

    def lag(self) -> int | None:
        if not self.assigned:
            self.assigned = True  # the rebalance lands during the next poll
            return None
        return 7


async def test_lag_is_reported_as_soon_as_partitions_are_assigned() -> None:
    rt = runtime()
    feed = _IdleFeed(rt, polls=3)
    consumer = TickerConsumer(rt, feed, store=None, dlq=None)  # type: ignore[arg-type]
    consumer.state.running = True
    # Virtual time does not move here (nothing sleeps), so a once-a-second refresh alone would
    # leave the lag unknown for the whole run.
    await consumer.run()
    state = running_state(rt)
    assert state is not None and state.consumer_lag == 7


class _DownStore:
    """Redis that refuses every call."""

    def __init__(self) -> None:
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1
        raise StoreUnavailable("redis unreachable at 127.0.0.1:1: Connection refused")


class _PausedFeed:
    topic = "raw_tickers"

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        raise AssertionError("resumed while Redis is still down")

    async def fetch(self) -> list[Any]:
        await trio.sleep(0.1)
        return []


class _NoDeadLetters:
    unflushed = 0


async def test_an_outage_is_not_over_when_nothing_needed_writing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()
    store = _DownStore()
    consumer = TickerConsumer(rt, _PausedFeed(), store, _NoDeadLetters())  # type: ignore[arg-type]
    assert await consumer._outage(StoreUnavailable("refused"))
    # The only held record is past the watermark: the rules skip it, so nothing is written.
    consumer._pending = [ticker("BTCUSDT", now_ms() - 3_600_000)]
    assert await consumer.store_pending()
    assert store.pings == 1  # Redis was asked instead of being declared back
    assert not rt.health.components["tickers"].healthy
