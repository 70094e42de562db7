"""The book writer: the newest `BookView` of every changed book -> Redis `book:{SYMBOL}`.

Receives views from the `BookBoard` (books/board.py) that the book keeper publishes per applied
batch, and writes the newest per symbol with one conditional pipeline per pass (books/store.py):
over a trio socket to a plain TCP Redis (`NativeBookWrites`: no thread, no GIL hand-over with the
ingest loop, docs/performance.md §8), else (TLS, unix socket) redis-py in a worker thread. It never
slows the keeper: publishing only replaces the board's view, and while Redis is slow or down the
writer keeps taking (conflated) views and retries the newest with capped backoff. Redis out of
reach is the `books` health entry's state with its reason, never an error. Returns on drain after
one bounded last write of what is pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import trio

from marketd.backoff import Backoff
from marketd.books.board import BookBoard, BookView
from marketd.books.store import (
    DEFAULT_REDIS_DEPTH,
    BookStore,
    BookWrite,
    NativeBookWrites,
    WriteResult,
    WriteStatus,
)
from marketd.errors import ConfigError, StoreUnavailable
from marketd.health import Dependency, address, error_text
from marketd.logs import Throttle, get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)

COMPONENT: Final = "books"
REDIS_TIMEOUT_S: Final = 2.0  # connect and per-reply bound: a hung Redis becomes an outage
REDIS_CHECK_S: Final = 2.0  # with no write for this long, ping: an outage shows while books idle
OUTAGE_BACKOFF_INITIAL_S: Final = 0.1
OUTAGE_BACKOFF_MAX_S: Final = 5.0
DRAIN_WRITE_S: Final = 2.0  # the last write on drain is bounded: a down Redis does not hold it
_PLAUSIBLE_LATENCY_S: Final = 3600.0  # beyond: received_at is from another clock, not observed


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BookWriterMetrics:
    def __init__(self, rt: Runtime) -> None:
        m = rt.metrics
        self.latency = m.fast_histogram(
            "book_update_to_redis_seconds",
            "book update receipt (BookView.received_at) to its Redis write acknowledged",
            ["symbol"],
        )
        self.writes = m.counter("book_redis_writes", "book:{SYMBOL} writes by result", ["result"])
        self.conflated = m.counter(
            "book_views_conflated",
            "book views replaced by a newer one before they were written to Redis",
        )
        self.write_s = m.fast_histogram(
            "book_redis_write_seconds", "one pipelined write of the changed books"
        )


class BookWriter:
    """Takes views from the board, writes them, reports Redis' state. Owns no task."""

    def __init__(
        self,
        rt: Runtime,
        board: BookBoard,
        store: BookStore,
        *,
        redis_depth: int = DEFAULT_REDIS_DEPTH,
        ttl_s: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        native: bool = True,
    ) -> None:
        self.rt = rt
        self.board = board
        self.store = store
        tcp = store.tcp_address() if native else None
        self.native = NativeBookWrites(tcp) if tcp is not None else None
        self.depth = redis_depth
        self.ttl_s = ttl_s if ttl_s is not None else rt.config.tickers.ttl_s
        self.clock = clock
        self.metrics = BookWriterMetrics(rt)
        self.redis_at = address(rt.redis_url or "")
        self.pending: dict[str, BookView] = {}  # taken, not yet written
        self.written: dict[str, int] = {}  # last update id this writer stored, per symbol
        self.written_at: dict[str, float] = {}  # trio time of the last write per symbol
        self.redis_up: bool | None = None  # None: not known yet
        self._wakeup = trio.Event()
        self._board_conflated = board.conflated
        self._limiter = trio.CapacityLimiter(1)
        self._backoff = Backoff(OUTAGE_BACKOFF_INITIAL_S, OUTAGE_BACKOFF_MAX_S)
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self._ok_at = trio.current_time()
        self._throttle = Throttle(60.0)
        board.on_change(self._wake)

    def _wake(self) -> None:
        self._wakeup.set()

    async def redis_call(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _store_write(self, writes: list[BookWrite]) -> list[WriteResult]:
        if self.native is not None:
            return await self.native.write(writes, _now_ms(), self.ttl_s, self.depth)
        results: list[WriteResult] = await self.redis_call(
            self.store.write, writes, _now_ms(), self.ttl_s, self.depth
        )
        return results

    async def _store_ping(self) -> None:
        if self.native is not None:
            await self.native.ping()
        else:
            await self.redis_call(self.store.ping)

    async def close(self) -> None:
        """Close both clients (the writer's own connection and the store's pool)."""
        with trio.CancelScope(shield=True):
            if self.native is not None:
                await self.native.close()
            await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)

    # -- taking ------------------------------------------------------------------------------

    def take(self) -> None:
        """Move what changed on the board into `pending`, newest per symbol."""
        self._wakeup = trio.Event()
        conflated = self.board.conflated - self._board_conflated
        self._board_conflated = self.board.conflated
        for view in self.board.take():
            if view.symbol in self.pending:
                conflated += 1
            self.pending[view.symbol] = view
        if conflated:
            self.metrics.conflated.inc(conflated)

    def refresh_quiet(self, now: float) -> None:
        """Rewrite books not written for a third of the TTL (same id: only the TTL is renewed),
        so a book that does not change stays readable while this writer runs."""
        due = self.ttl_s / 3
        for symbol, at in self.written_at.items():
            if now - at >= due and symbol not in self.pending:
                view = self.board.latest(symbol)
                if view is not None:
                    self.pending[symbol] = view

    def writes(self) -> list[BookWrite]:
        """The pending views; forced where this writer saw the book go back (a resync), and
        for a symbol's first write of this run (this process's book replaces an earlier run's)."""
        out: list[BookWrite] = []
        for symbol, view in self.pending.items():
            last = self.written.get(symbol)
            out.append(BookWrite(view, force=last is None or view.last_update_id < last))
        return out

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Write until `rt.draining`; then one bounded last write of what is pending."""
        draining = self.rt.draining
        while not draining.is_set():
            if not self.pending and not self.board.pending():
                with trio.move_on_after(REDIS_CHECK_S):
                    await self._wait_change_or_drain()
            self.take()
            self.refresh_quiet(trio.current_time())
            if self.pending:
                if not await self.write_pending():
                    await self._outage_wait()
            elif trio.current_time() - self._ok_at >= REDIS_CHECK_S:
                await self.check_redis()
        self.take()
        if self.pending:
            with trio.move_on_after(DRAIN_WRITE_S):
                await self.write_pending()
            if self.pending:
                log.warning("books.unwritten_on_drain", symbols=len(self.pending))

    async def _wait_change_or_drain(self) -> None:
        async with trio.open_nursery() as nursery:

            async def drained() -> None:
                await self.rt.draining.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(drained)
            await self._wakeup.wait()
            nursery.cancel_scope.cancel()

    async def write_pending(self) -> bool:
        """One pipelined write of every pending view. False: Redis is out of reach."""
        writes = self.writes()
        started = time.perf_counter()
        try:
            results = await self._store_write(writes)
        except StoreUnavailable as exc:
            self._down(exc)
            return False
        acked = self.clock()
        self.metrics.write_s.labels().observe(time.perf_counter() - started)
        self._ok_at = trio.current_time()
        self._up()
        now = trio.current_time()
        for write, result in zip(writes, results, strict=True):
            if result.status is not None:
                self.written_at[write.view.symbol] = now
            self._account(write.view, result, acked)
        self.pending.clear()
        return True

    def _account(self, view: BookView, result: WriteResult, acked: float) -> None:
        m = self.metrics
        if result.status is None:
            m.writes.labels("refused").inc()
            if self._throttle.should_log("refused", trio.current_time()) is not None:
                log.error("books.write_refused", symbol=view.symbol, error=result.error)
            return
        if result.status is WriteStatus.STORED:
            m.writes.labels("stored").inc()
            self.written[view.symbol] = view.last_update_id
            if view.received_at:
                latency = acked - view.received_at
                if 0.0 <= latency < _PLAUSIBLE_LATENCY_S:
                    m.latency.labels(view.symbol).observe(latency)
        elif result.status is WriteStatus.OLDER:
            m.writes.labels("older_than_stored").inc()
            self.written.setdefault(view.symbol, view.last_update_id)
        else:
            m.writes.labels("duplicate").inc()
            self.written.setdefault(view.symbol, view.last_update_id)

    # -- Redis' state ------------------------------------------------------------------------

    async def check_redis(self) -> None:
        try:
            await self._store_ping()
        except StoreUnavailable as exc:
            self._down(exc)
            return
        self._ok_at = trio.current_time()
        self._up()

    def _down(self, exc: BaseException) -> None:
        reason = f"redis unreachable at {self.redis_at}: {error_text(exc)}"[:300]
        self.rt.health.set(COMPONENT, healthy=False, reason=reason)
        self.rt.health.dependency(Dependency.REDIS, up=False, reason=reason)
        if self.redis_up is not False:
            self._outage_since = trio.current_time()
            self._outage_attempts = 0
            self._backoff.reset()
            log.warning(
                "books.redis_down",
                reason=reason,
                pending=len(self.pending),
                detail="books keep being taken (conflated); retrying with backoff",
            )
        self.redis_up = False

    def _up(self) -> None:
        if self.redis_up is not True:
            self.rt.health.set(
                COMPONENT, healthy=True, reason=f"writing books to redis at {self.redis_at}"
            )
            self.rt.health.dependency(
                Dependency.REDIS, up=True, reason=f"answering at {self.redis_at}"
            )
            if self._outage_since is not None:
                log.info(
                    "books.redis_back",
                    down_s=round(trio.current_time() - self._outage_since, 3),
                    attempts=self._outage_attempts,
                )
            self._outage_since = None
        self.redis_up = True

    async def _outage_wait(self) -> None:
        """One backoff step; the board keeps conflating meanwhile (taken on the next pass)."""
        self._outage_attempts += 1
        with trio.move_on_after(self._backoff.delay()):
            await self.rt.draining.wait()


async def run_book_writer(
    rt: Runtime,
    board: BookBoard,
    *,
    redis_depth: int = DEFAULT_REDIS_DEPTH,
    ttl_s: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    native: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Task entry point: started() at once (Redis is a health state); returns on drain.

    `clock` must be the clock of `BookView.received_at` (the keeper's, time.monotonic): the
    update->Redis latency metric. `ttl_s` defaults to the tickers' TTL (tickers.ttl_s).
    `native=False` keeps redis-py in a thread even for a plain TCP store (tests, benchmarks).
    """
    if rt.redis_url is None:
        raise ConfigError("redis.url", "runtime", "the book writer needs Redis; none resolved")
    rt.health.set(COMPONENT, started=True, healthy=False, reason="starting")
    store = BookStore(rt.redis_url, timeout_s=REDIS_TIMEOUT_S, client_name="marketd-books")
    writer = BookWriter(
        rt, board, store, redis_depth=redis_depth, ttl_s=ttl_s, clock=clock, native=native
    )
    try:
        task_status.started()
        log.info(
            "books.writer_started",
            depth=redis_depth,
            ttl_s=writer.ttl_s,
            client="trio" if writer.native is not None else "redis-py",
        )
        await writer.check_redis()
        await writer.run()
    finally:
        await writer.close()
        rt.health.set(COMPONENT, healthy=False, reason="stopped")
