"""One WebSocket stream connection: control messages, pings, and the market-data frames.

Receives the socket after the HTTP upgrade (plus any bytes read past the handshake) and the
requested streams; sends Binance frames until the client leaves, a fault closes it, or the
server stops. Server frames are built by hand and written a chunk per `send_all`; wsproto only
parses the client's (masked) frames. On exit the socket is closed; nothing outlives the task.
"""

from __future__ import annotations

import contextlib
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable

import orjson
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from marketd.logs import Throttle, get_logger
from marketd.testing.fake_exchange import control
from marketd.testing.fake_exchange.book import BookSim, Step, merge_steps
from marketd.testing.fake_exchange.faults import MalformedPicker, malformed_payload
from marketd.testing.fake_exchange.frames import (
    OP_PING,
    OP_PONG,
    TapeTemplates,
    TickerFigures,
    avg_price_payload,
    close_frame,
    depth_book_dict,
    depth_diff_payload,
    kline_payload,
    mini_ticker_dict,
    rolling_ticker_payload,
    server_shutdown_frame,
    ticker_payload,
    wrap,
    ws_frame,
)
from marketd.testing.fake_exchange.market import Tape
from marketd.testing.fake_exchange.state import ExchangeState
from marketd.testing.fake_exchange.stats import KlineAcc, window_end, window_start
from marketd.testing.fake_exchange.streams import TAPE_KINDS, Kind, Sub, Target

log = get_logger(__name__)
_throttle = Throttle(10.0)

MSG_LIMIT_PER_S = 5  # incoming messages per second per connection (docs/binance.md §2)
MAX_CONTROL_MESSAGE = 64 * 1024
PAUSE_POLL_S = 0.1  # how often paused tasks re-read the fault switches
PACED_CHUNK_TRADES = 4096  # per symbol per write when catching up at a paced rate


