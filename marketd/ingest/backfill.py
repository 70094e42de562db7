"""Backfill worker: RequestBackfill/RequestKlines in, recovered records out, over Binance REST.

Receives requests from a channel (the continuity gates' actions), pages through REST (fromId /
startTime, 1000 per call, stopping exactly at the end of the range) and hands each page to
`deliver` as a `TradeBackfill`/`KlineBackfill`, in order, then one final result with the ranges
it could not recover and why. Transient REST failures are retried with capped jittered backoff
until `give_up_after_s` after the request started; it then reports the rest as lost. At most
`concurrency` requests run at once; when the channel closes, running requests finish first.
The request and result types, kinds and reasons are repair.py's (pure); they are re-exported
here for the callers that know them by this module.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from marketd.backoff import Backoff
from marketd.errors import TransientError
from marketd.ingest.repair import (
    BACKFILL_HEADER,
    BackfillResult,
    GapKind,
    GapReason,
    KlineBackfill,
    KlinePaging,
    LostRange,
    Request,
    RequestBackfill,
    RequestKlines,
    TradeBackfill,
    TradePaging,
    outcome,
    request_kind,
)
from marketd.ingest.streams import parse_stream
from marketd.ingest.tape import route_result
from marketd.logs import Throttle, get_logger
from marketd.metrics import MetricsFactory
from marketd.records import SCHEMA_VERSION, SOURCE, AggTradeRecord, KlineRecord, TradeRecord
from marketd.rest.client import MAX_LIMIT, BinanceRest, RestAggTrade, RestKline, RestTrade
from marketd.rest.errors import RestBadResponse, RestRateLimited, RestRejected

log = get_logger(__name__)

# The driver, and (re-exported) the pure types and routing it works with.
__all__ = [
    "BACKFILL_HEADER",
    "BackfillResult",
    "Backfiller",
    "KlineBackfill",
    "Request",
    "TradeBackfill",
    "route_result",
    "run_backfill",
]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _GiveUp(Exception):
    """Internal: stop this request; the rest of its range is lost for `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Backfiller:
    def __init__(
        self,
        rest: BinanceRest,
        deliver: Callable[[BackfillResult], Awaitable[None]],
        *,
        give_up_after_s: float,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        metrics: MetricsFactory | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        on_rest: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.rest = rest
        # Told of every call's outcome (None: answered, else the transient error): REST health.
        self.on_rest = on_rest
        self.deliver = deliver
        self.give_up_after_s = give_up_after_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._wall_ms = wall_ms
        self._throttle = Throttle(60.0)
        m = metrics or MetricsFactory()
        self._m_records = m.counter("backfill_records", "records recovered over REST", ["kind"])
        self._m_requests = m.counter(
            "backfill_requests", "backfill requests by outcome", ["kind", "outcome"]
        )

    async def run(self, request: Request) -> None:
        """Serve one request to its end: pages delivered, then the final result. Never raises
        for REST trouble (that becomes `lost`); `deliver`'s own errors propagate."""
        kind = request_kind(request)
        deadline = trio.current_time() + self.give_up_after_s
        log.info("backfill.start", **attrs.asdict(request))
        if isinstance(request, RequestBackfill):
            lost = await self._trades(request, deadline)
            await self.deliver(TradeBackfill(request, [], final=True, lost=tuple(lost)))
        else:
            lost = await self._klines(request, deadline)
            await self.deliver(KlineBackfill(request, [], final=True, lost=tuple(lost)))
        self._m_requests.labels(kind, outcome(request, lost)).inc()
        if lost:
            log.error(
                "backfill.lost",
                kind=kind,
                symbol=request.symbol,
                ranges=[f"{r.from_id}-{r.to_id}:{r.reason}" for r in lost],
            )
        else:
            log.info("backfill.done", kind=kind, symbol=request.symbol)

    # -- trades ---------------------------------------------------------------------------------

    async def _trades(self, req: RequestBackfill, deadline: float) -> list[LostRange]:
        paging = TradePaging.start(req)
        endpoint = (
            self.rest.historical_trades if req.kind == GapKind.TRADES else self.rest.agg_trades
        )
        lagging = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while (limit := paging.limit(MAX_LIMIT)) is not None:
            try:
                rows: Sequence[RestTrade | RestAggTrade] = await self._call(
                    deadline, endpoint, req.symbol, paging.cursor, limit
                )
                if not rows:
                    # Ids the live stream already showed but REST does not have yet: its
                    # database lags. Retry like an outage.
                    await self._retry(deadline, GapReason.REST_LAGGING, lagging, req)
                    continue
            except _GiveUp as exc:
                paging.give_up(exc.reason)
                break
            upto = paging.on_page(_row_id(rows[0]), _row_id(rows[-1]))
            if upto is None:
                break
            now_ms = self._wall_ms()
            page = [self._trade_record(req, row, now_ms) for row in rows if _row_id(row) <= upto]
            self._m_records.labels(req.kind).inc(len(page))
            await self.deliver(TradeBackfill(req, page))
        return paging.lost

    def _trade_record(
        self, req: RequestBackfill, row: RestTrade | RestAggTrade, now_ms: int
    ) -> TradeRecord | AggTradeRecord:
        if isinstance(row, RestTrade):
            return TradeRecord(
                symbol=req.symbol,
                trade_id=row.id,
                price=row.price,
                quantity=row.qty,
                trade_time=row.time,
                event_time=row.time,
                is_buyer_maker=row.is_buyer_maker,
                ingested_at=now_ms,
                source=SOURCE,
                stream=req.symbol.lower() + "@trade",
                schema_version=SCHEMA_VERSION,
                backfill=True,
            )
        return AggTradeRecord(
            symbol=req.symbol,
            agg_trade_id=row.agg_id,
            price=row.price,
            quantity=row.qty,
            first_trade_id=row.first_id,
            last_trade_id=row.last_id,
            trade_time=row.time,
            event_time=row.time,
            is_buyer_maker=row.is_buyer_maker,
            ingested_at=now_ms,
            source=SOURCE,
            stream=req.symbol.lower() + "@aggTrade",
            schema_version=SCHEMA_VERSION,
        )

    # -- klines ---------------------------------------------------------------------------------

    async def _klines(self, req: RequestKlines, deadline: float) -> list[LostRange]:
        paging = KlinePaging.start(req)
        time_zone = parse_stream(req.stream).timezone
        while not paging.done:
            try:
                rows: list[RestKline] = await self._call(
                    deadline,
                    self.rest.klines,
                    req.symbol,
                    req.interval,
                    paging.cursor,
                    req.end_ms,
                    MAX_LIMIT,
                    time_zone=time_zone,
                )
            except _GiveUp as exc:
                paging.give_up(exc.reason)
                break
            now_ms = self._wall_ms()
            rows = [k for k in rows if paging.wanted(k.open_time, k.close_time, now_ms)]
            if not paging.on_page([k.open_time for k in rows]):
                break
            page = [self._kline_record(req, k, now_ms) for k in rows]
            self._m_records.labels(GapKind.KLINES).inc(len(page))
            await self.deliver(KlineBackfill(req, page))
        return paging.lost

    @staticmethod
    def _kline_record(req: RequestKlines, k: RestKline, now_ms: int) -> KlineRecord:
        return KlineRecord(
            symbol=req.symbol,
            interval=req.interval,
            open_time=k.open_time,
            close_time=k.close_time,
            open=k.open,
            high=k.high,
            low=k.low,
            close=k.close,
            volume=k.volume,
            quote_volume=k.quote_volume,
            trades_count=k.trades_count,
            taker_buy_base_volume=k.taker_buy_base_volume,
            taker_buy_quote_volume=k.taker_buy_quote_volume,
            first_trade_id=-1,
            last_trade_id=-1,
            is_closed=True,
            event_time=k.close_time,
            ingested_at=now_ms,
            source=SOURCE,
            stream=req.stream,
            schema_version=SCHEMA_VERSION,
        )

    # -- retries --------------------------------------------------------------------------------

    async def _call(
        self, deadline: float, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
    ) -> Any:
        """One REST call, retried on transient errors until `deadline`; raises _GiveUp."""
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while True:
            # A long 429/418 block waits inside the budget: the deadline bounds that too.
            with trio.move_on_at(deadline):
                try:
                    result = await fn(*args, **kw)
                    if self.on_rest is not None:
                        self.on_rest(None)
                    return result
                except RestRejected as exc:
                    log.error("backfill.rejected", error=str(exc))
                    raise _GiveUp(GapReason.REST_REJECTED) from exc
                except TransientError as exc:
                    if self.on_rest is not None:
                        self.on_rest(exc)
                    reason = _reason(exc)
                    self._log_retry(reason, exc)
                    delay = backoff.delay()
                    if trio.current_time() + delay >= deadline:
                        raise _GiveUp(reason) from exc
                    await trio.sleep(delay)
                    continue
            raise _GiveUp(GapReason.REST_UNAVAILABLE)

    async def _retry(self, deadline: float, reason: str, backoff: Backoff, req: Request) -> None:
        delay = backoff.delay()
        if trio.current_time() + delay >= deadline:
            raise _GiveUp(reason)
        self._log_retry(reason, None, symbol=req.symbol)
        await trio.sleep(delay)

    def _log_retry(self, reason: str, exc: BaseException | None, **fields: Any) -> None:
        suppressed = self._throttle.should_log(reason, trio.current_time())
        if suppressed is not None:
            log.warning(
                "backfill.retry",
                reason=reason,
                error=str(exc) if exc else "",
                suppressed_since_last=suppressed,
                **fields,
            )


async def run_backfill(
    requests_rx: trio.MemoryReceiveChannel[Request],
    rest: BinanceRest,
    deliver: Callable[[BackfillResult], Awaitable[None]],
    *,
    give_up_after_s: float,
    concurrency: int = 4,
    metrics: MetricsFactory | None = None,
    on_rest: Callable[[BaseException | None], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve requests until `requests_rx` closes and the running ones have finished."""
    backfiller = Backfiller(
        rest, deliver, give_up_after_s=give_up_after_s, metrics=metrics, on_rest=on_rest
    )
    slots = trio.Semaphore(concurrency)

    async def serve(request: Request) -> None:
        try:
            await backfiller.run(request)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        async with requests_rx:
            async for request in requests_rx:
                # Full: stop taking requests, so the channel applies backpressure upstream.
                await slots.acquire()
                nursery.start_soon(serve, request)


def _row_id(row: RestTrade | RestAggTrade) -> int:
    return row.id if isinstance(row, RestTrade) else row.agg_id


def _reason(exc: BaseException) -> GapReason:
    if isinstance(exc, RestRateLimited):
        return GapReason.RATE_LIMITED
    if isinstance(exc, RestBadResponse):
        return GapReason.REST_BAD_RESPONSE
    return GapReason.REST_UNAVAILABLE
