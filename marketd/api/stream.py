"""The push API: Server-Sent Events for tickers and component health (docs/streaming.md).

    GET /api/v1/stream/tickers[?symbols=BTCUSDT,ETHUSDT]   snapshot, then one event per update
    GET /api/v1/stream/health                              component health on every change
    GET /api/v1/stream/book/{symbol}[?depth=N]             snapshot, then one event per stored book

Data flow: the ticker consumer's write script appends every stored update to the Redis stream
`tickers:updates` (marketd/tickers/store.py). One `TickerHub` per API process follows that
stream (XREAD BLOCK in a worker thread: sync redis-py, as everywhere in marketd) and offers each
update to every connected client's `ClientQueue` (marketd/api/fanout.py: conflation, how far
behind); each client's own task writes to its socket. A slow socket therefore blocks only its
own task, and what waits for it is at most one update per symbol. The stream ids are the SSE
`id:`s: a reconnecting EventSource sends `Last-Event-ID` and gets what changed since, or a fresh
snapshot when that id is no longer in the stream (trimmed, or Redis lost its data). Order books
work the same way with a second hub on `books:updates` (the book writer's stream,
marketd/books/store.py); each book client follows one symbol, conflated to its newest book.

Why raw ASGI instead of a Quart route: the hub must be able to end a client whose socket is
full, i.e. cancel a `send` that is blocked; a Quart streaming response runs its generator
outside any scope a handler owns. Mounted in front of the Quart app by `mount()`; every other
path goes to Quart unchanged.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs

import attrs
import msgspec
import trio
from quart_trio import QuartTrio

from marketd.api.book import BadDepth, BookPushed, BookSettings, book_view, parse_depth
from marketd.api.book import settings as book_settings
from marketd.api.fanout import (
    KEEPALIVE,
    ClientQueue,
    Offer,
    Pushed,
    id_key,
    snapshot_data,
    sse_event,
)
from marketd.api.views import BadSymbol, normalise_symbol, ticker_view
from marketd.backoff import Backoff
from marketd.books.store import BookStore
from marketd.errors import StoreUnavailable
from marketd.logs import Throttle, get_logger
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime
from marketd.tickers.store import Snapshot, TickerStore, parse_update_id

log = get_logger(__name__)

T = TypeVar("T")

PREFIX: Final = "/api/v1/stream/"
TICKERS_PATH: Final = "/api/v1/stream/tickers"
HEALTH_PATH: Final = "/api/v1/stream/health"
BOOK_PREFIX: Final = "/api/v1/stream/book/"
BLOCK_MS: Final = 1000  # XREAD BLOCK; the tail client's socket timeout is above it
READ_TIMEOUT_S: Final = 1.0
_encode = msgspec.json.Encoder().encode

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store"),
    (b"x-accel-buffering", b"no"),  # a reverse proxy must not buffer the stream
]


@attrs.frozen
class StreamLimits:
    max_clients: int = 2000  # concurrent streams per process; 503 past it
    max_behind_s: float = 10.0  # a client with an update pending longer than this is dropped
    max_pending: int = 10_000  # without conflation (?conflate=0): queued updates per client
    keepalive_s: float = 15.0
    health_poll_s: float = 0.5
    retry_s: float = 1.0  # a stream waiting for Redis tries again this often (and says so)


class StreamMetrics:
    def __init__(self, m: MetricsFactory) -> None:
        self.clients = m.gauge("stream_clients", "connected SSE clients", ["stream"])
        self.events = m.counter("stream_events_sent", "SSE events written", ["stream"])
        self.conflated = m.counter(
            "stream_conflated", "updates replaced by a newer one before a slow client got them"
        )
        self.dropped = m.counter(
            "stream_dropped_clients", "clients disconnected for being too far behind", ["reason"]
        )
        self.rejected = m.counter("stream_rejected", "streams refused (503: too many clients)")
        self.fanout_s = m.fast_histogram(
            "stream_fanout_seconds", "time to offer one batch of updates to every client"
        )


class Client:
    """One connected ticker stream: its queue, its wake-up, and the scope that ends it."""

    __slots__ = ("dropped", "queue", "quiet_since", "scope", "wakeup")

    def __init__(self, queue: ClientQueue, scope: trio.CancelScope) -> None:
        self.queue = queue
        self.scope = scope
        self.wakeup = trio.Event()
        self.dropped: str | None = None
        self.quiet_since = trio.current_time()  # the last send; the sweep wakes it for keep-alives


class _SnapshotRequest:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Snapshot | None = None
        self.error: Exception | None = None


UpdateStore = TickerStore | BookStore
MakePushed = Callable[[str, str, Mapping[str, str]], Pushed | None]


class TickerHub:
    """Follows `tickers:updates` and fans each update out to every connected client.

    The book hub is one too, on `books:updates` (`stream="book"`, `pushed` makes BookPushed).
    """

    def __init__(
        self,
        tail: UpdateStore,
        reads: UpdateStore,
        metrics: StreamMetrics,
        limits: StreamLimits,
        *,
        tracked: tuple[str, ...] = (),
        stream: str = "tickers",
        source: str = "tickers:updates",
        pushed: MakePushed = Pushed.from_fields,
    ) -> None:
        self._tail = tail
        self._reads = reads
        self.tracked = tracked
        self.stream = stream  # the `stream` label of the client and event metrics
        self.source = source
        self._pushed = pushed
        self.peer: TickerHub | None = None  # the other hub: the client cap is per process
        self._throttle = Throttle(60.0)
        self._snap_waiting: list[_SnapshotRequest] = []
        self._snap_wakeup = trio.Event()
        self._tail_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(2)
        self.metrics = metrics
        self.limits = limits
        self.clients: set[Client] = set()
        self.health_clients = 0
        self.parked = 0  # dropped, but their task still waits in a socket write
        self.closing = trio.Event()
        self.done = trio.Event()
        self._scope = trio.CancelScope()
        self.redis_ok = False
        self.detail = "starting"
        self.since_ms = _now_ms()
        self.updates = 0  # updates read from Redis (tests and benches read it)

    # -- clients ----------------------------------------------------------------------------

    def full(self) -> bool:
        total = len(self.clients) + self.parked + self.health_clients
        if self.peer is not None:
            peer = self.peer
            total += len(peer.clients) + peer.parked + peer.health_clients
        return total >= self.limits.max_clients

    def subscribe(self, queue: ClientQueue, scope: trio.CancelScope) -> Client:
        client = Client(queue, scope)
        self.clients.add(client)
        self.metrics.clients.labels(self.stream).set(len(self.clients))
        return client

    def unsubscribe(self, client: Client) -> None:
        if client.dropped is not None:
            self.parked -= 1
        self.clients.discard(client)
        self.metrics.clients.labels(self.stream).set(len(self.clients))

    def drop(self, client: Client, reason: str) -> None:
        """Disconnect a client that is too far behind, at once for everything we own.

        Hypercorn shields its socket writes from cancellation, so a client whose socket is full
        keeps its task parked in that write until the kernel takes the bytes or the peer goes.
        What matters is settled here: the client leaves the fan-out, its queue is freed, it is
        counted, and its stream ends at the next chance (cancelled scope). Parked ones still
        count towards the stream cap, so they cannot pile up unbounded.
        """
        if client.dropped is None:
            client.dropped = reason
            self.metrics.dropped.labels(reason).inc()
            self.clients.discard(client)
            self.parked += 1
            self.metrics.clients.labels(self.stream).set(len(self.clients))
            client.queue.take()
            client.scope.cancel()

    async def snapshot(self) -> Snapshot:
        """Every tracked hash and the last update id, read at or after this call.

        Concurrent callers share one read (a thousand clients reconnecting after a restart cost
        one MULTI, not a thousand): whoever arrives while a read is in flight waits for the next.
        """
        request = _SnapshotRequest()
        self._snap_waiting.append(request)
        self._snap_wakeup.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    async def _snapshots(self) -> None:
        while True:
            await self._snap_wakeup.wait()
            self._snap_wakeup = trio.Event()
            batch, self._snap_waiting = self._snap_waiting, []
            if not batch:
                continue
            try:
                result: Snapshot | None = await self.read(self._reads.snapshot, self.tracked)
                error: Exception | None = None
            except (StoreUnavailable, trio.TooSlowError) as exc:
                result, error = None, exc
            for request in batch:
                request.result, request.error = result, error
                request.done.set()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A snapshot/resume read in a worker thread, bounded by READ_TIMEOUT_S * 2."""
        with trio.fail_after(READ_TIMEOUT_S * 2):
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args), limiter=self._read_limiter
            )

    # -- the tail ---------------------------------------------------------------------------

    def _set_redis(self, ok: bool, detail: str) -> None:
        if ok != self.redis_ok or detail != self.detail:
            self.redis_ok, self.detail, self.since_ms = ok, detail, _now_ms()
            if not ok:
                log.warning("stream.redis_unavailable", detail=detail)
            else:
                log.info("stream.redis_available")

    def offer(self, updates: list[Pushed]) -> None:
        t0 = time.perf_counter()
        now = trio.current_time()
        conflated = 0
        for client in tuple(self.clients):
            queue = client.queue
            woke = False
            for update in updates:
                outcome = queue.offer(update, now)
                if outcome is Offer.FILTERED:
                    continue
                if outcome is Offer.BEHIND or outcome is Offer.OVERFLOW:
                    self.drop(client, outcome.value)
                    break
                woke = True
                if outcome is Offer.CONFLATED:
                    conflated += 1
            if woke:
                client.wakeup.set()
        if conflated:
            self.metrics.conflated.inc(conflated)
        self.metrics.fanout_s.labels().observe(time.perf_counter() - t0)

    def _resync_all(self) -> None:
        for client in self.clients:
            client.queue.resync = True
            client.wakeup.set()

    async def _follow(self) -> None:
        backoff = Backoff(0.2, 5.0)
        cursor: str | None = None
        while True:
            try:
                if cursor is None:
                    cursor = await trio.to_thread.run_sync(
                        self._tail.last_update_id, limiter=self._tail_limiter
                    )
                    # At start there is nobody to tell; after an outage, every client may
                    # have missed updates: each gets a fresh snapshot, never a silent gap.
                    self._resync_all()
                    self._set_redis(True, f"following {self.source}")
                    backoff.reset()
                batch = await trio.to_thread.run_sync(
                    self._tail.wait_updates, cursor, BLOCK_MS, limiter=self._tail_limiter
                )
            except StoreUnavailable as exc:
                self._set_redis(False, f"redis unavailable: {exc}"[:300])
                cursor = None
                self._resync_all()
                await trio.sleep(backoff.delay())
                continue
            if not batch:
                continue
            cursor = batch[-1].id
            self.updates += len(batch)
            if self.clients:  # nobody to tell: a client that comes reads its own snapshot
                self.offer(self._updates(batch))

    def _updates(self, batch: list[Any]) -> list[Pushed]:
        out: list[Pushed] = []
        for u in batch:
            update = self._pushed(u.id, u.symbol, u.fields) if u.symbol else None
            if update is not None:
                out.append(update)
                continue
            if self._throttle.should_log("unreadable", trio.current_time()) is not None:
                log.error("stream.unreadable_update", source=self.source, id=u.id, symbol=u.symbol)
        return out

    async def _sweep(self) -> None:
        """Once a second (or per keep-alive interval, if shorter): drop clients behind for too
        long even when no update arrives, and wake the quiet ones to send a keep-alive. (The
        keep-alive is the sweep's job, not a timeout around each client's wait: a cancel scope
        per pushed event was ~5 % of the process's CPU with 1,000 clients, bench/stream.py.)"""
        period = min(1.0, self.limits.keepalive_s)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for client in tuple(self.clients):
                if client.queue.behind_s(now) > self.limits.max_behind_s:
                    self.drop(client, "behind")
                elif now - client.quiet_since >= self.limits.keepalive_s:
                    client.wakeup.set()

    async def run(
        self, draining: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._follow)
                    nursery.start_soon(self._sweep)
                    nursery.start_soon(self._snapshots)
                    task_status.started()
                    await draining.wait()
                    self.close()
        finally:
            self.done.set()

    def close(self) -> None:
        """Streams end (the daemon drains, or the app stops serving); so does `run`."""
        self.closing.set()
        for client in tuple(self.clients):
            client.scope.cancel()
        self._scope.cancel()


