"""WebSocket source: one task per connection, reading and timestamping frames, nothing more.

Each connection subscribes to its streams through the combined-stream URL, keeps itself alive
(our pings, silence watchdog per stream kind), reconnects with capped full-jitter backoff under a
shared connection-attempt budget, and hands every frame to the decoder through a bounded channel.
Decoding happens elsewhere so this task always drains trio-websocket promptly (a stalled reader
stops answering Binance's pings). On shutdown it stops reading; a frame already received is
always handed over first: nothing received is dropped.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, HandshakeError

from marketd.backoff import Backoff
from marketd.config import BinanceConfig
from marketd.errors import ConnectionLost
from marketd.ingest.decode import Frame
from marketd.ingest.limits import TokenBucket
from marketd.ingest.streams import StreamSpec
from marketd.logs import get_logger
from marketd.metrics import MetricsFactory

log = get_logger(__name__)

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
    frames: object
    reconnects: object
    connected: object
    last_frame: object

    @classmethod
    def create(cls, metrics: MetricsFactory) -> SourceMetrics:
        return cls(
            metrics.fast_counter("ws_frames_received", "frames received per connection", "conn"),
            metrics.counter("ws_reconnects", "disconnects by reason", ["conn", "reason"]),
            metrics.gauge("ws_connected", "1 while the connection is up", ["conn"]),
            metrics.gauge(
                "ws_last_frame_timestamp_seconds", "wall time of the last frame", ["conn"]
            ),
        )


@attrs.define
class ConnectionState:
    """Shared between a connection's reader and its watchdogs."""

    last_frame_at: float = 0.0  # trio clock
    frames: int = 0


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
    frames_tx: trio.MemorySendChannel[Frame],
    attempts: TokenBucket,
    metrics: SourceMetrics,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep one connection up until `stop` is set; reconnect on any failure."""
    url = stream_url(cfg.ws_url, streams, cfg.time_unit)
    backoff = Backoff(cfg.reconnect_initial_delay_s, cfg.reconnect_max_delay_s)
    conn = str(conn_id)
    started = False
    async with frames_tx:
        while not stop.is_set():
            await attempts.take()
            connected_at: float | None = None
            reason, detail = "unknown", ""
            try:
                connected_at = await _session(
                    conn_id,
                    url,
                    streams,
                    cfg,
                    frames_tx,
                    metrics,
                    stop,
                    task_status if not started else trio.TASK_STATUS_IGNORED,
                )
                reason = "shutdown"
            except ConnectionLost as exc:
                reason, detail = exc.reason, exc.detail
                connected_at = exc.connected_at
            finally:
                metrics.connected.labels(conn).set(0)  # type: ignore[attr-defined]
            started = True
            if stop.is_set():
                break
            metrics.reconnects.labels(conn, reason).inc()  # type: ignore[attr-defined]
            if (
                connected_at is not None
                and trio.current_time() - connected_at >= cfg.healthy_after_s
            ):
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
    if not started:
        task_status.started()


async def _session(
    conn_id: int,
    url: str,
    streams: Sequence[StreamSpec],
    cfg: BinanceConfig,
    frames_tx: trio.MemorySendChannel[Frame],
    metrics: SourceMetrics,
    stop: trio.Event,
    task_status: trio.TaskStatus[None],
) -> float:
    """One connection's life. Returns when `stop` is set; raises ConnectionLost otherwise."""
    conn = str(conn_id)
    ssl_context = ssl.create_default_context() if url.startswith("wss:") else None
    connected_at: float | None = None
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context=ssl_context,
            max_message_size=max(cfg.max_frame_bytes * WS_HARD_LIMIT_FACTOR, 8 << 20),
            message_queue_size=1,
            connect_timeout=cfg.connection_timeout_s,
            disconnect_timeout=2,
        ) as ws:
            connected_at = trio.current_time()
            metrics.connected.labels(conn).set(1)  # type: ignore[attr-defined]
            log.info("ws.connected", conn=conn_id, streams=len(streams), url=_redact(url))
            task_status.started()
            state = ConnectionState(last_frame_at=connected_at)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keepalive, ws, cfg)
                limit = silence_limit(cfg, streams)
                if limit != math.inf:
                    nursery.start_soon(_silence_watchdog, state, limit)
                await _read(conn_id, ws, frames_tx, state, metrics, cfg, stop)
                nursery.cancel_scope.cancel()
            return connected_at
    except BaseExceptionGroup as group:
        raise _connection_lost(group, connected_at) from group
    except (ConnectionLost, ConnectionClosed, HandshakeError, trio.TooSlowError, OSError) as exc:
        raise _connection_lost(exc, connected_at) from exc


