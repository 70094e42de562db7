"""WebSocket source: one task per connection, reading frames and taking them through the ingest.

Each connection subscribes to its streams through the combined-stream URL, keeps itself alive
(our pings, silence watchdog per stream kind), reconnects with capped full-jitter backoff under a
shared connection-attempt budget. Its task takes every frame trio-websocket has parsed (one
`get_message()`, then what is already buffered, without another wake-up), hands the chunk to its
`FrameIntake` (decode, tape keeper, Kafka: marketd/ingest/intake.py) synchronously and waits only
when the sink is full, bounded by `binance.backpressure_close_s` (a reader that stops reading stops
answering Binance's pings). On shutdown it stops reading; a chunk received is always taken by the
intake before the next await: nothing received is dropped.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import trio
import trio_websocket
from prometheus_client import Counter, Gauge
from trio_websocket import ConnectionClosed, ConnectionRejected, ConnectionTimeout, HandshakeError

from marketd.backoff import Backoff
from marketd.config import BinanceConfig, RotationConfig
from marketd.errors import ConnectionLost
from marketd.ingest.limits import TokenBucket
from marketd.ingest.streams import StreamSpec
from marketd.ingest.tape import Reconnected
from marketd.logs import get_logger
from marketd.metrics import FastCounter, MetricsFactory

log = get_logger(__name__)

# Messages trio-websocket's reader task may parse ahead of ours (its `message_queue_size`). While
# our task works on a chunk or sleeps to coalesce, the reader goes on parsing into this queue; our
# task then takes all of it in one wake-up. Bounded: when it is full the reader stops reading the
# socket (TCP backpressure). 256 frames is > 4 ms of the fastest stream set measured here
# (docs/performance.md §7); 1 (the old value) forced one scheduler round per message.
WS_QUEUE_FRAMES = 256
# A chunk with at least this many frames means frames arrive faster than they are taken one by
# one: the task then waits `ingest.coalesce_ms` before reading again (docs/performance.md §7).
COALESCE_WHEN_BACKLOG = 2
# trio-websocket refuses larger messages by closing with 1009; keep that well above the
# decoder's own limit so oversized frames normally reach the decoder and are dead-lettered.
WS_HARD_LIMIT_FACTOR = 4
# Close codes (RFC 6455) and what we count them as.
_CLOSE_REASONS = {
    1000: "normal",
    1001: "going_away",
    1006: "abnormal",
    1007: "invalid_utf8",
    1008: "policy",
    1009: "too_big",
    1011: "server_error",
}


class FrameIntake(Protocol):
    """What a connection hands its frames to (marketd/ingest/intake.py `TapeIntake`)."""

    def take(self, messages: Sequence[str | bytes], recv_ns: int, conn: int) -> None: ...
    def on_reconnect(self, notice: Reconnected) -> None: ...
    def settle_now(self) -> bool: ...
    async def settle(self) -> None: ...


def buffered_messages(ws: trio_websocket.WebSocketConnection) -> Callable[[], str | bytes]:
    """`receive_nowait` of the queue trio-websocket's reader task fills and `get_message()`
    awaits: what the reader already parsed, without a scheduler round per message (raises
    trio.WouldBlock when empty, trio.EndOfChannel once the connection closed).

    trio-websocket 0.12 has no public non-blocking receive; `_recv_channel` is private. If a
    release renames it, tests/ingest/test_source.py fails (and here we would raise
    AttributeError at connect, never lose a frame).
    """
    channel: trio.MemoryReceiveChannel[str | bytes] = ws._recv_channel
    return channel.receive_nowait


def stream_url(base: str, streams: Sequence[StreamSpec], time_unit: str) -> str:
    """The combined-stream URL: <base>/stream?streams=a/b/c (names percent-encoded)."""
    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")] + "/stream"  # we always use combined streams (API-NOTES §7.6)
    elif not path.endswith("/stream"):
        path = path + "/stream"
    # Non-ASCII symbols must be percent-encoded (API-NOTES §1); '+' too, so that the kline
    # timezone suffix @+08:00 is not read as a space by a form decoder.
    names = "/".join(quote(s.name, safe="@_!:.-~") for s in streams)
    query = f"streams={names}"
    if time_unit == "MICROSECOND":
        query += "&timeUnit=MICROSECOND"
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


@attrs.define
class SourceMetrics:
    frames: FastCounter
    reconnects: Counter
    connected: Gauge
    last_frame: Gauge
    rotations: Counter

    @classmethod
    def create(cls, metrics: MetricsFactory) -> SourceMetrics:
        return cls(
            metrics.fast_counter("ws_frames_received", "frames received per connection", "conn"),
            metrics.counter("ws_reconnects", "disconnects by reason", ["conn", "reason"]),
            metrics.gauge("ws_connected", "1 while the connection is up", ["conn"]),
            metrics.gauge(
                "ws_last_frame_timestamp_seconds", "wall time of the last frame", ["conn"]
            ),
            metrics.counter("ws_rotations", "seamless connection replacements", ["conn", "reason"]),
        )


@attrs.define
class ConnectionState:
    """Shared between a connection's reader, its watchdogs and the ingest health watch."""

    last_frame_ns: int = 0  # wall clock of the last frame: silence watchdog and metric
    open: bool = False  # a socket of this connection is open now
    silence_limit_s: float = math.inf  # for its stream kinds (silence_limit)
    # Why the last socket ended (or never opened): "connect_failed: ConnectionRefusedError: ...".
    last_error: str | None = None


