from __future__ import annotations

import itertools
import random

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from marketd.backoff import Backoff
from marketd.ingest.limits import TokenBucket


@given(st.floats(0.01, 5), st.floats(5, 120), st.integers(0, 200))
def test_backoff_is_capped_full_jitter(initial: float, cap: float, attempts: int) -> None:
    b = Backoff(initial, cap, random.Random(1))
    for _ in range(attempts):
        d = b.delay()
        assert 0 <= d <= cap
    assert b.ceiling() <= cap


def test_backoff_grows_then_resets() -> None:
    b = Backoff(0.5, 60, random.Random(2))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.delay()
    assert ceilings[:4] == [0.5, 1.0, 2.0, 4.0] and ceilings[-1] == 60
    b.reset()
    assert b.ceiling() == 0.5


async def test_connection_attempts_respect_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(300, 300.0)  # Binance: 300 attempts per 5 minutes
    t0 = trio.current_time()
    for _ in range(600):
        await bucket.take()
    elapsed = trio.current_time() - t0
    # The first 300 are free, the next 300 are paced at one per second.
    assert 299 <= elapsed <= 301


async def test_message_rate_five_per_second(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(4, 1.0)
    times = []
    for _ in range(20):
        await bucket.take()
        times.append(trio.current_time())
    # In any 1-second window at most 4 + 4 (burst + refill) messages; steady state 4/s.
    steady = times[8:]
    assert all(b - a >= 0.249 for a, b in itertools.pairwise(steady))
