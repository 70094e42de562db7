"""Simulated exchange clock: epoch microseconds that follow the wall clock, faster or jumped.

Receives a speed factor and test jumps (`advance`); emits monotonic epoch-µs readings and wakes
sleepers when time jumps, so kline boundaries and the 24 h connection mark can be reached in tests
without waiting. At speed 1 with no jumps the reading is the wall clock (frames' E = send time).
"""

from __future__ import annotations

import math
import time

import trio


class SimClock:
    """Epoch-µs clock: `wall + offset + (speed - 1) * elapsed`, never going backwards."""

    def __init__(self, *, speed: float = 1.0, start_ms: int | None = None) -> None:
        if not speed > 0 or math.isinf(speed):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        self.speed = speed
        self._mono0 = time.monotonic()
        wall_us = time.time_ns() // 1000
        self._offset_us = 0 if start_ms is None else start_ms * 1000 - wall_us
        self._last_us = 0
        self._jumped = trio.Event()

    def now_us(self) -> int:
        now = time.time_ns() // 1000 + self._offset_us
        if self.speed != 1.0:
            now += int((self.speed - 1.0) * (time.monotonic() - self._mono0) * 1e6)
        # The wall clock may step back (NTP); the exchange's clock must not.
        if now < self._last_us:
            return self._last_us
        self._last_us = now
        return now

    def now_ms(self) -> int:
        return self.now_us() // 1000

    def advance(self, seconds: float) -> None:
        """Jump forward: nothing happens in the skipped time (no trades), then time goes on."""
        if seconds < 0:
            raise ValueError("the exchange clock only moves forward")
        self._offset_us += int(seconds * 1e6)
        self._jumped.set()
        self._jumped = trio.Event()

    async def sleep_until_us(self, target_us: int) -> None:
        """Sleep until the simulated clock reads `target_us` (woken early by jumps)."""
        while True:
            remaining_us = target_us - self.now_us()
            if remaining_us <= 0:
                return
            jumped = self._jumped
            with trio.move_on_after(remaining_us / 1e6 / self.speed):
                await jumped.wait()