def silence_limit(cfg: BinanceConfig, streams: Sequence[StreamSpec]) -> float:
    """Longest a connection may go without any frame: the shortest limit among its stream kinds.

    Kinds with 0 (trades of a quiet symbol) never make a connection look dead; pings cover them.
    """
    limits = [cfg.silence_timeout_s.get(s.kind.value, 0.0) for s in streams]
    positive = [x for x in limits if x > 0]
    return min(positive) if positive else math.inf


async def run_connection(
    conn_id: int,
    streams: Sequence[StreamSpec],
    cfg: BinanceConfig,
    rotation: RotationConfig,
    intake: FrameIntake,
    attempts: TokenBucket,
    metrics: SourceMetrics,
    stop: trio.Event,
    state: ConnectionState | None = None,
    *,
    coalesce_s: float = 0.0,
) -> None:
    """Keep one connection up until `stop` is set; reconnect on any failure. `state` (when
    given) is kept up to date for the health watch. `coalesce_s`: see COALESCE_WHEN_BACKLOG."""
    url = stream_url(cfg.ws_url, streams, cfg.time_unit)
    backoff = Backoff(cfg.reconnect_initial_delay_s, cfg.reconnect_max_delay_s)
    conn = str(conn_id)
    state = state or ConnectionState()
    state.silence_limit_s = silence_limit(cfg, streams)
    metrics.last_frame.labels(conn).set_function(lambda: state.last_frame_ns / 1e9)
    lost_before = False
    while not stop.is_set():
        await attempts.take()
        link = _Link(conn_id, url, streams, cfg, rotation, intake, attempts, metrics, stop, state)
        link.coalesce_s = coalesce_s
        # After a loss, the new connection first tells the tape keeper (before its first frame)
        # that its streams may have a hole, so the keeper checks the next ids at once.
        link.notify_reconnect = lost_before
        lost_before = True
        try:
            await link.run()
            reason, detail = "shutdown", ""
        except ConnectionLost as exc:
            reason, detail = exc.reason, exc.detail
        finally:
            metrics.connected.labels(conn).set(0)
            state.open = False
        if stop.is_set():
            break
        state.last_error = f"{reason}: {detail}" if detail else reason
        metrics.reconnects.labels(conn, reason).inc()
        up_since = link.connected_at
        if up_since is not None and trio.current_time() - up_since >= cfg.healthy_after_s:
            backoff.reset()
        delay = backoff.delay()
        log.warning(
            "ws.disconnected",
            conn=conn_id,
            reason=reason,
            detail=detail[:300],
            reconnect_in_s=round(delay, 3),
            attempt=backoff.attempt,
        )
        with trio.move_on_after(delay):
            await stop.wait()


