"""One REQUEST_WEIGHT budget shared by every REST call of the process (trio clock).

`acquire(weight)` waits (FIFO) until the request fits in `limit_per_min` over the last 60 s and
until any 429/418 block has passed; `observe(...)` feeds back each response: the server's
`X-MBX-USED-WEIGHT-1M` (weight used by this IP, other processes included) raises our estimate,
and 429/418 block all requests for Retry-After. Nothing is sent while blocked, so the 429 -> 418
escalation (docs/binance.md §5) cannot happen through us.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

from marketd.logs import get_logger
from marketd.metrics import MetricsFactory

log = get_logger(__name__)

WINDOW_S: Final = 60.0
DEFAULT_LIMIT: Final = 4800  # of Binance's 6000/min: headroom for what we cannot see coming
DEFAULT_RETRY_AFTER_S: Final = 60.0  # when a 429/418 comes without a usable Retry-After


class WeightBudget:
    def __init__(
        self,
        limit_per_min: int = DEFAULT_LIMIT,
        *,
        metrics: MetricsFactory | None = None,
    ) -> None:
        if limit_per_min < 1:
            raise ValueError("limit_per_min must be >= 1")
        self.limit = limit_per_min
        self._spent: deque[tuple[float, int]] = deque()  # (reserved at, weight), oldest first
        self._used = 0
        self._blocked_until = float("-inf")
        self._lock = trio.Lock()  # FIFO: a big request is not starved by small ones
        m = metrics or MetricsFactory()
        self._m_used = m.gauge("rest_weight_used", "REST weight reserved in the last minute")
        self._m_server = m.gauge(
            "rest_weight_server_used", "X-MBX-USED-WEIGHT-1M of the last response"
        )
        self._m_blocked = m.counter(
            "rest_blocked", "REST blocks ordered by Binance, by status", ["status"]
        )

    # -- state ----------------------------------------------------------------------------------

    def used(self) -> int:
        """Weight counted against the budget now (ours and what the server reported beyond it)."""
        self._expire(trio.current_time())
        return self._used

    @property
    def blocked_until(self) -> float:
        return self._blocked_until

    # -- use ------------------------------------------------------------------------------------

    async def acquire(self, weight: int) -> None:
        """Reserve `weight`; returns once it fits. Send the request right after, without awaiting
        anything else, so a 429 observed meanwhile cannot be ignored."""
        if not 0 < weight <= self.limit:
            raise ValueError(f"weight {weight} outside 1..{self.limit}")
        async with self._lock:
            while True:
                now = trio.current_time()
                if now < self._blocked_until:
                    await trio.sleep_until(self._blocked_until)
                    continue
                self._expire(now)
                if self._used + weight <= self.limit:
                    self._add(now, weight)
                    return
                await trio.sleep_until(self._fits_at(weight))

    def observe(self, status: int, used_weight: int | None, retry_after_s: float | None) -> None:
        """Feed back one response: its status, X-MBX-USED-WEIGHT-1M and Retry-After."""
        now = trio.current_time()
        if used_weight is not None:
            self._m_server.set(used_weight)
            self._expire(now)
            if used_weight > self._used:
                # Someone else on this IP (another shard, a script) spends weight too.
                self._add(now, used_weight - self._used)
        if status in (429, 418):
            wait = retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S
            self._blocked_until = max(self._blocked_until, now + wait)
            self._m_blocked.labels(str(status)).inc()
            if status == 418:
                log.error("rest.banned", retry_after_s=wait, used_weight=used_weight)
            else:
                log.warning("rest.rate_limited", retry_after_s=wait, used_weight=used_weight)

    # -- internals ------------------------------------------------------------------------------

    def _add(self, now: float, weight: int) -> None:
        self._spent.append((now, weight))
        self._used += weight
        self._m_used.set(self._used)

    def _expire(self, now: float) -> None:
        spent = self._spent
        while spent and spent[0][0] + WINDOW_S <= now:
            self._used -= spent.popleft()[1]
        self._m_used.set(self._used)

    def _fits_at(self, weight: int) -> float:
        """When enough old reservations expire for `weight` to fit."""
        excess = self._used + weight - self.limit
        for at, w in self._spent:
            excess -= w
            if excess <= 0:
                return at + WINDOW_S
        raise AssertionError("weight <= limit always fits once everything expired")
