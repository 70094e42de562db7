"""Binance's connection limits as shared token buckets on the trio clock (docs/binance.md §2).

One `TokenBucket` for connection attempts per IP (300 per 5 minutes; we allow 250) is shared by
every connection of the process, so a reconnect storm across shards cannot get the IP banned; one
per connection paces our own control messages and pings (5 per second; we allow 4).
"""

from __future__ import annotations

import trio


class TokenBucket:
    """`capacity` tokens refilled continuously over `period_s`; `take()` waits for a token."""

    def __init__(self, capacity: float, period_s: float) -> None:
        self.capacity = capacity
        self.rate_per_s = capacity / period_s
        self._tokens = capacity
        self._updated = trio.current_time()
        self._lock = trio.Lock()  # FIFO: waiters are served in order

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    async def take(self, tokens: float = 1.0) -> None:
        async with self._lock:
            self._refill()
            if self._tokens < tokens:
                await trio.sleep((tokens - self._tokens) / self.rate_per_s)
                self._refill()
            self._tokens -= tokens

    @property
    def available(self) -> float:
        self._refill()
        return self._tokens
