"""The latest published view of every local book, between the book keeper and its readers.

The keeper (inside ingest) publishes a view per applied batch; the Redis writer and any other
reader take what changed since they last looked. Publishing never blocks and never grows: a
symbol that changes again before it was taken is conflated to its newest view, so a slow or
absent reader (Redis down) costs ingest nothing. Pure: the driver that waits for changes passes
a wake-up callback (e.g. a trio event's `set`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

Levels = tuple[tuple[str, str], ...]


@attrs.frozen(kw_only=True)
class BookView:
    """The top of one symbol's book at one update id, as readers see it."""

    symbol: str
    last_update_id: int
    event_time: int  # exchange time of the last applied event, ms since the epoch (0: unknown)
    bids: Levels  # best first, [price, qty] decimal strings as received
    asks: Levels
    in_sync: bool
    reason: str | None = None  # why the book is out of sync (a ResyncReason value)
    received_at: float = 0.0  # monotonic receipt time of the event that produced this view


class BookBoard:
    """Newest `BookView` per symbol plus the set of symbols changed since the last `take`."""

    def __init__(self) -> None:
        self._latest: dict[str, BookView] = {}
        self._changed: dict[str, None] = {}  # insertion-ordered set
        self._listeners: list[Callable[[], object]] = []
        self.conflated = 0  # views replaced before any reader took them

    def publish(self, view: BookView) -> None:
        if view.symbol in self._changed:
            self.conflated += 1
        self._latest[view.symbol] = view
        self._changed[view.symbol] = None
        for wake in self._listeners:
            wake()

    def on_change(self, wake: Callable[[], object]) -> None:
        """Call `wake()` after every publish (cheap and non-blocking, e.g. an event's `set`)."""
        self._listeners.append(wake)

    def take(self) -> list[BookView]:
        """The newest view of every symbol changed since the previous take, in change order."""
        views = [self._latest[s] for s in self._changed]
        self._changed.clear()
        return views

    def latest(self, symbol: str) -> BookView | None:
        return self._latest.get(symbol)

    def symbols(self) -> Iterable[str]:
        return self._latest.keys()

    def pending(self) -> int:
        return len(self._changed)