class _End(Exception):
    """Ends the connection from any of its tasks (with a close frame unless `code` is None)."""

    def __init__(self, code: int | None, reason: str, *, peer_closed: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.peer_closed = peer_closed  # the client's close frame already arrived


CLOSE_WAIT_S = 1.0  # after our close frame, how long to wait for the client's (RFC 6455 §7.1.1)


class _TapeState:
    """A connection's position in one symbol's tape and which tape streams it wants."""

    __slots__ = (
        "agg",
        "agg_cursor",
        "book",
        "cursor",
        "since_skip",
        "skip_left",
        "tape",
        "tpl",
        "trade",
    )

    def __init__(self, tape: Tape, tpl: TapeTemplates) -> None:
        self.tape = tape
        self.tpl = tpl
        self.cursor = tape.end_id  # live from now: Binance never replays (docs/binance.md §7.1)
        self.agg_cursor = tape.agg_end
        self.trade = self.agg = self.book = False
        self.since_skip = 0
        self.skip_left = 0  # ids still to withhold (a run may span two chunks)


class _KlineState:
    __slots__ = ("acc", "cursor", "end", "next_update", "start")

    def __init__(self, start: int, end: int, acc: KlineAcc, cursor: int, next_update: int) -> None:
        self.start, self.end, self.acc, self.cursor = start, end, acc, cursor
        self.next_update = next_update


class WsConnection:
    def __init__(
        self,
        state: ExchangeState,
        stream: trio.SocketStream,
        trailing: bytes,
        target: Target,
        subs: list[Sub],
        conn_id: int,
    ) -> None:
        self.state = state
        self.stream = stream
        self.conn_id = conn_id
        self.combined = target.combined
        self.micros = target.micros
        self.div = 1 if target.micros else 1000
        self.subs: dict[str, Sub] = {}
        self.parser = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._lock = trio.StrictFIFOLock()
        self._wake = trio.Event()
        self._tape: dict[str, _TapeState] = {}
        self._klines: dict[str, _KlineState] = {}
        self._due: dict[str, int] = {}  # periodic stream -> next emission (sim µs)
        self._mini_seen: dict[str, int] = {}
        self._depth_cursor: dict[str, int] = {}  # diff stream -> last update id sent
        self._depth_sent: dict[str, int] = {}  # diff stream -> events since the drop fault armed
        self._depth_epoch = state.depth_drop_epoch
        self.frames_sent = 0
        self.opened_us = state.clock.now_us()
        self._fired: set[str] = set()
        self._stall_until: float | None = None
        self._shutdown_delay: float | None = None
        self._incoming: deque[float] = deque()
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._text: list[str] = []
        self._malformed = MalformedPicker(state.config.seed, conn_id)
        self.close_code: int | None = None
        self._scope = trio.CancelScope()
        self._closing = False
        self._peer_closed = trio.Event()
        self._add(subs)

    # ---- subscriptions ----

    def symbols(self) -> set[str]:
        """Symbols this connection wants data for (all of them for `!miniTicker@arr`)."""
        out = {s.symbol for s in self.subs.values() if s.symbol is not None}
        if any(s.kind is Kind.ALL_MINI_TICKERS for s in self.subs.values()):
            out |= set(self.state.market.tapes)
        return out

    def follows(self, stream: str) -> bool:
        """Whether this connection is subscribed to `stream` (names are case-insensitive)."""
        return stream.lower() in {name.lower() for name in self.subs}

    def abort(self) -> None:
        """End the connection now without a close frame, as a network failure would
        (`POST /fake/disconnect`); the socket is closed as the connection's tasks unwind."""
        self.state.counters["disconnect"] += 1
        self._closing = True  # nothing more is written
        self._scope.cancel()

    def tape_symbols(self) -> set[str]:
        return set(self._tape)

    def poke(self) -> None:
        self._wake.set()

    def _add(self, subs: list[Sub]) -> None:
        for sub in subs:
            self.subs.setdefault(sub.name, sub)
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute per-symbol tape wants after (un)subscribing or a property change."""
        wants: dict[str, set[Kind]] = {}
        for sub in self.subs.values():
            if sub.kind in TAPE_KINDS and sub.symbol is not None:
                wants.setdefault(sub.symbol, set()).add(sub.kind)
        for sym in list(self._tape):
            if sym not in wants:
                del self._tape[sym]
        for sym, kinds in wants.items():
            tape = self.state.market.tape(sym)
            if tape is None:
                continue  # delisted/unknown: subscribed, never delivers (docs/binance.md §3)
            tpl = TapeTemplates(sym, self.combined, self.micros)
            st = self._tape.get(sym)
            if st is None:
                st = self._tape[sym] = _TapeState(tape, tpl)
            st.tpl = tpl
            had_agg = st.agg or st.book
            st.trade = Kind.TRADE in kinds
            st.agg = Kind.AGG_TRADE in kinds
            st.book = Kind.BOOK_TICKER in kinds
            if (st.agg or st.book) and not had_agg:
                st.agg_cursor = tape.agg_base + bisect_left(tape.agg_first, st.cursor)
        for name in list(self._klines):
            if name not in self.subs:
                del self._klines[name]
        for name in list(self._due):
            if name not in self.subs:
                del self._due[name]
        for name in list(self._depth_cursor):
            if name not in self.subs:
                del self._depth_cursor[name]
        self.poke()

    # ---- lifecycle ----

    async def run(self) -> None:
        state = self.state
        state.connections.add(self)
        state.connections_total += 1
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._guard, self._reader, True)
                nursery.start_soon(self._guard, self._pinger)
                nursery.start_soon(self._guard, self._sender)
                nursery.start_soon(self._guard, self._periodic)
                nursery.start_soon(self._guard, self._lifetime)
                nursery.start_soon(self._guard, self._depth_fast)
        finally:
            state.connections.discard(self)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _guard(self, fn: Callable[[], Awaitable[None]], reader: bool = False) -> None:
        """Run one task; whichever ends the connection cancels its siblings.

        A close with a code is a handshake: send our close frame (the lock keeps it from
        splitting a data frame), stop sending, and give the client a moment to answer before the
        socket closes, so it sees the code rather than a reset.
        """
        try:
            await fn()
        except _End as end:
            if end.code is not None and not self._closing:
                self._closing = True
                await self._send_close(end.code, end.reason)
                with trio.move_on_after(0 if end.peer_closed else CLOSE_WAIT_S):
                    if reader:
                        await self._drain()
                    else:
                        await self._peer_closed.wait()
            log.debug("ws.closed", conn=self.conn_id, code=end.code, reason=end.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("ws.gone", conn=self.conn_id)
        self._scope.cancel()

    async def _send_close(self, code: int, reason: str) -> None:
        self.close_code = code
        with trio.move_on_after(1.0):
            async with self._lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(close_frame(code, reason))

    async def _send(self, data: bytes) -> None:
        async with self._lock:
            if not self._closing:
                await self.stream.send_all(data)
                self.state.ledger.bytes_total += len(data)
                return
        # Nothing may follow our close frame: wait for the connection to be torn down.
        await trio.sleep_forever()

    def request_shutdown(self, delay_s: float) -> None:
        self._shutdown_delay = delay_s
        self.poke()

    def _paused(self) -> bool:
        if self._stall_until is None:
            return False
        if self.state.faults.stall_after is None or trio.current_time() >= self._stall_until:
            self._stall_until = None  # switch cleared or the stall period is over
            return False
        return True

    async def _wait_unpaused(self) -> None:
        while self._paused():
            with trio.move_on_after(PAUSE_POLL_S):
                await self._wake.wait()
            self._wake = trio.Event()

    # ---- incoming ----

    def _count_incoming(self) -> None:
        now = trio.current_time()
        q = self._incoming
        q.append(now)
        while q and q[0] <= now - 1.0:
            q.popleft()
        if len(q) > MSG_LIMIT_PER_S and self.state.faults.enforce_msg_limit:
            self.state.counters["msg_limit_disconnect"] += 1
            raise _End(1008, "Too many requests")

    async def _reader(self) -> None:
        while True:
            if await self._handle_events():
                return
            data = await self.stream.receive_some(65536)
            if not data:
                self._peer_closed.set()
                if self._closing:
                    return
                raise _End(None, "client closed TCP")
            self.parser.receive_data(data)

    async def _drain(self) -> None:
        """Read (and ignore) until the client's close frame or EOF."""
        while True:
            for event in self.parser.events():
                if isinstance(event, CloseConnection):
                    return
            data = await self.stream.receive_some(65536)
            if not data:
                return
            self.parser.receive_data(data)

    async def _handle_events(self) -> bool:
        """Handle parsed client frames; True once the client's close arrived while closing."""
        for event in self.parser.events():
            if self._closing:
                if isinstance(event, CloseConnection):
                    self._peer_closed.set()
                    return True
                continue
            if isinstance(event, Ping):
                self._count_incoming()
                if not (self._paused() and self.state.faults.stall_pings):
                    await self._send(ws_frame(bytes(event.payload), OP_PONG))
            elif isinstance(event, Pong):
                self._count_incoming()
                self._on_pong(bytes(event.payload))
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if sum(map(len, self._text)) > MAX_CONTROL_MESSAGE:
                    raise _End(1009, "message too big")
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    self._count_incoming()
                    await self._on_control(text)
            elif isinstance(event, BytesMessage):
                if event.message_finished:
                    self._count_incoming()
                    await self._send(
                        ws_frame(control.handle("", [], self.combined, nested=False).reply)
                    )
            elif isinstance(event, CloseConnection):
                code = event.code if event.code != 1005 else 1000
                raise _End(code, "client closed", peer_closed=True)
        return False

    async def _on_control(self, text: str) -> None:
        out = control.handle(
            text, list(self.subs), self.combined, nested=self.state.faults.nested_errors
        )
        if out.subscribe:
            self._add(list(out.subscribe))
        if out.unsubscribe:
            for name in out.unsubscribe:
                self.subs.pop(name, None)
            self._rebuild()
        if out.combined is not None and out.combined != self.combined:
            self.combined = out.combined
            self._rebuild()
        await self._send(ws_frame(out.reply))

    def _on_pong(self, payload: bytes) -> None:
        # Only a pong echoing an outstanding ping counts; unsolicited pongs do not keep the
        # connection alive (docs/binance.md §2).
        if payload not in self._pings:
            return
        while self._pings:
            key = next(iter(self._pings))
            del self._pings[key]
            if key == payload:
                break

    async def _pinger(self) -> None:
        cfg = self.state.config
        next_ping = trio.current_time() + cfg.ping_interval_s
        while True:
            deadline = next_ping
            if self._pings:
                deadline = min(deadline, next(iter(self._pings.values())) + cfg.pong_timeout_s)
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if self._pings and next(iter(self._pings.values())) + cfg.pong_timeout_s <= now:
                self.state.counters["pong_timeout"] += 1
                raise _End(1008, "pong timeout")
            if now >= next_ping:
                next_ping = now + cfg.ping_interval_s
                if self._paused() and self.state.faults.stall_pings:
                    continue
                self._ping_seq += 1
                payload = str(self._ping_seq).encode()
                self._pings[payload] = now
                # A client that does not read cannot get the ping: Binance drops it, so do we.
                with trio.move_on_after(cfg.pong_timeout_s) as scope:
                    await self._send(ws_frame(payload, OP_PING))
                if scope.cancelled_caught:
                    self.state.counters["pong_timeout"] += 1
                    raise _End(None, "client not reading")

    # ---- faults counted in frames ----

    def _budget(self, default: int) -> int:
        f = self.state.faults
        budget = default
        for name, limit in (
            ("drop", f.drop_after),
            ("stall", f.stall_after),
            ("shutdown", f.shutdown_after),
        ):
            if limit is not None and name not in self._fired:
                budget = min(budget, max(1, limit - self.frames_sent))
        return budget

    def _after_frames(self) -> None:
        state = self.state
        f = state.faults
        if (
            f.drop_after is not None
            and self.frames_sent >= f.drop_after
            and "drop" not in self._fired
            and (f.drop_repeat or "drop" not in state.fired)
        ):
            self._fired.add("drop")
            state.fired.add("drop")
            state.counters["drop"] += 1
            raise _End(None, "drop fault")
        if (
            f.stall_after is not None
            and self.frames_sent >= f.stall_after
            and "stall" not in self._fired
            and (f.stall_repeat or "stall" not in state.fired)
        ):
            self._fired.add("stall")
            state.fired.add("stall")
            state.counters["stall"] += 1
            dur = f.stall_for_s
            self._stall_until = trio.current_time() + (dur if dur is not None else math.inf)
        if (
            f.shutdown_after is not None
            and self.frames_sent >= f.shutdown_after
            and "shutdown" not in self._fired
            and "shutdown" not in state.fired
        ):
            self._fired.add("shutdown")
            state.fired.add("shutdown")
            self.request_shutdown(f.shutdown_close_delay_s)

    # ---- tape streams: trade, aggTrade, bookTicker ----

    async def _sender(self) -> None:
        state = self.state
        cfg = state.config
        max_mode = cfg.rate is None
        while True:
            await self._wait_unpaused()
            if self._wake.is_set():
                self._wake = trio.Event()
            states = list(self._tape.values())
            if max_mode and states:
                per = max(1, self._budget(cfg.chunk_frames) // len(states))
                now = state.clock.now_us()
                for st in states:
                    if st.cursor >= st.tape.end_id:
                        st.tape.generate(per, now)
                limit = per
            else:
                limit = self._budget(PACED_CHUNK_TRADES)
            out: list[str] = []
            frames = 0
            now = state.clock.now_us()
            for st in states:
                frames += self._emit_tape(st, limit, now, out)
            if not frames:
                await self._wake.wait()
                continue
            data = "".join(out).encode("latin-1")
            await self._send(data)
            self.frames_sent += frames
            state.ledger.frames_total += frames
            self._after_frames()

    def _emit_tape(self, st: _TapeState, limit: int, now_us: int, out: list[str]) -> int:
        tape = st.tape
        if st.cursor < tape.first_id:
            self.state.counters["slow_consumer_close"] += 1
            raise _End(1008, "client too slow: trades left the retention window")
        start = st.cursor
        end = min(tape.end_id, start + limit)
        if end <= start:
            return 0
        frames = 0
        ledger = self.state.ledger.symbol(tape.spec.symbol)
        if st.trade:
            if self.state.faults.per_frame_active():
                frames += self._trades_slow(st, start, end, now_us, out)
            else:
                st.tpl.trades(tape, start, end, now_us, out)
                ledger.trades_sent(start, end - 1, end - start)
                frames += end - start
        if st.agg or st.book:
            stop = tape.agg_base + bisect_left(tape.agg_first, end)
            first = max(st.agg_cursor, tape.agg_base)
            if st.agg and stop > first:
                st.tpl.agg_trades(tape, first, stop, now_us, out)
                ledger.frames["aggTrade"] += stop - first
                frames += stop - first
            if st.book and stop > first:
                st.tpl.book_tickers(tape, first, stop, out)
                ledger.frames["bookTicker"] += stop - first
                frames += stop - first
            st.agg_cursor = stop
        st.cursor = end
        return frames

    def _trades_slow(
        self, st: _TapeState, start: int, end: int, now_us: int, out: list[str]
    ) -> int:
        """Trades with per-frame faults: malformed frames inserted, ids withheld."""
        state = self.state
        f = state.faults
        tape = st.tape
        sym = tape.spec.symbol
        ledger = state.ledger.symbol(sym)
        frames = 0
        for tid in range(start, end):
            kind = self._malformed.pick(f) if f.malformed_ratio > 0 else None
            if kind is not None:
                payload = malformed_payload(kind, sym, tid, now_us // 1000)
                stream = f"{sym.lower()}@trade"
                out.append(ws_frame(wrap(stream, payload, self.combined)).decode("latin-1"))
                state.counters[f"malformed.{kind}"] += 1
                frames += 1
            if f.skip_every is not None:
                if st.skip_left == 0 and st.since_skip >= f.skip_every:
                    st.skip_left = f.skip_count
                    st.since_skip = 0
                if st.skip_left:
                    st.skip_left -= 1
                    ledger.skip(tid)
                    state.counters["skipped_ids"] += 1
                    continue
                st.since_skip += 1
            st.tpl.trades(tape, tid, tid + 1, now_us, out)
            ledger.trades_sent(tid, tid, 1)
            frames += 1
        return frames

    # ---- periodic streams: klines, tickers, avgPrice ----

    async def _periodic(self) -> None:
        clock = self.state.clock
        while True:
            await self._wait_unpaused()
            now = clock.now_us()
            frames = [
                frame for sub in list(self.subs.values()) for frame in self._due_frames(sub, now)
            ]
            if frames:
                await self._send(b"".join(frames))
                self.frames_sent += len(frames)
                self.state.ledger.frames_total += len(frames)
                self._after_frames()
            wake = min(
                [*self._due.values(), *(min(k.end, k.next_update) for k in self._klines.values())],
                default=None,
            )
            # Re-check subscriptions and switches at least every PAUSE_POLL_S.
            with trio.move_on_after(PAUSE_POLL_S):
                if wake is None:
                    await trio.sleep_forever()
                else:
                    await clock.sleep_until_us(wake)

    def _due_frames(self, sub: Sub, now: int) -> list[bytes]:
        if sub.kind in TAPE_KINDS or sub.kind is Kind.SILENT:
            return []
        if sub.kind is Kind.KLINE:
            return self._kline_frames(sub, now)
        if sub.kind is Kind.DEPTH or sub.kind is Kind.DEPTH_PARTIAL:
            return self._depth_frames(sub, now)
        due = self._due.get(sub.name)
        if due is None:
            due = now  # first emission right away, then every second
        if now < due:
            return []
        self._due[sub.name] = max(due + 1_000_000, now + 1000)
        return self._ticker_frames(sub, now)

    def _frame(self, sub_name: str, payload: bytes, kind: str, symbol: str) -> bytes:
        self.state.ledger.count(symbol, kind)
        return ws_frame(wrap(sub_name, payload, self.combined))

    def _ticker_frames(self, sub: Sub, now: int) -> list[bytes]:
        state = self.state
        div = self.div
        if sub.kind is Kind.ALL_MINI_TICKERS:
            items = []
            for sym, tape in state.market.tapes.items():
                if tape.generated and self._mini_seen.get(sym) != tape.end_id:
                    self._mini_seen[sym] = tape.end_id
                    win = state.window(sym, "24h", now)
                    assert win is not None
                    items.append(mini_ticker_dict(sym, TickerFigures(win), now, div))
            if not items:  # the array carries only symbols that changed (docs/binance.md §4.5)
                return []
            return [self._frame(sub.name, orjson.dumps(items), "!miniTicker@arr", "*")]
        assert sub.symbol is not None
        sym = sub.symbol
        found = state.market.tape(sym)
        if found is None or not found.generated:
            return []
        tape = found
        if sub.kind is Kind.TICKER:
            win = state.window(sym, "24h", now)
            assert win is not None
            payload = ticker_payload(
                sym, TickerFigures(win), tape, state.window_start("24h", now), now, div
            )
            return [self._frame(sub.name, payload, "ticker", sym)]
        if sub.kind is Kind.MINI_TICKER:
            win = state.window(sym, "24h", now)
            assert win is not None
            payload = orjson.dumps(mini_ticker_dict(sym, TickerFigures(win), now, div))
            return [self._frame(sub.name, payload, "miniTicker", sym)]
        if sub.kind is Kind.ROLLING_TICKER:
            assert sub.window is not None
            win = state.window(sym, sub.window, now)
            assert win is not None
            payload = rolling_ticker_payload(
                sym, sub.window, TickerFigures(win), state.window_start(sub.window, now), now, div
            )
            return [self._frame(sub.name, payload, f"ticker_{sub.window}", sym)]
        if sub.kind is Kind.AVG_PRICE:
            win = state.window(sym, "5m", now)
            assert win is not None
            payload = avg_price_payload(sym, TickerFigures(win), tape, now, div)
            return [self._frame(sub.name, payload, "avgPrice", sym)]
        return []

    def _kline_frames(self, sub: Sub, now: int) -> list[bytes]:
        assert sub.symbol is not None and sub.interval is not None
        tape = self.state.market.tape(sub.symbol)
        if tape is None:
            return []
        interval, tz = sub.interval, sub.tz_us
        period = 1_000_000 if interval == "1s" else 2_000_000  # docs/binance.md §4.3
        st = self._klines.get(sub.name)
        if st is None:
            start = window_start(interval, now, tz)
            end = window_end(interval, start, tz)
            i0 = tape.first_index_at(start)
            st = _KlineState(start, end, KlineAcc(tape.price_before(i0)), tape.first_id + i0, now)
            self._klines[sub.name] = st
        out: list[bytes] = []
        closed = 0
        while now >= st.end:
            self._fold(st, tape)
            out.append(self._kline_frame(sub, st, True, now))
            closed += 1
            start = st.end
            if closed >= 100:  # after a long jump: resume at the current window
                start = window_start(interval, now, tz)
                st.cursor = tape.first_id + tape.first_index_at(start)
            st.start, st.end = start, window_end(interval, start, tz)
            st.acc = KlineAcc(
                st.acc.c if closed < 100 else tape.price_before(st.cursor - tape.first_id)
            )
        if now >= st.next_update:
            self._fold(st, tape)
            out.append(self._kline_frame(sub, st, False, now))
            st.next_update = max(st.next_update + period, now + 1000)
        return out

    def _fold(self, st: _KlineState, tape: Tape) -> None:
        i0 = max(st.cursor - tape.first_id, 0)
        i1 = tape.first_index_at(st.end, i0)
        st.acc.fold(tape, i0, i1)
        st.cursor = tape.first_id + i1

    def _kline_frame(self, sub: Sub, st: _KlineState, closed: bool, now: int) -> bytes:
        assert sub.symbol is not None and sub.interval is not None
        payload = kline_payload(
            sub.symbol, sub.interval, st.start, st.end, st.acc, closed, now, self.div
        )
        return self._frame(sub.name, payload, "kline_final" if closed else "kline", sub.symbol)

    # ---- depth: diff events and partial books (docs/books.md) ----

    def _depth_frames(self, sub: Sub, now: int) -> list[bytes]:
        """Paced depth streams: every 1000 or 100 ms, one diff event with the book steps since
        the last one (none when nothing changed), or the top 5/10/20 levels."""
        assert sub.symbol is not None
        sim = self.state.books.get(sub.symbol)
        if sim is None or (sub.kind is Kind.DEPTH and self.state.config.depth_max):
            return []  # no book (not trading), or sent by _depth_fast
        due = self._due.get(sub.name, now)
        if now < due:
            return []
        self._due[sub.name] = max(due + sub.period_ms * 1000, now + 1000)
        sim.advance_to(now)
        if sub.kind is Kind.DEPTH_PARTIAL:
            assert sub.levels is not None
            bids, asks = sim.top(sub.levels)
            payload = orjson.dumps(depth_book_dict(sim.last_id, bids, asks))
            return [self._frame(sub.name, payload, "depthPartial", sub.symbol)]
        steps = self._depth_steps(sub, sim)
        frame = self._diff_frame(sub, sim, steps, now) if steps else None
        return [frame] if frame is not None else []

    def _depth_steps(self, sub: Sub, sim: BookSim) -> list[Step]:
        """Book steps this diff stream has not sent yet (a new stream starts from now)."""
        cursor = self._depth_cursor.get(sub.name)
        if cursor is None:
            self._depth_cursor[sub.name] = sim.last_id
            return []
        if cursor < sim.first_known_id:
            self.state.counters["slow_consumer_close"] += 1
            raise _End(1008, "client too slow: depth updates left the history")
        return sim.steps_after(cursor)

    def _diff_frame(self, sub: Sub, sim: BookSim, steps: list[Step], now: int) -> bytes | None:
        """One diff event over `steps`, or None when the depth drop fault withholds it."""
        first, last = steps[0].first_id, steps[-1].last_id
        self._depth_cursor[sub.name] = last
        symbol = sim.spec.symbol
        if self._withhold(sub.name):
            sim.withheld.append((first, last))
            self.state.counters["depth_drop"] += 1
            return None
        bids, asks = merge_steps(steps)
        payload = depth_diff_payload(symbol, first, last, bids, asks, now, self.div)
        return self._frame(sub.name, payload, "depth", symbol)

    def _withhold(self, name: str) -> bool:
        state = self.state
        f = state.faults
        if f.depth_drop_after is None:
            return False
        if self._depth_epoch != state.depth_drop_epoch:  # re-armed: count afresh
            self._depth_epoch = state.depth_drop_epoch
            self._depth_sent.clear()
        sent = self._depth_sent.get(name, 0)
        if sent < f.depth_drop_after:
            self._depth_sent[name] = sent + 1
            return False
        if not f.depth_drop_repeat and "depth_drop" in state.fired:
            return False
        state.fired.add("depth_drop")
        self._depth_sent[name] = 0
        return True

    async def _depth_fast(self) -> None:
        """--depth-max: diff streams get one event per book step, as fast as the client reads
        (the book steps are made here, for the symbols this connection follows)."""
        state = self.state
        if not state.config.depth_max:
            await trio.sleep_forever()
        clock = state.clock
        while True:
            await self._wait_unpaused()
            subs = [s for s in self.subs.values() if s.kind is Kind.DEPTH]
            frames: list[bytes] = []
            if subs:
                per = max(1, self._budget(state.config.chunk_frames) // len(subs))
                now = clock.now_us()
                for sub in subs:
                    assert sub.symbol is not None
                    sim = state.books.get(sub.symbol)
                    if sim is None:
                        continue
                    steps = self._depth_steps(sub, sim)
                    if not steps:
                        sim.generate(per, now)
                        steps = self._depth_steps(sub, sim)
                    for step in steps[:per]:
                        frame = self._diff_frame(sub, sim, [step], now)
                        if frame is not None:
                            frames.append(frame)
            if not frames:
                with trio.move_on_after(PAUSE_POLL_S):
                    await trio.sleep_forever()
                continue
            await self._send(b"".join(frames))
            self.frames_sent += len(frames)
            state.ledger.frames_total += len(frames)
            self._after_frames()

    # ---- lifetime: 24 h mark and serverShutdown ----

    async def _lifetime(self) -> None:
        state = self.state
        clock = state.clock
        while True:
            if self._shutdown_delay is not None:
                delay, self._shutdown_delay = self._shutdown_delay, None
                state.counters["server_shutdown"] += 1
                await self._send(server_shutdown_frame(clock.now_us(), self.div, self.combined))
                await trio.sleep(delay)
                raise _End(1001, "server shutdown")
            age = state.faults.max_connection_age_s
            if age is not None:
                deadline = self.opened_us + int(age * 1e6)
                if clock.now_us() >= deadline:
                    state.counters["max_age_close"] += 1
                    raise _End(1001, "connection lifetime reached")
                with trio.move_on_after(PAUSE_POLL_S):
                    await clock.sleep_until_us(deadline)
            else:
                with trio.move_on_after(PAUSE_POLL_S * 2):
                    await trio.sleep_forever()