@attrs.define(eq=False)
class _Socket:
    """One open WebSocket of a link; two overlap while a link rotates."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    opened_at: float = 0.0
    retiring: bool = False  # replaced or announced shutdown: its end is expected
    shutdown_announced: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    lost: ConnectionLost | None = None


class _Link:
    """A connection's streams, carried by one socket at a time, rotated without a gap.

    Before Binance's 24-hour disconnect (max_age_s plus jitter, so shards do not rotate together)
    and at once on a `serverShutdown` event, a replacement socket is opened first; the old one is
    closed only after the replacement has delivered a frame. Frames of the overlap arrive twice;
    the tape keeper drops the duplicates (by trade id, kline identity and ticker event time).
    """

    def __init__(
        self,
        conn_id: int,
        url: str,
        streams: Sequence[StreamSpec],
        cfg: BinanceConfig,
        rotation: RotationConfig,
        intake: FrameIntake,
        attempts: TokenBucket,
        metrics: SourceMetrics,
        stop: trio.Event,
        state: ConnectionState,
    ) -> None:
        self.conn_id = conn_id
        self.url = url
        self.streams = streams
        self.cfg = cfg
        self.rotation = rotation
        self.intake = intake
        self.attempts = attempts
        self.metrics = metrics
        self.stop = stop
        self.state = state
        self.connected_at: float | None = None
        self.rotations = 0
        self.notify_reconnect = False
        self.coalesce_s = 0.0

    async def run(self) -> None:
        """Returns when `stop` is set; raises ConnectionLost when the link is lost."""
        try:
            async with trio.open_nursery() as nursery:
                current = await nursery.start(self._socket, False)
                self.connected_at = current.opened_at
                self.state.last_frame_ns = max(self.state.last_frame_ns, time.time_ns())
                limit = silence_limit(self.cfg, self.streams)
                if limit != math.inf:
                    nursery.start_soon(_silence_watchdog, self.state, limit)
                due = (
                    current.opened_at
                    + self.rotation.max_age_s
                    + random.uniform(0, self.rotation.jitter_s)
                )
                while True:
                    with trio.move_on_at(due):
                        await _first_of(self.stop, current.shutdown_announced, current.closed)
                    if self.stop.is_set():
                        current.scope.cancel()
                        break
                    if current.closed.is_set():
                        raise current.lost or ConnectionLost("closed", "socket ended")
                    reason = "server_shutdown" if current.shutdown_announced.is_set() else "max_age"
                    if reason == "server_shutdown":
                        current.retiring = True  # Binance will close it: not a failure
                    replacement = await self._replace(nursery, reason)
                    if replacement is None:
                        due = trio.current_time() + 30.0  # try again; the old socket still runs
                        continue
                    current.retiring = True
                    current.scope.cancel()
                    current = replacement
                    due = (
                        current.opened_at
                        + self.rotation.max_age_s
                        + random.uniform(0, self.rotation.jitter_s)
                    )
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _connection_lost(group, self.connected_at) from group

    async def _replace(self, nursery: trio.Nursery, reason: str) -> _Socket | None:
        log.info("ws.rotating", conn=self.conn_id, reason=reason)
        await self.attempts.take()
        try:
            with trio.fail_after(self.rotation.overlap_timeout_s):
                replacement: _Socket = await nursery.start(self._socket, True)
        except (ConnectionLost, trio.TooSlowError, OSError, HandshakeError) as exc:
            log.warning(
                "ws.rotation_failed",
                conn=self.conn_id,
                reason=reason,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
        self.rotations += 1
        self.metrics.rotations.labels(str(self.conn_id), reason).inc()
        log.info("ws.rotated", conn=self.conn_id, reason=reason, rotations=self.rotations)
        return replacement

    async def _socket(
        self, wait_first_frame: bool, *, task_status: trio.TaskStatus[_Socket]
    ) -> None:
        """Open, read until cancelled or lost. Reports started on connect (or first frame)."""
        sock = _Socket()
        cfg = self.cfg
        ssl_context = ssl.create_default_context() if self.url.startswith("wss:") else None
        try:
            async with trio_websocket.open_websocket_url(
                self.url,
                ssl_context=ssl_context,
                max_message_size=max(cfg.max_frame_bytes * WS_HARD_LIMIT_FACTOR, 8 << 20),
                message_queue_size=WS_QUEUE_FRAMES,
                connect_timeout=cfg.connection_timeout_s,
                disconnect_timeout=2,
            ) as ws:
                sock.opened_at = trio.current_time()
                self.metrics.connected.labels(str(self.conn_id)).set(1)
                self.state.open = True
                self.state.last_error = None
                log.info(
                    "ws.connected",
                    conn=self.conn_id,
                    streams=len(self.streams),
                    url=_redact(self.url),
                )
                if self.notify_reconnect:
                    self.notify_reconnect = False
                    self.intake.on_reconnect(Reconnected(self.conn_id, tuple(self.streams)))
                if not wait_first_frame:
                    task_status.started(sock)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_keepalive, ws, cfg)
                    with sock.scope:
                        await _read(
                            self.conn_id,
                            ws,
                            self.intake,
                            self.state,
                            self.metrics,
                            cfg,
                            sock,
                            task_status if wait_first_frame else None,
                            self.coalesce_s,
                        )
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            sock.lost = _connection_lost(group, sock.opened_at or None)
        except (
            ConnectionLost,
            ConnectionClosed,
            HandshakeError,
            trio.TooSlowError,
            OSError,
        ) as exc:
            sock.lost = _connection_lost(exc, sock.opened_at or None)
        finally:
            sock.closed.set()
        if sock.lost is not None and not sock.retiring:
            raise sock.lost


async def _first_of(*events: trio.Event) -> None:
    """Return as soon as any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(e: trio.Event = event) -> None:
                await e.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def _connection_lost(exc: BaseException, connected_at: float | None) -> ConnectionLost:
    """Map whatever ended a connection (possibly inside exception groups) to ConnectionLost."""
    if isinstance(exc, BaseExceptionGroup):
        for leaf in _leaves(exc):
            if isinstance(
                leaf,
                ConnectionLost | ConnectionClosed | HandshakeError | OSError | trio.TooSlowError,
            ):
                return _connection_lost(leaf, connected_at)
        raise exc  # not a connection problem: let the supervisor see it
    if isinstance(exc, ConnectionLost):
        exc.connected_at = exc.connected_at or connected_at
        return exc
    if isinstance(exc, ConnectionClosed):
        code = exc.reason.code if exc.reason else None
        text = exc.reason.reason if exc.reason else ""
        return ConnectionLost(
            _CLOSE_REASONS.get(code or 0, f"closed_{code}"),
            f"code={code} {text or ''}".strip(),
            connected_at,
        )
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"")[:120].decode("utf-8", "replace")
        return ConnectionLost(
            "handshake_rejected", f"HTTP {exc.status_code} {body}".strip(), connected_at
        )
    if isinstance(exc, ConnectionTimeout | trio.TooSlowError):
        return ConnectionLost("connect_timeout", "no handshake in time", connected_at)
    if isinstance(exc, HandshakeError):
        # trio-websocket raises a bare HandshakeError *from* the OSError (refused, DNS, TLS).
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            return ConnectionLost("connect_failed", _os_error(cause), connected_at)
        return ConnectionLost("handshake_failed", _describe(exc), connected_at)
    if isinstance(exc, OSError):
        return ConnectionLost("connect_failed", _os_error(exc), connected_at)
    return ConnectionLost("connect_failed", _describe(exc), connected_at)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else repr(exc)


