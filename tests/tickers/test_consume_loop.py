"""The consume loop's bookkeeping with stand-in parts (no Kafka, no Redis), on virtual time."""

from __future__ import annotations

from typing import Any

from marketd.tickers.consume import TickerConsumer
from marketd.tickers.state import running_state
from tests.tickers.records import runtime


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
