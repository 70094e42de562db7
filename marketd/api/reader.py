"""Batched Redis reads for the API: concurrent requests share one pipelined round trip.

Receives `read(symbols)` calls from request handlers; one reader task takes every request that
is waiting, reads the union of their keys with one HGETALL pipeline, and answers each. A request
that arrives while a read is in flight waits for the next one: an answer always reflects Redis at
or after the request arrived (no cache). When the reader stops, waiting requests fail.

The pipeline goes over `NativeReads`, read-only on a trio socket (marketd/redis_wire.py, replies
parsed by hiredis), so a batch costs no thread hop. Why: the thread hop (~150 µs,
docs/performance.md §6) per request halved throughput; per batch it was still paid once, and in
the default daemon every hop also waits for the GIL behind the ingest and ticker threads
(BENCHMARKS.md, "HTTP API").
Stores that are not plain TCP (TLS, unix socket) use the sync redis-py client in a worker thread
(redis.asyncio does not work under trio).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import hiredis
import trio

from marketd.errors import StoreUnavailable
from marketd.redis_wire import RespConnection, command
from marketd.tickers.rules import ticker_key
from marketd.tickers.store import TcpAddress


class HashStore(Protocol):
    """What a reader needs of a store (TickerStore; BookStore for `book:{SYMBOL}`)."""

    def tcp_address(self) -> TcpAddress | None: ...
    def read(self, symbols: Sequence[str]) -> list[dict[str, str]]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class NativeReads:
    """Pipelined HGETALLs over one trio TCP connection; (re)connects on demand.

    Used by one task at a time (the reader task). Any failure closes the connection and becomes
    StoreUnavailable; the next read reconnects. Each read is bounded by the store's timeout.
    """

    def __init__(
        self,
        address: TcpAddress,
        client_name: str = "marketd-api-reads",
        key: Callable[[str], str] = ticker_key,
    ) -> None:
        self.address = address
        self.client_name = client_name
        self.key = key  # symbol -> hash key, as the store's own `read` names it
        self._conn = RespConnection(address, client_name)

    async def read(self, symbols: Sequence[str]) -> list[dict[str, str]]:
        payload = b"".join(command("HGETALL", self.key(s)) for s in symbols)
        replies = await self._conn.roundtrip(payload, len(symbols))
        rows: list[dict[str, str]] = []
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                # WRONGTYPE: something else owns a ticker key. Surface it; never guess.
                raise StoreUnavailable(f"redis refused the read: {reply}")
            it = iter(reply)
            rows.append(
                {
                    k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                    for k, v in zip(it, it, strict=False)
                }
            )
        return rows

    async def close(self) -> None:
        await self._conn.close()


class _Request:
    __slots__ = ("done", "error", "result", "symbols")

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = symbols
        self.done = trio.Event()
        self.result: list[dict[str, str]] = []
        self.error: StoreUnavailable | None = None


class TickerReader:
    def __init__(
        self,
        store: HashStore,
        *,
        native: bool = True,
        key: Callable[[str], str] = ticker_key,
        client_name: str = "marketd-api-reads",
    ) -> None:
        self._store = store
        address = store.tcp_address() if native else None
        self._native = NativeReads(address, client_name, key) if address is not None else None
        self._limiter = trio.CapacityLimiter(1)
        self._waiting: list[_Request] = []
        self._wakeup = trio.Event()
        self._stopped = False
        self._scope = trio.CancelScope()
        self.batches = 0  # round trips made (tests and benches read it)

    async def read(self, symbols: Sequence[str]) -> list[dict[str, str]]:
        """HGETALL of each `ticker:{symbol}` ({} when absent). Raises StoreUnavailable."""
        if self._stopped:
            raise StoreUnavailable("the API's Redis reader is stopped")
        request = _Request(symbols)
        self._waiting.append(request)
        self._wakeup.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    async def ping(self) -> bool:
        try:
            await trio.to_thread.run_sync(self._store.ping, limiter=self._limiter)
        except StoreUnavailable:
            return False
        return True

    def stop(self) -> None:
        """End `run` (after serving); requests still waiting get StoreUnavailable."""
        self._scope.cancel()

    async def close_store(self) -> None:
        """Close the store once no read is in flight (same limiter as the reads)."""
        if self._native is not None:
            await self._native.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._store.close, limiter=self._limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve reads until stop() or cancelled; then fail whatever is still waiting."""
        task_status.started()
        batch: list[_Request] = []
        try:
            with self._scope:
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    batch, self._waiting = self._waiting, []
                    if batch:
                        await self._serve(batch)
        finally:
            if self._native is not None:
                await self._native.close()  # ours, whoever owns the store
            self._stopped = True
            stopped = StoreUnavailable("the API's Redis reader stopped")
            for request in (*batch, *self._waiting):
                if not request.done.is_set():
                    request.error = stopped
                    request.done.set()
            self._waiting = []

    async def _serve(self, batch: list[_Request]) -> None:
        keys = list(dict.fromkeys(s for request in batch for s in request.symbols))
        self.batches += 1
        try:
            if self._native is not None:
                rows = await self._native.read(keys)
            else:
                rows = await trio.to_thread.run_sync(self._store.read, keys, limiter=self._limiter)
        except StoreUnavailable as exc:
            for request in batch:
                request.error = exc
                request.done.set()
            return
        by_key = dict(zip(keys, rows, strict=True))
        for request in batch:
            request.result = [by_key[s] for s in request.symbols]
            request.done.set()
