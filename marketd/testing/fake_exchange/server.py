"""The fake exchange: one trio server on 127.0.0.1 with WebSocket streams, REST and admin API.

Receives an `ExchangeConfig`; serves `ws://HOST:PORT/stream`, `/ws`, `http://HOST:PORT/api/v3/...`
and `/fake/...` on one port, and runs the paced trade generator. `serve()` reports the bound port
via `task_status.started`; cancelling it closes the listener and every connection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import orjson
import trio

from marketd.logs import get_logger
from marketd.testing.fake_exchange.faults import FaultCounters, Faults
from marketd.testing.fake_exchange.http11 import serve_http
from marketd.testing.fake_exchange.ledger import Ledger
from marketd.testing.fake_exchange.market import Market
from marketd.testing.fake_exchange.rest import Response, RestApi
from marketd.testing.fake_exchange.state import ExchangeConfig, ExchangeState

log = get_logger(__name__)

MAX_CATCH_UP_S = 0.1  # a late generator skips ahead rather than bursting more than this


class FakeExchange:
    """In-process API: `await nursery.start(ex.serve)` -> port; then faults, clock, ledger."""

    def __init__(self, config: ExchangeConfig | None = None) -> None:
        self.config = config or ExchangeConfig()
        self.state = ExchangeState(self.config)
        self.rest = RestApi(self.state)
        self.port: int | None = None
        self._conn_ids = itertools.count(1)

    # ---- Python API for tests and benchmarks ----

    @property
    def market(self) -> Market:
        return self.state.market

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    @property
    def counters(self) -> FaultCounters:
        return self.state.counters

    @property
    def faults(self) -> Faults:
        return self.state.faults

    def set_faults(self, **changes: Any) -> Faults:
        """Change fault switches now (same names as `POST /fake/faults`)."""
        return self.state.set_faults(changes)

    def advance_clock(self, seconds: float) -> int:
        """Jump the exchange clock forward; returns the new time in ms."""
        self.state.clock.advance(seconds)
        return self.state.clock.now_ms()

    def server_shutdown(self, close_after_s: float | None = None) -> int:
        """Send `serverShutdown` on every connection, close each after the delay."""
        delay = self.state.faults.shutdown_close_delay_s if close_after_s is None else close_after_s
        conns = list(self.state.connections)
        for conn in conns:
            conn.request_shutdown(delay)
        return len(conns)

    def disconnect(self, stream: str | None = None) -> int:
        """Abort (TCP, no close frame) every connection subscribed to `stream`, or every
        connection when it is None; returns how many. Counted as `disconnect`."""
        conns = [c for c in self.state.connections if stream is None or c.follows(stream)]
        for conn in conns:
            conn.abort()
        return len(conns)

    def book(
        self, symbol: str, update_id: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """The exchange's own book of `symbol` at `update_id` (default: now), best `limit`
        levels per side first, as decimal strings. LookupError: no book, or an id outside the
        history (`first_known_id`..`last_update_id`)."""
        sim = self.state.books.get(symbol.upper())
        if sim is None:
            raise LookupError(f"no order book for {symbol!r}")
        sim.advance_to(self.state.clock.now_us())
        at = sim.last_id if update_id is None else update_id
        bids, asks = self.state.books.book_at(sim.spec.symbol, at)
        return {
            "symbol": sim.spec.symbol,
            "update_id": at,
            "bids": bids[:limit],
            "asks": asks[:limit],
            "first_known_id": sim.first_known_id,
            "last_update_id": sim.last_id,
        }

    def stats(self) -> dict[str, Any]:
        state = self.state
        return {
            "now_ms": state.clock.now_ms(),
            "connections": {"open": len(state.connections), "total": state.connections_total},
            "faults_injected": dict(state.counters),
            "faults": state.faults.snapshot(trio.current_time()),
            "ledger": state.ledger.summary(),
            "tapes": {
                sym: {
                    "generated": tape.generated,
                    "first_retained_id": tape.first_id,
                    "last_id": tape.end_id - 1,
                }
                for sym, tape in state.market.tapes.items()
            },
            "rest_weight_used_1m": self.rest.limiter.used,
            "books": {
                sym: {
                    "last_update_id": sim.last_id,
                    "first_known_id": sim.first_known_id,
                    "withheld": [list(w) for w in sim.withheld],
                    "stale_snapshots": list(sim.stale_served),
                }
                for sym, sim in state.books.sims.items()
                if sim.history or sim.withheld or sim.stale_served
            },
        }

    @property
    def urls(self) -> tuple[str, str]:
        host = self.config.host
        return f"ws://{host}:{self.port}/stream", f"http://{host}:{self.port}"

    # ---- serving ----

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("fake_exchange.listening", port=self.port, rate=self.config.rate or "max")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._generate)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await serve_http(stream, self.state, self._route, lambda: next(self._conn_ids))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-request
        finally:
            await stream.aclose()

    async def _generate(self) -> None:
        """Paced trades (absolute deadlines) for the symbols someone subscribes to.

        At `--rate max` the senders generate as their clients read; this task then only feeds
        symbols that have periodic subscribers but no tape subscriber, at `background_rate`.
        """
        state = self.state
        cfg = self.config
        max_mode = cfg.rate is None
        rate = cfg.background_rate if max_mode else cfg.rate
        assert rate is not None
        tick = min(0.1, max(0.001, 1.0 / rate))
        t0 = trio.current_time()
        produced = 0
        k = 0
        while True:
            k = max(k + 1, math.floor((trio.current_time() - t0) / tick) + 1)
            await trio.sleep_until(t0 + k * tick)
            due = int(rate * (trio.current_time() - t0)) - produced
            cap = max(1, int(rate * MAX_CATCH_UP_S))
            if due > cap:
                produced += due - cap
                due = cap
            if due <= 0:
                continue
            symbols = sorted(
                state.subscribed_symbols() - (self._tape_symbols() if max_mode else set())
            )
            if not symbols:
                produced += due
                continue
            produced += state.market.generate_spread(symbols, due)
            state.tape_grew()

    def _tape_symbols(self) -> set[str]:
        out: set[str] = set()
        for conn in self.state.connections:
            out |= conn.tape_symbols()
        return out

    # ---- HTTP routing ----

    async def _route(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        if path.startswith("/fake/"):
            return self._admin(method, path, params, body)
        if method != "GET":
            return Response(405, orjson.dumps({"code": -1000, "msg": "GET only"}))
        return self.rest.handle(path, params, headers)

    def _admin(self, method: str, path: str, params: Mapping[str, str], body: bytes) -> Response:
        try:
            payload = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            return Response(400, orjson.dumps({"error": f"invalid JSON: {exc}"}))
        if not isinstance(payload, dict):
            return Response(400, orjson.dumps({"error": "expected a JSON object"}))
        now = trio.current_time()
        if path == "/fake/stats" and method == "GET":
            return Response(200, orjson.dumps(self.stats()))
        if path == "/fake/faults" and method == "GET":
            return Response(200, orjson.dumps(self.state.faults.snapshot(now)))
        if path == "/fake/faults" and method == "POST":
            try:
                faults = self.state.set_faults(payload)
            except ValueError as exc:
                return Response(400, orjson.dumps({"error": str(exc)}))
            log.info("fake_exchange.faults", **{k: str(v) for k, v in payload.items()})
            return Response(200, orjson.dumps(faults.snapshot(now)))
        if path == "/fake/server-shutdown" and method == "POST":
            delay = payload.get("close_after_s")
            if delay is not None and (
                isinstance(delay, bool) or not isinstance(delay, int | float)
            ):
                return Response(400, orjson.dumps({"error": "close_after_s must be a number"}))
            return Response(200, orjson.dumps({"connections": self.server_shutdown(delay)}))
        if path == "/fake/disconnect" and method == "POST":
            stream = payload.get("stream")
            if stream is not None and not isinstance(stream, str):
                return Response(400, orjson.dumps({"error": "stream must be a stream name"}))
            return Response(200, orjson.dumps({"connections": self.disconnect(stream)}))
        if path == "/fake/book" and method == "GET":
            return self._book(params)
        if path == "/fake/clock" and method == "POST":
            advance = payload.get("advance_s", 0)
            if isinstance(advance, bool) or not isinstance(advance, int | float) or advance < 0:
                return Response(400, orjson.dumps({"error": "advance_s must be a number >= 0"}))
            return Response(200, orjson.dumps({"now_ms": self.advance_clock(advance)}))
        return Response(404, orjson.dumps({"error": f"no admin endpoint {method} {path}"}))

    def _book(self, params: Mapping[str, str]) -> Response:
        """`GET /fake/book?symbol=X[&update_id=N][&limit=K]`: `book()` as JSON."""
        numbers: dict[str, int | None] = {}
        for name in ("update_id", "limit"):
            raw = params.get(name)
            if raw is not None and not (raw.isascii() and raw.isdigit() and len(raw) < 20):
                return Response(400, orjson.dumps({"error": f"{name} must be an integer"}))
            numbers[name] = None if raw is None else int(raw)
        symbol = params.get("symbol", "")
        if not symbol:
            return Response(400, orjson.dumps({"error": "symbol is required"}))
        try:
            book = self.book(symbol, numbers["update_id"], numbers["limit"])
        except LookupError as exc:
            return Response(404, orjson.dumps({"error": str(exc).strip("'\"")}))
        return Response(200, orjson.dumps(book))