def _connection_lost(exc: BaseException, connected_at: float | None) -> ConnectionLost:
    """Map whatever ended a connection (possibly inside exception groups) to ConnectionLost."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        for leaf in leaves:
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
    if isinstance(exc, HandshakeError):
        return ConnectionLost("handshake_failed", str(exc), connected_at)
    if isinstance(exc, trio.TooSlowError):
        return ConnectionLost("connect_timeout", "no handshake in time", connected_at)
    return ConnectionLost("connect_failed", f"{type(exc).__name__}: {exc}", connected_at)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _read(
    conn_id: int,
    ws: trio_websocket.WebSocketConnection,
    frames_tx: trio.MemorySendChannel[Frame],
    state: ConnectionState,
    metrics: SourceMetrics,
    cfg: BinanceConfig,
    stop: trio.Event,
) -> None:
    """Read until `stop` (returns) or the connection ends (raises)."""
    conn = str(conn_id)
    frames_counter = metrics.frames
    send_nowait = frames_tx.send_nowait
    get_message = ws.get_message
    current_time = trio.current_time
    time_ns = time.time_ns
    n = 0
    async with trio.open_nursery() as watch:
        # Stop *reading* on shutdown by cancelling only the receive; a frame in hand is still
        # handed over (the hand-over below is not a cancellation point on the fast path and is
        # shielded on the slow one).
        async def _stop_watch() -> None:
            await stop.wait()
            watch.cancel_scope.cancel()

        watch.start_soon(_stop_watch)
        try:
            while True:
                message = await get_message()
                frame = Frame(message, time_ns(), conn_id)
                n += 1
                state.last_frame_at = current_time()
                try:
                    send_nowait(frame)
                except trio.WouldBlock:
                    await _hand_over_slowly(frame, frames_tx, cfg, conn_id)
                if n >= 256:
                    frames_counter.inc(conn, n)  # type: ignore[attr-defined]
                    n = 0
                if type(message) is str and "serverShutdown" in message:
                    raise ConnectionLost("server_shutdown", "serverShutdown event")
        finally:
            frames_counter.inc(conn, n)  # type: ignore[attr-defined]


async def _hand_over_slowly(
    frame: Frame, frames_tx: trio.MemorySendChannel[Frame], cfg: BinanceConfig, conn_id: int
) -> None:
    """The decoder is behind: wait for room, shielded so a received frame is never lost.

    Past `backpressure_close_s` we stop reading this connection (Binance drops a connection whose
    pongs are a minute late, and trio-websocket does not answer pings while we do not read): the
    frame is still handed over, then the connection closes and reconnects later.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(cfg.backpressure_close_s) as waited:
            await frames_tx.send(frame)
        if not waited.cancelled_caught:
            return
        log.warning(
            "ws.backpressure",
            conn=conn_id,
            waited_s=cfg.backpressure_close_s,
            action="closing; will reconnect when the pipeline has room",
        )
        await frames_tx.send(frame)
    raise ConnectionLost("backpressure", f"pipeline full for {cfg.backpressure_close_s}s")


async def _keepalive(ws: trio_websocket.WebSocketConnection, cfg: BinanceConfig) -> None:
    """Our own ping every PING_INTERVAL_SECONDS; a pong later than pong_timeout_s is a dead link."""
    while True:
        await trio.sleep(cfg.ping_interval_s)
        try:
            with trio.fail_after(cfg.pong_timeout_s):
                await ws.ping()
        except trio.TooSlowError:
            raise ConnectionLost("pong_timeout", f"no pong in {cfg.pong_timeout_s}s") from None


async def _silence_watchdog(state: ConnectionState, limit_s: float) -> None:
    # Wakes only at the next possible deadline (absolute time), never on a polling interval.
    while True:
        deadline = state.last_frame_at + limit_s
        if trio.current_time() >= deadline:
            raise ConnectionLost("silence", f"no frame for {limit_s}s")
        await trio.sleep_until(deadline)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    query = parts.query if len(parts.query) < 200 else parts.query[:200] + "..."
    return urlunsplit(parts._replace(query=query))