async def _serve_client(
    hub: TickerHub,
    queue: ClientQueue,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    *,
    resume: Callable[[Client, str], Awaitable[int]],
    resync: Callable[[Client], Awaitable[None]],
    push: Callable[[Client], Awaitable[None]],
) -> None:
    """One stream client from its 200 to its end (the same for tickers and books): subscribed
    before anything is read, so nothing stored meanwhile is missed; then what changed after its
    Last-Event-ID (`resume`: events sent, -1 when that id is no longer known) or a fresh
    snapshot (`resync`); then every update (`push`) until it disconnects or is dropped."""
    last_event_id = _header(scope, b"last-event-id")
    resumable = last_event_id is not None and parse_update_id(last_event_id) is not None
    async with trio.open_nursery() as nursery:
        client = hub.subscribe(queue, nursery.cancel_scope)
        try:
            nursery.start_soon(_wait_disconnect, receive, nursery.cancel_scope)
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                nursery.cancel_scope.cancel()
                return
            sent = await resume(client, last_event_id) if last_event_id and resumable else -1
            if sent < 0:
                await resync(client)
            await push(client)
        finally:
            hub.unsubscribe(client)
            nursery.cancel_scope.cancel()


async def _accepting(hub: TickerHub | None, send: Send) -> TickerHub | None:
    """The hub, if it can take one more client; else None, after answering 503 (the stream
    is not running, or at its client cap)."""
    if hub is None or hub.closing.is_set():
        body = {"error": "unavailable", "detail": "the stream is not running"}
    elif hub.full():
        hub.metrics.rejected.inc()
        body = {"error": "too_many_streams", "detail": "try again later"}
    else:
        return hub
    await _json_response(send, 503, body)
    return None