def _os_error(exc: OSError) -> str:
    """`OSError: all attempts to connect to h:p failed` names its cause only in the group
    behind it (one error per address tried): name the first one too."""
    text = _describe(exc)
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = _leaves(cause)
        if leaves:
            text += f" ({_describe(leaves[0])})"
    return text


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _read(
    conn_id: int,
    ws: trio_websocket.WebSocketConnection,
    intake: FrameIntake,
    state: ConnectionState,
    metrics: SourceMetrics,
    cfg: BinanceConfig,
    sock: _Socket,
    first_frame_status: trio.TaskStatus[_Socket] | None,
    coalesce_s: float = 0.0,
) -> None:
    """Read chunks of frames and take them through the intake until cancelled (stop, retired)
    or the socket ends (raises).

    A chunk is what one `get_message()` returns plus what trio-websocket already parsed; it
    goes into the intake without an await in between, so a frame received is never dropped
    (cancellation lands in `get_message()`, in the wait for the sink, whose outbox keeps what it
    holds, or in the coalescing sleep, which holds nothing).
    """
    conn = str(conn_id)
    frames_counter = metrics.frames
    get_message = ws.get_message
    buffered = buffered_messages(ws)
    take = intake.take
    settle_now = intake.settle_now
    time_ns = time.time_ns
    n = 0
    try:
        while True:
            chunk = [await get_message()]
            while True:
                try:
                    chunk.append(buffered())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break  # empty; or closed: the next get_message() raises ConnectionClosed
            recv_ns = time_ns()
            state.last_frame_ns = recv_ns
            take(chunk, recv_ns, conn_id)
            n += len(chunk)
            for message in chunk:
                if type(message) is str and "serverShutdown" in message:
                    # Binance closes this socket soon: keep reading until the replacement
                    # delivers.
                    sock.shutdown_announced.set()
            if not settle_now():
                await _settle_slowly(intake, cfg, conn_id)
            if first_frame_status is not None:
                first_frame_status.started(sock)
                first_frame_status = None
            if n >= 256:
                frames_counter.inc(conn, n)
                n = 0
            if coalesce_s > 0 and len(chunk) >= COALESCE_WHEN_BACKLOG:
                await trio.sleep(coalesce_s)
    finally:
        frames_counter.inc(conn, n)


