"""Capped exponential backoff with full jitter (pure; the caller sleeps).

`delay()` returns a uniform random wait in [0, min(cap, initial * 2**attempt)] ("full jitter":
reconnect storms across shards and instances spread out instead of synchronising). `reset()`
after a healthy period starts again from `initial`.
"""

from __future__ import annotations

import random

import attrs


@attrs.define
class Backoff:
    initial_s: float
    cap_s: float
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        # Bounded exponent: 2**attempt never overflows however long an outage lasts.
        growth: float = 2.0 ** min(self.attempt, 62)
        return min(self.cap_s, self.initial_s * growth)

    def delay(self) -> float:
        ceiling = self.ceiling()
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