async def _push_updates(
    hub: TickerHub,
    client: Client,
    send: Send,
    *,
    resync: Callable[[], Awaitable[None]],
    render: Callable[[list[Pushed], int], bytes],
) -> None:
    """A client's own task, for ever: on each wake-up, a fresh snapshot when its queue asks for
    one, else what is pending rendered as events (one write), or a keep-alive comment."""
    events = hub.metrics.events.labels(hub.stream)
    while True:
        await client.wakeup.wait()  # an update, a resync, or the sweep's keep-alive call
        client.wakeup = trio.Event()
        if client.queue.resync:
            await resync()
            continue
        updates = client.queue.take()
        if not updates:
            body = KEEPALIVE
        else:
            body = render(updates, _now_ms())
            events.inc(len(updates))
        await send({"type": "http.response.body", "body": body, "more_body": True})
        client.quiet_since = trio.current_time()


async def _snapshot_when_redis_answers(
    hub: TickerHub, read: Callable[[], Awaitable[Snapshot]], send: Send
) -> tuple[Snapshot, bool]:
    """`read()` until Redis answers; the client gets one `status` event (redis false) while it
    does not. Returns the snapshot and whether that event was sent (then a `status` ok follows)."""
    told = False
    while True:
        try:
            return await read(), told
        except (StoreUnavailable, trio.TooSlowError) as exc:
            detail = str(exc) or "redis did not answer"
        if not told:
            body = _encode({"redis": False, "detail": f"redis unavailable: {detail}"[:300]})
            event = sse_event("status", body)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            told = True
        await trio.sleep(hub.limits.retry_s)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- HTTP ---------------------------------------------------------------------------------------

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def _json_response(send: Send, status: int, body: dict[str, Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _encode(body)})