async def _settle_slowly(intake: FrameIntake, cfg: BinanceConfig, conn_id: int) -> None:
    """Kafka (or the spool) is behind: wait for the sink, at most `backpressure_close_s`.

    Past it we stop reading this connection (Binance drops a connection whose pongs are a minute
    late, and trio-websocket does not answer pings while we do not read): what was taken stays
    in the outbox for the next task that drains it; the connection closes and reconnects later.
    """
    with trio.move_on_after(cfg.backpressure_close_s) as waited:
        await intake.settle()
    if not waited.cancelled_caught:
        return
    log.warning(
        "ws.backpressure",
        conn=conn_id,
        waited_s=cfg.backpressure_close_s,
        action="closing; will reconnect when the pipeline has room",
    )
    raise ConnectionLost("backpressure", f"pipeline full for {cfg.backpressure_close_s}s")


async def _keepalive(ws: trio_websocket.WebSocketConnection, cfg: BinanceConfig) -> None:
    """Our own ping every PING_INTERVAL_SECONDS; a pong later than pong_timeout_s is a dead link.

    Pings count against Binance's 5 incoming messages per second per connection (API-NOTES §2):
    they go through this connection's message budget, which any control message would share.
    """
    budget = TokenBucket(cfg.subscribe_rate_per_s, 1.0)
    while True:
        await trio.sleep(cfg.ping_interval_s)
        await budget.take()
        try:
            with trio.fail_after(cfg.pong_timeout_s):
                await ws.ping()
        except trio.TooSlowError:
            raise ConnectionLost("pong_timeout", f"no pong in {cfg.pong_timeout_s}s") from None


async def _silence_watchdog(state: ConnectionState, limit_s: float) -> None:
    # Wakes only at the next possible deadline, never on a polling interval. The reader stamps
    # frames with the wall clock it already reads, so the hot loop pays nothing for this.
    limit_ns = int(limit_s * 1e9)
    while True:
        silent_ns = time.time_ns() - state.last_frame_ns
        if silent_ns >= limit_ns:
            raise ConnectionLost("silence", f"no frame for {limit_s}s")
        await trio.sleep((limit_ns - silent_ns) / 1e9)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    query = parts.query if len(parts.query) < 200 else parts.query[:200] + "..."
    return urlunsplit(parts._replace(query=query))
