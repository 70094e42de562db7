"""The book keeper: the thin trio driver of the local order books inside the ingest component.

Receives depth frames from the WebSocket connections (`on_frame`, synchronous, on the trio
thread) and reconnect notices; returns the Kafka records of each frame at once (raw_depth,
raw_depth_partial, dead letters) for the ingest sink, in frame order. `run()` performs what the
sync core asks for: REST snapshots paced by `SnapshotPacer` through the shared `WeightBudget`,
the periodic book_snapshots, the rotating audit, the metrics; its records (snapshots, depth
gaps) go to `sink` from one task, in the order the core produced them. Every applied batch is
published to the `BookBoard` (Redis writer, API). The bookkeeping is the pure core's
(sync.py, pacing.py, publish.py); docs/books.md. On cancellation nothing is left half done:
in-flight snapshot requests are dropped (the next start resyncs).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

import msgspec
import trio

from marketd.books import publish
from marketd.books.board import BookBoard
from marketd.books.board import BookView as BoardView
from marketd.books.model import (
    DepthDataError,
    DepthError,
    DepthUpdate,
    RawDiff,
    decode_diff,
    parse_diff,
    parse_partial,
    parse_snapshot,
)
from marketd.books.pacing import AuditRotation, SnapshotPacer
from marketd.books.sync import (
    Applied,
    AuditDone,
    AuditSkipped,
    BookSync,
    Command,
    PublishBook,
    PublishGap,
    RequestSnapshot,
    ResyncReason,
    SetInSync,
    SnapshotPurpose,
    SnapshotReason,
)
from marketd.config import Config
from marketd.errors import MarketdError
from marketd.ingest.decode import MIN_TIME_MS, Outgoing, dlq_record
from marketd.logs import Throttle, get_logger
from marketd.metrics import MetricsFactory
from marketd.streams import StreamKind, StreamSpec

log = get_logger(__name__)

_JSON = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder().encode
Sink = Callable[[list[Outgoing]], Awaitable[object]]
# Records waiting for the sink (snapshots, gaps) beyond which periodic snapshots are dropped
# (counted): a sink that blocks (Kafka backpressure) must not grow memory without bound.
MAX_OUTBOX: Final = 10_000
METRICS_INTERVAL_S: Final = 1.0
# A diff whose last update id is at most this far below the newest one seen on its stream is a
# copy (two connections overlap while one replaces the other): not published twice. Further
# below is not a copy: published, and the book decides (a corrupt huge id must not make every
# later event look like a copy).
DUPLICATE_WINDOW: Final = 10_000_000
SNAPSHOT_MAX_IN_FLIGHT: Final = 2


class SnapshotSource(Protocol):
    """Where snapshots come from: marketd.rest.client.BinanceRest (its `depth` reserves the
    weight in the shared WeightBudget first)."""

    async def depth(self, symbol: str, limit: int, weight: int) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BookSettings:
    """The `[book]` settings the keeper needs (marketd.config.BookConfig)."""

    symbols: tuple[str, ...] = ()  # empty: every symbol with a diff depth stream
    snapshot_limit: int = 5000
    max_levels: int = 5000
    snapshot_interval_s: float = 1.0
    snapshot_depth: int = 20
    redis_depth: int = 20
    audit_interval_s: float = 60.0
    snapshot_weight_per_min: int = 2400
    max_future_ms: int = 10_000  # an event time further ahead than this is refused
    time_div: int = 1  # 1000 for MICROSECOND streams: event times are kept in ms
    dlq_max_raw_bytes: int = 8192


class BookKeeper:
    """Books of every tracked symbol; see the module docstring."""

    def __init__(
        self,
        streams: Iterable[StreamSpec],
        *,
        settings: BookSettings | None = None,
        topics: publish.BookTopics | None = None,
        board: BookBoard | None = None,
        metrics: MetricsFactory | None = None,
        clock: Callable[[], float] = trio.current_time,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        s = self.settings = settings or BookSettings()
        self.topics = topics or publish.BookTopics()
        self.board = board
        self._clock = clock
        self._monotonic = monotonic
        self._wall_ns = wall_ns
        wanted = set(s.symbols)
        # Books follow one diff stream per symbol (the config refuses two).
        self.diff_streams: dict[str, str] = {}
        for spec in streams:
            symbol = spec.symbol
            if spec.kind is StreamKind.DEPTH and symbol and (not wanted or symbol in wanted):
                self.diff_streams.setdefault(symbol, spec.name)
        min_known = min(max(s.snapshot_depth, s.redis_depth), s.snapshot_limit, s.max_levels)
        self.books: dict[str, BookSync] = {
            symbol: BookSync(
                symbol,
                snapshot_limit=s.snapshot_limit,
                max_levels=s.max_levels,
                snapshot_depth=s.snapshot_depth,
                snapshot_interval_s=s.snapshot_interval_s,
                min_known_levels=min_known,
            )
            for symbol in sorted(self.diff_streams)
        }
        self.pacer = SnapshotPacer(
            weight_per_min=s.snapshot_weight_per_min, max_in_flight=SNAPSHOT_MAX_IN_FLIGHT
        )
        self.rotation = AuditRotation(s.audit_interval_s)
        self._outbox: list[Outgoing] = []
        self._deferred: dict[str, float] | None = None  # views due at end_batch, by symbol
        self._newest_u: dict[str, int] = {}  # per diff stream: the highest `u` published
        self._wake = trio.Event()
        self._throttle = Throttle(60.0)
        self._metrics = _BookMetrics(metrics or MetricsFactory())
        for symbol, sync in self.books.items():
            # Readers (Redis, API) see the top redis_depth levels: a batch that changed nothing
            # there is not published to the board (docs/books.md §8).
            sync.book.watch_top(s.redis_depth)
            self._metrics.in_sync.labels(symbol).set(0)
            self._publish_out_of_sync(symbol, ResyncReason.START, 0.0)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        streams: Iterable[StreamSpec],
        *,
        board: BookBoard | None = None,
        metrics: MetricsFactory | None = None,
    ) -> BookKeeper:
        """The keeper of this instance's streams (its shard) with the `[book]` and `[topics]`
        settings."""
        b = cfg.book
        settings = BookSettings(
            symbols=b.symbols,
            snapshot_limit=b.snapshot_limit,
            max_levels=b.max_levels,
            snapshot_interval_s=b.snapshot_interval_s,
            snapshot_depth=b.snapshot_depth,
            redis_depth=b.redis_depth,
            audit_interval_s=b.audit_interval_s,
            snapshot_weight_per_min=b.snapshot_weight_per_min,
            max_future_ms=cfg.ingest.max_future_ms,
            time_div=1000 if cfg.binance.time_unit == "MICROSECOND" else 1,
            dlq_max_raw_bytes=cfg.dlq.max_raw_bytes,
        )
        t = cfg.topics
        topics = publish.BookTopics(
            raw_depth=t.raw_depth,
            raw_depth_partial=t.raw_depth_partial,
            book_snapshots=t.book_snapshots,
            gaps=t.gaps,
            dlq=t.dlq,
        )
        return cls(streams, settings=settings, topics=topics, board=board, metrics=metrics)

    # -- frames (synchronous: called by the connection tasks, in arrival order) -----------------

    def on_frame(self, spec: StreamSpec, payload: Any, recv_ns: int) -> list[Outgoing]:
        """One depth frame's `data` (decoded JSON, or its raw text/bytes) of stream `spec`,
        received at `recv_ns` (time.time_ns()). Returns its records for the ingest sink, in
        order; never raises for bad input (it is dead-lettered and counted)."""
        out: list[Outgoing] = []
        if spec.symbol is None:
            return out
        raw = payload
        if spec.kind is StreamKind.DEPTH and isinstance(payload, bytes | str | msgspec.Raw):
            # The fast path: one typed decode of Binance's compact frame (docs/performance.md
            # §8); anything else takes the generic path below, which says what is wrong.
            fast = decode_diff(payload, symbol=spec.symbol)
            if fast is not None:
                self._diff(spec, fast.update, fast, raw, recv_ns, out)
                return out
        if isinstance(payload, bytes | bytearray | memoryview | str | msgspec.Raw):
            try:
                payload = _JSON.decode(payload)
            except msgspec.DecodeError as exc:
                self._reject(spec, raw, "bad_json", str(exc), recv_ns, out)
                self._refused(spec)
                return out
        if spec.kind is StreamKind.DEPTH:
            try:
                update = parse_diff(payload, symbol=spec.symbol)
            except DepthDataError as exc:
                reason = publish.reject_reason(exc, payload, partial=False)
                self._reject(spec, raw, reason, exc.detail, recv_ns, out)
                self._refused(spec, exc)
                return out
            self._diff(spec, update, None, raw, recv_ns, out)
        elif spec.kind is StreamKind.DEPTH_PARTIAL:
            self._partial(spec, payload, raw, recv_ns, out)
        return out

    def on_reconnect(self, symbols: Iterable[str]) -> list[Outgoing]:
        """The connection carrying these symbols' diff streams was replaced: Binance does not
        replay, so their books are rebuilt from the new connection's first event."""
        out: list[Outgoing] = []
        now = self._clock()
        for symbol in symbols:
            sync = self.books.get(symbol)
            if sync is not None:
                self._perform(sync, sync.on_reconnect(now), out, self._monotonic())
        return out

    def _diff(
        self,
        spec: StreamSpec,
        update: DepthUpdate,
        fast: RawDiff | None,
        raw: Any,
        recv_ns: int,
        out: list[Outgoing],
    ) -> None:
        """A validated diff; `fast`: its level arrays as the frame's bytes (decode_diff)."""
        symbol = spec.symbol
        assert symbol is not None
        recv_ms = recv_ns // 1_000_000
        event_ms = update.event_time_ms or 0
        if self.settings.time_div != 1:
            event_ms //= self.settings.time_div
            update = replace(update, event_time_ms=event_ms)
        if event_ms < MIN_TIME_MS or event_ms > recv_ms + self.settings.max_future_ms:
            detail = f"E={event_ms} is outside 2017..now+{self.settings.max_future_ms}ms"
            self._reject(spec, raw, "absurd_timestamp", detail, recv_ns, out)
            self._refused(spec)
            return
        last = update.last_update_id
        newest = self._newest_u.get(spec.name)
        if newest is not None and newest - DUPLICATE_WINDOW < last <= newest:
            self._metrics.duplicates.inc()
            return
        self._newest_u[spec.name] = last
        key = symbol.encode()
        if fast is not None:
            value = publish.depth_value_raw(
                symbol=symbol,
                first_update_id=update.first_update_id,
                last_update_id=last,
                bids_json=fast.bids_json,
                asks_json=fast.asks_json,
                event_time_ms=event_ms,
                ingested_at_ms=recv_ms,
                stream=spec.name,
            )
        else:
            value = publish.depth_value(
                symbol=symbol,
                first_update_id=update.first_update_id,
                last_update_id=last,
                bids=update.bids,
                asks=update.asks,
                event_time_ms=event_ms,
                ingested_at_ms=recv_ms,
                stream=spec.name,
            )
        out.append(Outgoing(self.topics.raw_depth, key, value, recv_ns))
        sync = self.books.get(symbol)
        if sync is not None and self.diff_streams[symbol] == spec.name:
            self._perform(sync, sync.on_diff(update, self._clock()), out, self._monotonic())

    def _partial(
        self, spec: StreamSpec, payload: Any, raw: Any, recv_ns: int, out: list[Outgoing]
    ) -> None:
        symbol, depth = spec.symbol, spec.depth
        assert symbol is not None and depth is not None
        try:
            book = parse_partial(payload, symbol=symbol, depth=depth)
        except DepthDataError as exc:
            reason = publish.reject_reason(exc, payload, partial=True)
            self._reject(spec, raw, reason, exc.detail, recv_ns, out)
            return
        value = publish.partial_value(
            symbol=symbol,
            last_update_id=book.last_update_id,
            bids=book.bids,
            asks=book.asks,
            depth=depth,
            ingested_at_ms=recv_ns // 1_000_000,
            stream=spec.name,
        )
        out.append(Outgoing(self.topics.raw_depth_partial, symbol.encode(), value, recv_ns))

    def _refused(self, spec: StreamSpec, exc: DepthDataError | None = None) -> None:
        """A diff of a book's stream was dead-lettered: the book cannot continue past it."""
        symbol = spec.symbol
        sync = self.books.get(symbol) if symbol is not None else None
        if sync is None or spec.kind is not StreamKind.DEPTH:
            return
        if self.diff_streams.get(sync.symbol) != spec.name:
            return
        level = exc is not None and exc.reason is DepthError.BAD_LEVEL
        reason = ResyncReason.BAD_LEVEL if level else ResyncReason.BAD_EVENT
        cmds = sync.on_bad_diff(self._clock(), reason)
        self._perform(sync, cmds, self._outbox, self._monotonic())
        self._wake.set()

    def _reject(
        self,
        spec: StreamSpec,
        raw: Any,
        reason: str,
        detail: str,
        recv_ns: int,
        out: list[Outgoing],
    ) -> None:
        self._metrics.rejected.labels(reason).inc()
        if isinstance(raw, str | bytes):
            data: str | bytes = raw
        elif isinstance(raw, bytearray | memoryview | msgspec.Raw):
            data = bytes(raw)
        else:
            data = _ENCODE(raw)
        record = dlq_record(
            data, reason, detail, spec.name, recv_ns // 1_000_000, self.settings.dlq_max_raw_bytes
        )
        key = spec.symbol.encode() if spec.symbol else None
        out.append(Outgoing(self.topics.dlq, key, _ENCODE(record), recv_ns))
        suppressed = self._throttle.should_log(f"reject:{reason}", self._monotonic())
        if suppressed is not None:
            log.warning(
                "book.rejected",
                reason=reason,
                detail=detail[:200],
                stream=spec.name,
                sample=str(data[:160]),
                suppressed_since_last=suppressed,
            )

    # -- commands -------------------------------------------------------------------------------

    def _perform(
        self, sync: BookSync, cmds: Sequence[Command], out: list[Outgoing], received_at: float
    ) -> None:
        """Carry out the core's commands; records go to `out` in the core's order."""
        symbol = sync.symbol
        publish_view = synced = False
        now_ns = 0
        for cmd in cmds:
            if isinstance(cmd, Applied):
                publish_view = True
                continue
            if not now_ns:
                now_ns = self._wall_ns()
            if isinstance(cmd, RequestSnapshot):
                self.pacer.want(cmd, self._clock())
                self._wake.set()
            elif isinstance(cmd, PublishBook):
                if cmd.reason is SnapshotReason.PERIODIC and len(self._outbox) >= MAX_OUTBOX:
                    self._metrics.snapshots_dropped.inc()
                    continue
                value = publish.snapshot_value(cmd.view, cmd.reason, now_ns // 1_000_000)
                out.append(Outgoing(self.topics.book_snapshots, symbol.encode(), value, now_ns))
            elif isinstance(cmd, PublishGap):
                stream = self.diff_streams[symbol]
                value = publish.gap_value(cmd, stream, now_ns // 1_000_000)
                out.append(Outgoing(self.topics.gaps, symbol.encode(), value, now_ns))
                log.info(
                    "book.gap",
                    symbol=symbol,
                    from_update_id=cmd.from_update_id,
                    to_update_id=cmd.to_update_id,
                    reason=cmd.reason.value,
                    repaired=cmd.repaired,
                )
            elif isinstance(cmd, SetInSync):
                self._metrics.in_sync.labels(symbol).set(1 if cmd.in_sync else 0)
                if cmd.in_sync:
                    publish_view = synced = True
                else:
                    publish_view = synced = False
                    reason = cmd.reason or ResyncReason.START
                    self._publish_out_of_sync(symbol, reason, received_at)
                    self._log_resync(sync, reason)
            elif isinstance(cmd, AuditDone):
                self._audited(cmd)
            elif isinstance(cmd, AuditSkipped):
                self._metrics.audits.labels(symbol, "skipped").inc()
                log.debug("book.audit_skipped", symbol=symbol, why=cmd.why)
        if publish_view and sync.in_sync and self.board is not None:
            book = sync.book
            if not (synced or book.top_changed):
                return
            book.seen_top()
            if self._deferred is not None:
                # Inside a batch of frames: one view per book at its end (the earliest receipt
                # of what it conflates, for an honest latency).
                self._deferred.setdefault(symbol, received_at)
                return
            self._publish_view(sync, received_at)

    def _publish_view(self, sync: BookSync, received_at: float) -> None:
        assert self.board is not None
        book = sync.book
        depth = self.settings.redis_depth
        self.board.publish(
            BoardView(
                symbol=sync.symbol,
                last_update_id=book.last_update_id or 0,
                event_time=book.event_time_ms or 0,
                bids=tuple(book.bids.top(depth)),
                asks=tuple(book.asks.top(depth)),
                in_sync=True,
                received_at=received_at,
            )
        )

    def begin_batch(self) -> None:
        """Frames of one receive batch follow (`on_frame` calls, nothing awaited in between):
        the board gets one view per changed book at `end_batch` instead of one per frame (no
        reader can run before then anyway)."""
        self._deferred = {}

    def end_batch(self) -> None:
        deferred, self._deferred = self._deferred, None
        if not deferred:
            return
        for symbol, received_at in deferred.items():
            sync = self.books[symbol]
            if sync.in_sync:
                self._publish_view(sync, received_at)

    def _publish_out_of_sync(self, symbol: str, reason: ResyncReason, received_at: float) -> None:
        if self.board is None:
            return
        if self._deferred is not None:
            self._deferred.pop(symbol, None)  # never an in-sync view after this one
        sync = self.books[symbol]
        self.board.publish(
            BoardView(
                symbol=symbol,
                last_update_id=sync.book.last_update_id or 0,
                event_time=sync.book.event_time_ms or 0,
                bids=(),
                asks=(),
                in_sync=False,
                reason=reason.value,
                received_at=received_at,
            )
        )

    def _log_resync(self, sync: BookSync, reason: ResyncReason) -> None:
        if reason is ResyncReason.START:
            return
        suppressed = self._throttle.should_log(f"resync:{reason.value}", self._monotonic())
        if suppressed is not None:
            log.warning(
                "book.resync",
                symbol=sync.symbol,
                reason=reason.value,
                at_update_id=sync.book.last_update_id,
                suppressed_since_last=suppressed,
            )

    def _audited(self, cmd: AuditDone) -> None:
        r = cmd.result
        m = self._metrics
        for result, n in (("matching", r.matching), ("missing", r.missing), ("phantom", r.phantom)):
            m.audit_levels.labels(r.symbol, result).set(n)
        m.audits.labels(r.symbol, "ok" if r.ok else "mismatch").inc()
        fields = {
            "symbol": r.symbol,
            "update_id": r.update_id,
            "matching": r.matching,
            "missing": r.missing,
            "phantom": r.phantom,
            "sample": "; ".join(r.sample),
        }
        if r.ok:
            log.info("book.audit", **fields)
        else:
            log.error("book.audit_mismatch", **fields)

    # -- the driver -----------------------------------------------------------------------------

    async def run(
        self,
        rest: SnapshotSource,
        sink: Sink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Snapshots, periodic book_snapshots, the audit and the metrics, until cancelled.
        `sink` takes the records this task produces (the ingest sink, keyed by symbol)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            next_metrics = self._clock()
            while True:
                now = self._clock()
                while (req := self.pacer.next_grant(now)) is not None:
                    nursery.start_soon(self._fetch, rest, req)
                for sync in self.books.values():
                    due = sync.next_tick_at()
                    if due is not None and due <= now:
                        self._perform(sync, sync.tick(now), self._outbox, self._monotonic())
                symbol = self.rotation.due(now, list(self.books))
                if symbol is not None:
                    sync = self.books[symbol]
                    self._perform(sync, sync.start_audit(now), self._outbox, self._monotonic())
                if now >= next_metrics:
                    self._export_metrics()
                    next_metrics = now + METRICS_INTERVAL_S
                if self._outbox:
                    batch, self._outbox = self._outbox, []
                    await sink(batch)
                    continue  # the sink may have taken a while: look at the clock again
                wake_at = min(self._deadlines(now, next_metrics))
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _deadlines(self, now: float, next_metrics: float) -> Iterable[float]:
        yield next_metrics
        pacer = self.pacer.wake_at(now)
        if pacer is not None:
            yield pacer
        audit = self.rotation.next_at()
        if audit is not None and audit > now:
            yield audit
        for sync in self.books.values():
            due = sync.next_tick_at()
            if due is not None:
                yield due

    async def _fetch(self, rest: SnapshotSource, req: RequestSnapshot) -> None:
        sync = self.books[req.symbol]
        audit = req.purpose is SnapshotPurpose.AUDIT
        m = self._metrics
        m.snapshot_weight.inc(req.weight)
        try:
            body = await rest.depth(req.symbol, req.limit, req.weight)
            snapshot = parse_snapshot(body, symbol=req.symbol, limit=req.limit)
        except (MarketdError, DepthDataError) as exc:
            m.snapshot_requests.labels(req.purpose.value, "error").inc()
            suppressed = self._throttle.should_log(
                f"snapshot:{type(exc).__name__}", self._monotonic()
            )
            if suppressed is not None:
                log.warning(
                    "book.snapshot_failed",
                    symbol=req.symbol,
                    purpose=req.purpose.value,
                    error=repr(exc)[:300],
                    suppressed_since_last=suppressed,
                )
            # A failed sync snapshot is retried after a backoff; a failed audit is given up
            # (the next one comes in its turn).
            self.pacer.finished(req.symbol, req.purpose, ok=audit, now=self._clock())
            if audit:
                self._perform(sync, sync.abandon_audit(), self._outbox, self._monotonic())
            self._wake.set()
            return
        m.snapshot_requests.labels(req.purpose.value, "ok").inc()
        now = self._clock()
        self.pacer.finished(req.symbol, req.purpose, ok=True, now=now)
        cmds = sync.on_audit_snapshot(snapshot, now) if audit else sync.on_snapshot(snapshot, now)
        self._perform(sync, cmds, self._outbox, self._monotonic())
        self._wake.set()

    def _export_metrics(self) -> None:
        """Counters of the core, read once a second (nothing per event on the hot path)."""
        m = self._metrics
        for symbol, sync in self.books.items():
            book = sync.book
            m.levels.labels(symbol, "bid").set(len(book.bids))
            m.levels.labels(symbol, "ask").set(len(book.asks))
            m.buffered.labels(symbol).set(sync.buffered)
            m.add(m.applied, (symbol,), sync.applied)
            m.add(m.dropped, (symbol,), book.dropped_levels)
            m.add(m.ignored, (symbol,), sync.ignored)
            for reason, n in sync.resyncs.items():
                m.add(m.resyncs, (symbol, reason.value), n)
        m.snapshot_queue.set(self.pacer.queued)


class _BookMetrics:
    def __init__(self, f: MetricsFactory) -> None:
        self.in_sync = f.gauge("book_in_sync", "1 while the local book is in sync", ["symbol"])
        self.levels = f.gauge("book_levels", "levels kept per side", ["symbol", "side"])
        self.buffered = f.gauge("book_buffered", "diffs buffered while resyncing", ["symbol"])
        self.applied = f.counter("book_updates_applied", "diff events applied", ["symbol"])
        self.ignored = f.counter(
            "book_updates_ignored", "diff events at or below the book's id", ["symbol"]
        )
        self.dropped = f.counter(
            "book_levels_dropped", "levels dropped at book.max_levels", ["symbol"]
        )
        self.resyncs = f.counter("book_resyncs", "books rebuilt, by reason", ["symbol", "reason"])
        self.audit_levels = f.gauge(
            "book_audit_levels",
            "levels of the last audit: matching, missing, phantom",
            ["symbol", "result"],
        )
        self.audits = f.counter("book_audits", "audits by outcome", ["symbol", "outcome"])
        self.snapshot_requests = f.counter(
            "book_snapshot_requests", "REST depth snapshots", ["purpose", "outcome"]
        )
        self.snapshot_weight = f.counter("book_snapshot_weight", "REST weight of the snapshots")
        self.snapshot_queue = f.gauge("book_snapshot_queue", "snapshot requests waiting")
        self.snapshots_dropped = f.counter(
            "book_snapshots_dropped", "periodic snapshots dropped while the sink was full"
        )
        self.rejected = f.counter("book_rejected", "depth frames dead-lettered", ["reason"])
        self.duplicates = f.counter(
            "book_duplicate_diffs", "diff events received twice (overlapping connections)"
        )
        self._seen: dict[tuple[int, tuple[str, ...]], int] = {}

    def add(self, counter: Any, labels: tuple[str, ...], total: int) -> None:
        """Advance a counter to the core's running `total` (the core only counts up)."""
        key = (id(counter), labels)
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._seen[key] = total