async def _wait_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """The client went away (or sent a body we ignore until it goes): end its stream."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class _Refused(Exception):
    """A stream request answered with a JSON error instead of a stream."""

    def __init__(self, status: int, **body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class StreamApp:
    """ASGI: the three stream paths; everything else goes to `app` (Quart)."""

    def __init__(
        self,
        app: Any,
        rt: Runtime,
        hub: TickerHub | None,
        tracked: tuple[str, ...],
        *,
        book_hub: TickerHub | None = None,
        books: BookSettings | None = None,
    ) -> None:
        self.app = app
        self.rt = rt
        self.hub = hub
        self.tracked = tracked
        self.tracked_set = frozenset(tracked)
        self.book_hub = book_hub
        self.books = books or BookSettings(())
        self.book_symbols = frozenset(self.books.symbols)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _json_response(
                send, 405, {"error": "method_not_allowed", "detail": "streams are GET only"}
            )
            return
        if path == TICKERS_PATH:
            await self._tickers(scope, receive, send)
        elif path == HEALTH_PATH:
            await self._health(scope, receive, send)
        elif path.startswith(BOOK_PREFIX):
            await self._book(scope, receive, send)
        else:
            await _json_response(send, 404, {"error": "not_found", "detail": "no such stream"})

    # -- tickers ----------------------------------------------------------------------------

    def _symbols(self, scope: dict[str, Any]) -> tuple[str, ...] | dict[str, Any]:
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        raw = ",".join(query.get("symbols", []))
        if not raw.strip():
            return self.tracked
        out: list[str] = []
        for part in raw.split(","):
            if not part.strip():
                continue
            try:
                name = normalise_symbol(part.strip())
            except BadSymbol:
                return {
                    "error": "invalid_symbol",
                    "detail": "a symbol is 2 to 30 letters or digits",
                }
            if name not in self.tracked_set:
                return {"error": "unknown_symbol", "detail": "not tracked", "symbol": name}
            out.append(name)
        return tuple(dict.fromkeys(out))

    async def _tickers(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        hub = self.hub
        symbols = self._symbols(scope)
        if isinstance(symbols, dict):
            await _json_response(send, 400, symbols)
            return
        hub = await _accepting(hub, send)
        if hub is None:
            return
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        conflate = query.get("conflate", ["1"])[-1] not in ("0", "false", "no")
        follow = None if set(symbols) == self.tracked_set else frozenset(symbols)
        queue = ClientQueue(
            follow,
            conflate=conflate,
            max_pending=hub.limits.max_pending,
            max_behind_s=hub.limits.max_behind_s,
            # Queue from now on; the snapshot or resume point then drops what it covers.
        )
        await _serve_client(
            hub,
            queue,
            scope,
            receive,
            send,
            resume=lambda client, after: self._resume(client, symbols, after, send),
            resync=lambda client: self._resync(client, symbols, send),
            push=lambda client: self._push(client, symbols, send),
        )

    async def _resume(
        self, client: Client, symbols: tuple[str, ...], after_id: str, send: Send
    ) -> int:
        """What changed after `after_id`: events sent, or -1 when that id is not known."""
        assert self.hub is not None
        follow = client.queue.symbols
        try:
            changes = await self.hub.read(self.hub._reads.changes_since, after_id, follow)
        except (StoreUnavailable, trio.TooSlowError):
            return -1
        if not changes.known:
            return -1
        client.queue.reset(id_key(changes.last_id))
        if changes.latest:
            now = _now_ms()
            chunk = b"".join(
                Pushed.from_fields(u.id, u.symbol, u.fields).event(now) for u in changes.latest
            )
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.hub.metrics.events.labels("tickers").inc(len(changes.latest))
        return len(changes.latest)

    async def _resync(self, client: Client, symbols: tuple[str, ...], send: Send) -> None:
        """A fresh snapshot; while Redis cannot give one, a `status` event and retries."""
        hub = self.hub
        assert hub is not None
        snap, told = await _snapshot_when_redis_answers(hub, hub.snapshot, send)
        now = _now_ms()
        views: list[dict[str, Any]] = []
        missing: list[str] = []
        by_symbol = dict(zip(hub.tracked, snap.rows, strict=True))
        for symbol in symbols:
            view = ticker_view(symbol, by_symbol.get(symbol, {}), now)
            if view is None:
                missing.append(symbol)
            else:
                views.append(view)
        client.queue.reset(id_key(snap.last_id))
        chunk = b""
        if told:
            chunk = sse_event("status", _encode({"redis": True, "detail": "ok"}))
        chunk += sse_event("snapshot", snapshot_data(views, missing), snap.last_id)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        hub.metrics.events.labels("tickers").inc()

    async def _push(self, client: Client, symbols: tuple[str, ...], send: Send) -> None:
        assert self.hub is not None
        await _push_updates(
            self.hub,
            client,
            send,
            resync=lambda: self._resync(client, symbols, send),
            render=lambda updates, now: b"".join(u.event(now) for u in updates),
        )

    # -- order books ------------------------------------------------------------------------

    def _book_request(self, scope: dict[str, Any]) -> tuple[str, int | None]:
        """(symbol, depth) of a book stream request; _Refused with the answer otherwise."""
        raw = scope["path"][len(BOOK_PREFIX) :]
        try:
            symbol = normalise_symbol(raw)
        except BadSymbol:
            raise _Refused(
                400,
                error="invalid_symbol",
                detail="a symbol is 2 to 30 letters or digits",
                symbol=raw[:64],
            ) from None
        if symbol not in self.book_symbols:
            raise _Refused(
                404,
                error="unknown_symbol",
                detail="no order book is kept for this symbol",
                symbol=symbol,
            )
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        raw_depth = query["depth"][-1] if "depth" in query else None
        try:
            return symbol, parse_depth(raw_depth, self.books.redis_depth)
        except BadDepth:
            raise _Refused(
                400,
                error="invalid_depth",
                detail=f"depth is an integer from 1 to {self.books.redis_depth}",
                depth=str(raw_depth)[:32],
            ) from None

    async def _book(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """One symbol's book: a `snapshot`, then a `book` event per stored update (conflated
        to the newest while the client is behind), resumable with Last-Event-ID."""
        hub = self.book_hub
        try:
            symbol, depth = self._book_request(scope)
        except _Refused as refused:
            await _json_response(send, refused.status, refused.body)
            return
        hub = await _accepting(hub, send)
        if hub is None:
            return
        queue = ClientQueue(
            frozenset((symbol,)),
            max_pending=hub.limits.max_pending,
            max_behind_s=hub.limits.max_behind_s,
        )
        await _serve_client(
            hub,
            queue,
            scope,
            receive,
            send,
            resume=lambda client, after: self._book_resume(client, symbol, depth, after, send),
            resync=lambda client: self._book_resync(client, symbol, depth, send),
            push=lambda client: self._book_push(client, symbol, depth, send),
        )

    async def _book_resume(
        self, client: Client, symbol: str, depth: int | None, after_id: str, send: Send
    ) -> int:
        """The newest book stored after `after_id`: events sent, or -1 when the id is unknown."""
        hub = self.book_hub
        assert hub is not None
        try:
            changes = await hub.read(hub._reads.changes_since, after_id, client.queue.symbols)
        except (StoreUnavailable, trio.TooSlowError):
            return -1
        if not changes.known:
            return -1
        updates = [BookPushed.from_book_fields(u.id, u.symbol, u.fields) for u in changes.latest]
        client.queue.reset(id_key(changes.last_id))
        now = _now_ms()
        chunk = b"".join(u.book_event(now, depth) for u in updates if u is not None)
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            hub.metrics.events.labels(hub.stream).inc(len(changes.latest))
        return len(changes.latest)

    async def _book_resync(
        self, client: Client, symbol: str, depth: int | None, send: Send
    ) -> None:
        """A fresh `snapshot` of the book; while Redis cannot give one, a `status` event."""
        hub = self.book_hub
        assert hub is not None
        snap, told = await _snapshot_when_redis_answers(
            hub, lambda: hub.read(hub._reads.snapshot, (symbol,)), send
        )
        try:
            view = book_view(symbol, snap.rows[0], _now_ms(), depth)
        except ValueError:  # CorruptBook: shown as no book, logged by the next update
            view = None
        client.queue.reset(id_key(snap.last_id))
        chunk = b""
        if told:
            chunk = sse_event("status", _encode({"redis": True, "detail": "ok"}))
        data = _encode({"symbol": symbol, "book": view})
        chunk += sse_event("snapshot", data, snap.last_id)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        hub.metrics.events.labels(hub.stream).inc()

    async def _book_push(self, client: Client, symbol: str, depth: int | None, send: Send) -> None:
        assert self.book_hub is not None
        await _push_updates(
            self.book_hub,
            client,
            send,
            resync=lambda: self._book_resync(client, symbol, depth, send),
            render=lambda updates, now: b"".join(
                u.book_event(now, depth) if isinstance(u, BookPushed) else u.event(now)
                for u in updates
            ),
        )

    # -- health -----------------------------------------------------------------------------

    async def _health(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        hub = self.hub
        if hub is not None and hub.full():
            hub.metrics.rejected.inc()
            await _json_response(
                send, 503, {"error": "too_many_streams", "detail": "try again later"}
            )
            return
        limits = hub.limits if hub is not None else StreamLimits()
        if hub is not None:
            hub.health_clients += 1
            hub.metrics.clients.labels("health").set(hub.health_clients)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_disconnect, receive, nursery.cancel_scope)
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                if scope["method"] == "HEAD":
                    await send({"type": "http.response.body", "body": b""})
                    nursery.cancel_scope.cancel()
                    return
                previous = b""
                seq = 0
                quiet_since = trio.current_time()
                closing = hub.closing if hub is not None else trio.Event()
                while not closing.is_set():
                    current = _encode(health_state(self.rt, hub))
                    if current != previous:
                        seq += 1
                        body = sse_event("health", current, str(seq))
                        previous = current
                        quiet_since = trio.current_time()
                    elif trio.current_time() - quiet_since >= limits.keepalive_s:
                        body = KEEPALIVE
                        quiet_since = trio.current_time()
                    else:
                        body = b""
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                        if hub is not None:
                            hub.metrics.events.labels("health").inc()
                    with trio.move_on_after(limits.health_poll_s):
                        await closing.wait()
                nursery.cancel_scope.cancel()
        finally:
            if hub is not None:
                hub.health_clients -= 1
                hub.metrics.clients.labels("health").set(hub.health_clients)


def health_state(rt: Runtime, hub: TickerHub | None) -> dict[str, Any]:
    """Every component's health record as JSON, plus the push stream's own view of Redis.

    Each record's own `view()` (what /readyz shows: healthy, reason, since), so the page and
    /readyz agree; the dependencies (Redis, Kafka, Binance, ...) with their reachability.
    """
    enabled = rt.config.components.enabled()
    components: dict[str, Any] = {}
    for name in (*enabled, *sorted(set(rt.health.components) - set(enabled))):
        record = rt.health.components.get(name)
        if record is None:
            components[name] = {"started": False, "healthy": False, "detail": "not started"}
        elif hasattr(record, "view"):
            components[name] = record.view()
        elif attrs.has(type(record)):
            components[name] = attrs.asdict(record)
        else:
            components[name] = {"healthy": bool(getattr(record, "healthy", False))}
    dependencies: dict[str, Any] = {}
    for name, state in sorted(getattr(rt.health, "dependencies", {}).items()):
        dependencies[name] = state.view() if hasattr(state, "view") else attrs.asdict(state)
    push: dict[str, Any] = {"redis": False, "detail": "no Redis configured", "clients": 0}
    if hub is not None:
        push = {
            "redis": hub.redis_ok,
            "detail": hub.detail,
            "since_ms": hub.since_ms,
            "clients": len(hub.clients),
        }
    return {"components": components, "dependencies": dependencies, "stream": push}


def mount(
    app: QuartTrio,
    rt: Runtime,
    tracked: tuple[str, ...],
    books: BookSettings | None = None,
) -> StreamApp:
    """Wrap the Quart app's ASGI callable; the hubs run while the app serves.

    Without a Redis URL (tests with a stub reader) the streams answer 503. The book hub runs
    only when books are kept (`books.symbols`; default: marketd/api/book.py `settings`).
    """
    limits = StreamLimits()
    books = books if books is not None else book_settings(rt)
    hub: TickerHub | None = None
    book_hub: TickerHub | None = None
    if rt.redis_url is not None and books.symbols:
        book_hub = TickerHub(
            BookStore(
                rt.redis_url,
                timeout_s=BLOCK_MS / 1000 + 2.0,
                client_name="marketd-api-book-stream",
                max_connections=1,
            ),
            BookStore(
                rt.redis_url,
                timeout_s=READ_TIMEOUT_S,
                client_name="marketd-api-book-stream-reads",
                max_connections=2,
            ),
            StreamMetrics(rt.metrics),
            limits,
            tracked=books.symbols,
            stream="book",
            source="books:updates",
            pushed=BookPushed.from_book_fields,
        )
    if rt.redis_url is not None:
        tail = TickerStore(
            rt.redis_url,
            timeout_s=BLOCK_MS / 1000 + 2.0,
            client_name="marketd-api-stream",
            max_connections=1,
        )
        reads = TickerStore(
            rt.redis_url,
            timeout_s=READ_TIMEOUT_S,
            client_name="marketd-api-stream-reads",
            max_connections=2,
        )
        hub = TickerHub(tail, reads, StreamMetrics(rt.metrics), limits, tracked=tracked)
        if book_hub is not None:
            hub.peer, book_hub.peer = book_hub, hub
    hubs = tuple(h for h in (hub, book_hub) if h is not None)

    @app.before_serving
    async def _start_hub() -> None:
        for the_hub in hubs:
            await app.nursery.start(the_hub.run, rt.draining)

    @app.after_serving
    async def _stop_hub() -> None:
        for the_hub in hubs:
            the_hub.close()
        with trio.CancelScope(shield=True):
            for the_hub in hubs:
                with trio.move_on_after(BLOCK_MS / 1000 + 3.0):
                    await the_hub.done.wait()  # its XREAD thread returns within BLOCK_MS
                for store in (the_hub._tail, the_hub._reads):
                    await trio.to_thread.run_sync(store.close)

    return StreamApp(app.asgi_app, rt, hub, tracked, book_hub=book_hub, books=books)
