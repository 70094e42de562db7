"""The push API's bookkeeping, pure: SSE framing, one pending queue per client, update payloads.

No trio, Redis or HTTP here (the driver is marketd/api/stream.py). One `ClientQueue` per
connected client receives every update of the symbols it follows; with conflation on (the
default) it keeps only the newest pending update per symbol, so a client that reads slowly costs
at most one pending update per symbol and skips intermediate prices, never the latest one. A
client behind for longer than its limit (or, without conflation, with too many pending updates)
is told to go: the driver disconnects it and counts it. docs/streaming.md has the contract.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import attrs
import msgspec

from marketd.api.views import ticker_view

_encode = msgspec.json.Encoder().encode

KEEPALIVE: Final = b": keep-alive\n\n"


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event. `data` is one line of JSON (msgspec never emits raw newlines)."""
    head = f"id: {event_id}\nevent: {event}\n" if event_id is not None else f"event: {event}\n"
    return head.encode() + b"data: " + data + b"\n\n"


def id_key(update_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as a comparable pair (ids come from Redis: well-formed)."""
    ms, _, seq = update_id.partition("-")
    return int(ms), int(seq or 0)


@attrs.frozen
class Pushed:
    """One stored ticker update, encoded once for every client that follows its symbol.

    `body` is the JSON object of GET /api/v1/ticker/{symbol} without its closing brace and
    without `age_ms`, which is added at send time (age at the moment the client gets it).
    """

    id: str
    key: tuple[int, int]
    symbol: str
    event_time: int | None
    body: bytes
    # The event up to the age: built once here, not per client (1,000 clients per update).
    _head: bytes = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        head = sse_event("ticker", self.body + b',"age_ms":', self.id)[: -len(b"\n\n")]
        object.__setattr__(self, "_head", head)

    @classmethod
    def from_fields(cls, update_id: str, symbol: str, fields: Mapping[str, str]) -> Pushed:
        view = ticker_view(symbol, fields, 0) or {"symbol": symbol}
        view.pop("age_ms", None)
        event_time = view.get("event_time")
        return cls(
            id=update_id,
            key=id_key(update_id),
            symbol=symbol,
            event_time=event_time if isinstance(event_time, int) else None,
            body=_encode(view)[:-1],
        )

    def event(self, now_ms: int) -> bytes:
        age = b"null" if self.event_time is None else b"%d" % (now_ms - self.event_time)
        return self._head + age + b"}\n\n"


def snapshot_data(views: list[dict[str, Any]], missing: list[str]) -> bytes:
    return _encode({"tickers": views, "missing": missing, "count": len(views)})


class Offer(enum.Enum):
    QUEUED = "queued"
    CONFLATED = "conflated"  # replaced an older pending update of the same symbol
    FILTERED = "filtered"  # not followed, or already covered by what the client was sent
    BEHIND = "behind"  # an update has waited longer than max_behind_s: disconnect
    OVERFLOW = "overflow"  # without conflation, max_pending updates wait: disconnect


@attrs.define
class ClientQueue:
    """Pending updates of one client, and how long it has been behind.

    `after` is the key of the last update the client has (its snapshot or resume point):
    updates at or before it are filtered, so the live tail and the snapshot neither overlap nor
    leave a hole. `behind_since` is when the oldest pending update arrived (None when empty).
    """

    symbols: frozenset[str] | None  # None: every symbol
    conflate: bool = True
    max_pending: int = 10_000  # without conflation
    max_behind_s: float = 10.0
    after: tuple[int, int] = (0, 0)
    behind_since: float | None = None
    resync: bool = False  # the driver must send a fresh snapshot (updates may have been missed)
    _latest: dict[str, Pushed] = attrs.field(factory=dict)
    _queue: deque[Pushed] = attrs.field(factory=deque)

    def offer(self, update: Pushed, now: float) -> Offer:
        if update.key <= self.after or (
            self.symbols is not None and update.symbol not in self.symbols
        ):
            return Offer.FILTERED
        if self.behind_since is None:
            self.behind_since = now
        elif now - self.behind_since > self.max_behind_s:
            return Offer.BEHIND
        if self.conflate:
            replaced = self._latest.pop(update.symbol, None) is not None
            self._latest[update.symbol] = update  # re-insert: dict order stays id order
            return Offer.CONFLATED if replaced else Offer.QUEUED
        if len(self._queue) >= self.max_pending:
            return Offer.OVERFLOW
        self._queue.append(update)
        return Offer.QUEUED

    def behind_s(self, now: float) -> float:
        return 0.0 if self.behind_since is None else now - self.behind_since

    def pending(self) -> int:
        return len(self._latest) + len(self._queue)

    def take(self) -> list[Pushed]:
        """Everything pending, oldest first; the client is no longer behind."""
        if self.conflate:
            out = list(self._latest.values())
            self._latest.clear()
        else:
            out = list(self._queue)
            self._queue.clear()
        self.behind_since = None
        if out:
            self.after = max(self.after, out[-1].key)
        return out

    def reset(self, after: tuple[int, int]) -> None:
        """After a (re)snapshot at `after`: drop what it covers, keep what came later."""
        self.after = after
        self.resync = False
        kept = [u for u in (*self._latest.values(), *self._queue) if u.key > after]
        self._latest.clear()
        self._queue.clear()
        self.behind_since = None
        for update in kept:
            if self.conflate:
                self._latest[update.symbol] = update
            else:
                self._queue.append(update)
