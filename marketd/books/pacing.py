"""Pacing REST snapshots of many books against a shared request-weight budget (pure).

`SnapshotPacer` receives snapshot requests (`want`), their outcomes (`finished`) and the clock;
it decides which request goes next and when: resyncs before audits, first come first served,
at most `max_in_flight` at once, never more than `weight_per_min` in any 60 s window, and a
failed request retried after a capped, doubling delay. Up to `burst_weight` (default half the
budget) goes out at once, so the resync of a few books is not held back; beyond it grants are
spread evenly (a restart with hundreds of books paces itself instead of emptying the budget).
`AuditRotation` picks one symbol in turn every `interval_s`. Neither does I/O: the driver sleeps
until `wake_at()`, then takes `next_grant()` and still passes the weight budget
(marketd.rest.budget), which also sees the process's other REST calls.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from marketd.books.sync import RequestSnapshot, SnapshotPurpose

WINDOW_S: Final = 60.0
DEFAULT_RETRY_BASE_S: Final = 1.0
DEFAULT_RETRY_MAX_S: Final = 60.0


@dataclass(slots=True)
class _Entry:
    request: RequestSnapshot
    seq: int
    not_before: float
    failures: int = 0


_Key = tuple[str, SnapshotPurpose]


class SnapshotPacer:
    def __init__(
        self,
        *,
        weight_per_min: int,
        max_in_flight: int = 2,
        burst_weight: int | None = None,
        retry_base_s: float = DEFAULT_RETRY_BASE_S,
        retry_max_s: float = DEFAULT_RETRY_MAX_S,
    ) -> None:
        if weight_per_min < 1 or max_in_flight < 1:
            raise ValueError("weight_per_min and max_in_flight must be >= 1")
        self.weight_per_min = weight_per_min
        self.burst_weight = weight_per_min // 2 if burst_weight is None else burst_weight
        self.max_in_flight = max_in_flight
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._queued: dict[_Key, _Entry] = {}
        self._in_flight: dict[_Key, _Entry] = {}
        self._spent: deque[tuple[float, int]] = deque()  # (granted at, weight), oldest first
        self._used = 0
        self._next_at = float("-inf")  # even spacing: no grant before this
        self._seq = itertools.count()
        self.granted = 0
        self.retries = 0

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def used(self, now: float) -> int:
        """Weight granted in the last 60 s."""
        self._expire(now)
        return self._used

    def want(self, request: RequestSnapshot, now: float) -> None:
        """Queue a request; one per (symbol, purpose): a second is merged into the first."""
        if request.weight > self.weight_per_min:
            raise ValueError(f"a weight of {request.weight} never fits {self.weight_per_min}/min")
        key = (request.symbol, request.purpose)
        if key in self._queued or key in self._in_flight:
            return
        self._queued[key] = _Entry(request, next(self._seq), now)

    def drop(self, symbol: str) -> None:
        """Forget a symbol's queued requests (it is no longer tracked)."""
        for purpose in SnapshotPurpose:
            self._queued.pop((symbol, purpose), None)

    def _candidate(self, now: float | None) -> _Entry | None:
        """The request that goes next: eligible now (or soonest when `now` is None), resyncs
        first, then in order of arrival."""
        best: _Entry | None = None
        best_key: tuple[float, int, int] | None = None
        for entry in self._queued.values():
            if now is not None and entry.not_before > now:
                continue
            rank = 0 if entry.request.purpose is SnapshotPurpose.SYNC else 1
            key = (entry.not_before if now is None else 0.0, rank, entry.seq)
            if best_key is None or key < best_key:
                best, best_key = entry, key
        return best

    def next_grant(self, now: float) -> RequestSnapshot | None:
        """The request to send now, if any (it counts as in flight until `finished`)."""
        if len(self._in_flight) >= self.max_in_flight:
            return None
        entry = self._candidate(now)
        if entry is None:
            return None
        self._expire(now)
        weight = entry.request.weight
        if self._used + weight > self.weight_per_min:
            return None
        if now < self._next_at and self._used + weight > self.burst_weight:
            return None  # beyond the burst: evenly spaced
        key = (entry.request.symbol, entry.request.purpose)
        del self._queued[key]
        self._in_flight[key] = entry
        self._spent.append((now, weight))
        self._used += weight
        self._next_at = now + WINDOW_S * weight / self.weight_per_min
        self.granted += 1
        return entry.request

    def wake_at(self, now: float) -> float | None:
        """When `next_grant` may return something (None: only `want`/`finished` can change it)."""
        if len(self._in_flight) >= self.max_in_flight:
            return None
        entry = self._candidate(None)
        if entry is None:
            return None
        self._expire(now)
        spaced = self._used + entry.request.weight > self.burst_weight
        at = max(now, entry.not_before, self._next_at if spaced else now)
        excess = self._used + entry.request.weight - self.weight_per_min
        if excess > 0:
            for granted_at, weight in self._spent:
                excess -= weight
                if excess <= 0:
                    at = max(at, granted_at + WINDOW_S)
                    break
        return at

    def finished(self, symbol: str, purpose: SnapshotPurpose, *, ok: bool, now: float) -> None:
        """A granted request is done. Failed: it is queued again after a backoff."""
        entry = self._in_flight.pop((symbol, purpose), None)
        if entry is None or ok:
            return
        entry.failures += 1
        self.retries += 1
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** (entry.failures - 1))
        entry.not_before = now + delay
        self._queued.setdefault((symbol, purpose), entry)

    def _expire(self, now: float) -> None:
        spent = self._spent
        while spent and spent[0][0] + WINDOW_S <= now:
            self._used -= spent.popleft()[1]


class AuditRotation:
    """Every `interval_s`, the next symbol in turn (sorted by name, wrapping around)."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._next_at: float | None = None
        self._last: str | None = None

    def due(self, now: float, symbols: Sequence[str]) -> str | None:
        """The symbol to audit now, or None (not due yet, or no symbol)."""
        if self._next_at is None:
            self._next_at = now + self.interval_s
            return None
        if now < self._next_at or not symbols:
            return None
        nxt = self._next_at + self.interval_s
        self._next_at = nxt if nxt > now else now + self.interval_s
        ordered = sorted(symbols)
        last = self._last
        pick = next((s for s in ordered if last is None or s > last), ordered[0])
        self._last = pick
        return pick

    def next_at(self) -> float | None:
        return self._next_at
