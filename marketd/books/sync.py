"""Keeping one symbol's local book in sync with Binance's diff stream (pure: no I/O, no threads).

`BookSync` receives events (a validated diff, a refused diff, a REST snapshot, a reconnect, the
clock, an audit snapshot) and returns commands for its driver to perform: request a snapshot,
an update was applied, publish the book, publish a gap, mark the book in or out of sync, an audit
result. The procedure is Binance's as corrected on 2025-11-12 (docs/books.md, "Keeping a book"):
buffer, snapshot, drop `u <= lastUpdateId`, refetch a snapshot older than the first buffered
`U`, apply in order; any `U` other than the previous `u + 1` is a gap and means a resync.

Guarantee: whenever the book is in sync it equals the exchange's book at `last_update_id`
inside its horizon (book.py); an update is applied only if it continues the book's id.
Memory: the book holds at most `max_levels` per side, the resync buffer `max_buffered` events,
an audit at most `audit_max_events` events.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

from marketd.books.audit import AuditResult, compare
from marketd.books.book import DEFAULT_MAX_LEVELS, OrderBook
from marketd.books.model import (
    MAX_SNAPSHOT_LIMIT,
    DepthSnapshot,
    DepthUpdate,
    Level,
    snapshot_weight,
)

DEFAULT_SNAPSHOT_LIMIT: Final = 5000
DEFAULT_SNAPSHOT_DEPTH: Final = 20
DEFAULT_SNAPSHOT_INTERVAL_S: Final = 1.0
# Diffs kept while a snapshot is on its way. The snapshot is requested once an event is buffered,
# so the buffer only has to span the REST round trip (plus a lagging REST replica); the newest are
# kept, and a snapshot older than the oldest kept one is refetched.
DEFAULT_MAX_BUFFERED: Final = 1000
DEFAULT_AUDIT_MAX_EVENTS: Final = 2000


class ResyncReason(enum.Enum):
    """Why a book is (re)built from a snapshot; also why it is out of sync meanwhile."""

    START = "start"  # no book yet (not counted as a resync)
    GAP = "gap"  # a U that is not the previous u + 1
    CROSSED = "crossed"  # best bid >= best ask after an update or in a snapshot
    BAD_LEVEL = "bad_level"  # a refused diff (negative or unparsable level, bad ids, ...)
    BAD_EVENT = "bad_event"  # a refused diff whose fields are broken (ids, types, event time)
    RECONNECT = "reconnect"  # the stream connection was replaced: events were missed
    STALE_SNAPSHOT = "stale_snapshot"  # the first update after a snapshot did not continue it
    AUDIT_MISMATCH = "audit_mismatch"  # the audit found levels that differ from the exchange's
    SHALLOW = "shallow"  # a truncated side has fewer known levels than the depth published


class SnapshotReason(enum.Enum):
    PERIODIC = "periodic"
    SYNCED = "synced"  # first sync of this book
    RESYNCED = "resynced"


class SnapshotPurpose(enum.Enum):
    SYNC = "sync"
    AUDIT = "audit"


# -- commands -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSnapshot:
    """Fetch `GET /api/v3/depth?symbol=&limit=` (through the pacer and the weight budget) and
    pass the answer to `on_snapshot` (SYNC) or `on_audit_snapshot` (AUDIT)."""

    symbol: str
    limit: int
    weight: int
    purpose: SnapshotPurpose


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """`update` was applied: the book is now at `update.last_update_id`."""

    symbol: str
    update: DepthUpdate


@dataclass(frozen=True, slots=True, kw_only=True)
class BookView:
    """The top of a book at one update id. Out of sync: no levels, `in_sync` false."""

    symbol: str
    last_update_id: int | None
    event_time_ms: int | None  # E of the last diff applied (None right after a snapshot)
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    depth: int  # levels asked for per side (a side may have fewer)
    in_sync: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishBook:
    view: BookView
    reason: SnapshotReason


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishGap:
    """The book skipped updates from_update_id..to_update_id (inclusive) of the stream and was
    rebuilt from a snapshot at `to_update_id`; `repaired`: the book is exact again."""

    symbol: str
    from_update_id: int
    to_update_id: int
    reason: ResyncReason
    repaired: bool
    kind: str = "depth"


@dataclass(frozen=True, slots=True, kw_only=True)
class SetInSync:
    """Mark the book in or out of sync everywhere it is published. `reason` when out of sync."""

    symbol: str
    in_sync: bool
    reason: ResyncReason | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditDone:
    result: AuditResult


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSkipped:
    """No comparison was possible: "snapshot_too_old" (older than the book when the audit
    started), "resynced" (the book was rebuilt meanwhile), "too_many_events"."""

    symbol: str
    why: str


Command = (
    RequestSnapshot | Applied | PublishBook | PublishGap | SetInSync | AuditDone | AuditSkipped
)


class Phase(enum.Enum):
    WAITING = "waiting"  # out of sync, waiting for a first diff before asking for a snapshot
    REQUESTED = "requested"  # out of sync, snapshot asked for, diffs buffered
    LIVE = "live"  # in sync, diffs applied as they come


@dataclass(slots=True)
class _Audit:
    start_id: int  # the book's id when the audit snapshot was requested
    updates: list[DepthUpdate] = field(default_factory=list)  # applied since
    reference: OrderBook | None = None  # a snapshot newer than the book, waiting for it


class BookSync:
    """The sync state machine of one symbol's book (see the module docstring)."""

    def __init__(
        self,
        symbol: str,
        *,
        snapshot_limit: int = DEFAULT_SNAPSHOT_LIMIT,
        max_levels: int = DEFAULT_MAX_LEVELS,
        snapshot_depth: int = DEFAULT_SNAPSHOT_DEPTH,
        snapshot_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        audit_max_events: int = DEFAULT_AUDIT_MAX_EVENTS,
        min_known_levels: int | None = None,
    ) -> None:
        if not 1 <= snapshot_limit <= MAX_SNAPSHOT_LIMIT:
            raise ValueError(f"snapshot_limit must be within 1..{MAX_SNAPSHOT_LIMIT}")
        if snapshot_depth < 1 or max_buffered < 1 or audit_max_events < 1:
            raise ValueError("snapshot_depth, max_buffered and audit_max_events must be >= 1")
        if snapshot_interval_s <= 0:
            raise ValueError("snapshot_interval_s must be > 0")
        self.symbol = symbol
        self.snapshot_limit = snapshot_limit
        self.snapshot_weight = snapshot_weight(snapshot_limit)
        self.snapshot_depth = snapshot_depth
        self.snapshot_interval_s = snapshot_interval_s
        self.max_buffered = max_buffered
        self.audit_max_events = audit_max_events
        # A truncated side with fewer known levels than this triggers a resync (SHALLOW).
        # (Never above max_levels: a side cut at max_levels would then always be "shallow".)
        if min_known_levels is None:
            min_known_levels = min(snapshot_depth, snapshot_limit, max_levels)
        if not 0 <= min_known_levels <= max_levels:
            raise ValueError(f"min_known_levels must be within 0..max_levels ({max_levels})")
        self.min_known_levels = min_known_levels
        self.book = OrderBook(max_levels=max_levels)
        self.phase = Phase.WAITING
        self.reason: ResyncReason | None = ResyncReason.START
        self._buffer: deque[DepthUpdate] = deque()
        self._stream_u: int | None = None  # u of the last diff received on this stream
        self._bridge = False  # the next applied diff must straddle the snapshot's id
        self._gap_from: int | None = None  # first id the book skipped, for the gap record
        self._gap_reason: ResyncReason | None = None
        self._synced_once = False
        self._audit: _Audit | None = None
        self._next_periodic: float | None = None
        # Counters for the driver's metrics.
        self.resyncs: Counter[ResyncReason] = Counter()
        self.refetches: Counter[ResyncReason] = Counter()  # snapshots refused and asked again
        self.applied = 0
        self.ignored = 0  # diffs at or below the book's id (duplicates, late copies)
        self.buffer_dropped = 0  # oldest buffered diffs dropped at max_buffered
        self.snapshots_requested = 0
        self.audits = 0

    # -- state ----------------------------------------------------------------------------------

    @property
    def in_sync(self) -> bool:
        return self.phase is Phase.LIVE

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def view(self, depth: int | None = None) -> BookView:
        """The top `depth` (default snapshot_depth) levels now; empty while out of sync."""
        n = self.snapshot_depth if depth is None else depth
        live = self.phase is Phase.LIVE
        bids, asks = self.book.top(n) if live else ([], [])
        return BookView(
            symbol=self.symbol,
            last_update_id=self.book.last_update_id,
            event_time_ms=self.book.event_time_ms,
            bids=tuple(bids),
            asks=tuple(asks),
            depth=n,
            in_sync=live,
        )

    # -- events ---------------------------------------------------------------------------------

    def on_diff(self, update: DepthUpdate, now: float) -> list[Command]:
        """A validated diff event of this symbol's stream, in arrival order."""
        prev_stream = self._stream_u
        if prev_stream is None or update.last_update_id > prev_stream:
            self._stream_u = update.last_update_id
        if self.phase is not Phase.LIVE:
            return self._buffer_diff(update, now)
        book = self.book
        local = book.last_update_id
        assert local is not None
        first, last = update.first_update_id, update.last_update_id
        if last <= local:
            self.ignored += 1
            return []
        if first != local + 1:
            # Right after a snapshot the first diff may straddle its id, if it continues the
            # stream. One that continues the stream but not the snapshot means the snapshot was
            # older than the stream (only possible when the stream's position was unknown).
            continues = prev_stream is None or first == prev_stream + 1
            if not (self._bridge and continues and first <= local + 1):
                stale = self._bridge and continues
                reason = ResyncReason.STALE_SNAPSHOT if stale else ResyncReason.GAP
                return self._resync(reason, now, gap_from=local + 1, keep=update)
        self._bridge = False
        book.apply(update)
        self.applied += 1
        out: list[Command] = [Applied(symbol=self.symbol, update=update)]
        if book.crossed():
            return out + self._resync(ResyncReason.CROSSED, now, gap_from=first)
        if self._shallow():
            return out + self._resync(ResyncReason.SHALLOW, now, gap_from=last + 1)
        if self._audit is not None:
            out += self._audit_step(update, now)
        return out

    def on_bad_diff(
        self, now: float, reason: ResyncReason = ResyncReason.BAD_LEVEL
    ) -> list[Command]:
        """A diff of this stream was refused (dead-lettered): the book cannot continue past it."""
        if self.phase is Phase.LIVE:
            local = self.book.last_update_id
            assert local is not None
            return self._resync(reason, now, gap_from=local + 1)
        self._buffer.clear()  # what is buffered no longer continues into what comes next
        self._stream_u = None
        return []

    def on_reconnect(self, now: float) -> list[Command]:
        """The stream connection was lost and replaced: events may be missing."""
        self._stream_u = None
        if self.phase is Phase.LIVE:
            local = self.book.last_update_id
            assert local is not None
            return self._resync(ResyncReason.RECONNECT, now, gap_from=local + 1, wait=True)
        self._buffer.clear()
        return []

    def on_snapshot(self, snapshot: DepthSnapshot, now: float) -> list[Command]:
        """The answer to a RequestSnapshot(SYNC)."""
        if self.phase is not Phase.REQUESTED:
            return []  # a late answer: the book is live, or waiting for a first diff
        out: list[Command] = []
        last_id = snapshot.last_update_id
        buf = self._buffer
        first_available = buf[0].first_update_id if buf else self._next_stream_id()
        if first_available is not None and last_id + 1 < first_available:
            # Older than every diff we still have: the updates in between are lost to us.
            self.refetches[ResyncReason.STALE_SNAPSHOT] += 1
            return [self._request(SnapshotPurpose.SYNC)]
        book = self.book
        book.load(snapshot)
        if book.crossed():
            self.refetches[ResyncReason.CROSSED] += 1
            book.clear()
            return [self._request(SnapshotPurpose.SYNC)]
        while buf and buf[0].last_update_id <= last_id:
            buf.popleft()
        applied: list[Command] = []
        for update in buf:  # contiguous (see _buffer_diff), the first straddles last_id
            book.apply(update)
            self.applied += 1
            applied.append(Applied(symbol=self.symbol, update=update))
        self._bridge = not buf
        buf.clear()
        self.phase = Phase.LIVE
        self.reason = None
        out.append(SetInSync(symbol=self.symbol, in_sync=True, reason=None))
        # Nothing was skipped when the snapshot is older than where the book stopped (the
        # buffered diffs were applied on top of it): then the resync is only counted.
        if (
            self._gap_from is not None
            and self._gap_reason is not None
            and last_id >= self._gap_from
        ):
            out.append(
                PublishGap(
                    symbol=self.symbol,
                    from_update_id=self._gap_from,
                    to_update_id=last_id,
                    reason=self._gap_reason,
                    repaired=True,
                )
            )
        self._gap_from = self._gap_reason = None
        out += applied
        if book.crossed():
            return out + self._resync(ResyncReason.CROSSED, now, gap_from=last_id + 1)
        if self._shallow():
            return out + self._resync(ResyncReason.SHALLOW, now, gap_from=last_id + 1)
        reason = SnapshotReason.RESYNCED if self._synced_once else SnapshotReason.SYNCED
        self._synced_once = True
        out.append(PublishBook(view=self.view(), reason=reason))
        self._next_periodic = now + self.snapshot_interval_s
        return out

    def tick(self, now: float) -> list[Command]:
        """The clock: publishes the periodic snapshot when due (absolute deadlines). Call it at
        least every `snapshot_interval_s`; `next_tick_at()` says when."""
        due = self._next_periodic
        if due is None or now < due:
            return []
        due += self.snapshot_interval_s
        self._next_periodic = due if due > now else now + self.snapshot_interval_s
        return [PublishBook(view=self.view(), reason=SnapshotReason.PERIODIC)]

    def next_tick_at(self) -> float | None:
        return self._next_periodic

    # -- audit ----------------------------------------------------------------------------------

    def start_audit(self, now: float) -> list[Command]:
        """Ask for an audit snapshot (nothing while out of sync or while an audit runs)."""
        if self.phase is not Phase.LIVE or self._audit is not None:
            return []
        local = self.book.last_update_id
        assert local is not None
        self._audit = _Audit(start_id=local)
        return [self._request(SnapshotPurpose.AUDIT)]

    @property
    def auditing(self) -> bool:
        return self._audit is not None

    def on_audit_snapshot(self, snapshot: DepthSnapshot, now: float) -> list[Command]:
        """The answer to a RequestSnapshot(AUDIT)."""
        audit = self._audit
        if audit is None:
            return []
        if snapshot.last_update_id < audit.start_id:
            self._audit = None
            return [AuditSkipped(symbol=self.symbol, why="snapshot_too_old")]
        ref = OrderBook(max_levels=self.book.max_levels)
        ref.load(snapshot)
        audit.reference = ref
        return self._audit_try(now)

    def abandon_audit(self) -> list[Command]:
        """The audit snapshot could not be fetched."""
        if self._audit is None:
            return []
        self._audit = None
        return [AuditSkipped(symbol=self.symbol, why="snapshot_failed")]

    # -- internals ------------------------------------------------------------------------------

    def _next_stream_id(self) -> int | None:
        """With nothing buffered: the first id we would get next (None: the stream is new)."""
        return None if self._stream_u is None else self._stream_u + 1

    def _request(self, purpose: SnapshotPurpose) -> RequestSnapshot:
        self.snapshots_requested += 1
        return RequestSnapshot(
            symbol=self.symbol,
            limit=self.snapshot_limit,
            weight=self.snapshot_weight,
            purpose=purpose,
        )

    def _shallow(self) -> bool:
        need = self.min_known_levels
        book = self.book
        return (book.bids.horizon is not None and len(book.bids) < need) or (
            book.asks.horizon is not None and len(book.asks) < need
        )

    def _buffer_diff(self, update: DepthUpdate, now: float) -> list[Command]:
        buf = self._buffer
        if buf:
            tail = buf[-1].last_update_id
            if update.last_update_id <= tail:
                self.ignored += 1
                return []
            if update.first_update_id != tail + 1:
                buf.clear()  # a hole inside the buffer: only what follows it can be used
        buf.append(update)
        if len(buf) > self.max_buffered:
            buf.popleft()
            self.buffer_dropped += 1
        if self.phase is Phase.WAITING:
            self.phase = Phase.REQUESTED
            return [self._request(SnapshotPurpose.SYNC)]
        return []

    def _resync(
        self,
        reason: ResyncReason,
        now: float,
        *,
        gap_from: int,
        keep: DepthUpdate | None = None,
        wait: bool = False,
    ) -> list[Command]:
        """Drop the book's claim to be right and rebuild it from a snapshot."""
        self.resyncs[reason] += 1
        out: list[Command] = [SetInSync(symbol=self.symbol, in_sync=False, reason=reason)]
        if self._audit is not None:
            self._audit = None
            out.append(AuditSkipped(symbol=self.symbol, why="resynced"))
        if self._gap_from is None:
            self._gap_from, self._gap_reason = gap_from, reason
        self.reason = reason
        self._bridge = False
        self._buffer.clear()
        if keep is not None:
            self._buffer.append(keep)
        if wait and keep is None:
            self.phase = Phase.WAITING  # a new connection: ask once its first diff is here
            return out
        self.phase = Phase.REQUESTED
        out.append(self._request(SnapshotPurpose.SYNC))
        return out

    def _audit_step(self, update: DepthUpdate, now: float) -> list[Command]:
        audit = self._audit
        assert audit is not None
        audit.updates.append(update)
        if len(audit.updates) > self.audit_max_events:
            self._audit = None
            return [AuditSkipped(symbol=self.symbol, why="too_many_events")]
        if audit.reference is None:
            return []
        return self._audit_try(now)

    def _audit_try(self, now: float) -> list[Command]:
        """Compare once the book has reached the reference snapshot's id."""
        audit = self._audit
        assert audit is not None and audit.reference is not None
        ref = audit.reference
        ref_id = ref.last_update_id
        local = self.book.last_update_id
        assert ref_id is not None and local is not None
        if local < ref_id:
            return []  # the diffs up to the snapshot are still on their way
        for update in audit.updates:  # contiguous from start_id + 1 <= ref_id + 1
            if update.last_update_id > ref_id:
                ref.apply(update)
        self._audit = None
        self.audits += 1
        result = compare(self.book, ref, symbol=self.symbol)
        out: list[Command] = [AuditDone(result=result)]
        if not result.ok:
            out += self._resync(ResyncReason.AUDIT_MISMATCH, now, gap_from=local + 1)
        return out
