"""Backfill worker against a scripted REST endpoint (httpx.MockTransport, virtual time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
import trio

from marketd.ingest.backfill import (
    Backfiller,
    BackfillResult,
    KlineBackfill,
    TradeBackfill,
    route_result,
    run_backfill,
)
from marketd.ingest.continuity import (
    Emit,
    KlineGate,
    LostRange,
    PublishGap,
    RequestBackfill,
    RequestKlines,
    TradeGate,
)
from marketd.metrics import MetricsFactory
from marketd.records import TradeRecord
from marketd.rest import BinanceRest, WeightBudget

MIN = 60_000
NOW_MS = 10_000 * MIN


class FakeRest:
    """historicalTrades/aggTrades/klines over a tape of ids oldest..newest, with faults."""

    def __init__(self, oldest: int = 0, newest: int = 100_000) -> None:
        self.oldest = oldest
        self.newest = newest
        self.fail: Callable[[httpx.Request], httpx.Response | None] = lambda r: None
        self.requests: list[httpx.Request] = []
        self.missing: set[int] = set()
        self.ignore_limit = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        failed = self.fail(request)
        if failed is not None:
            return failed
        p = request.url.params
        if request.url.path == "/api/v3/klines":
            return self._klines(int(p["startTime"]), int(p["endTime"]), int(p["limit"]))
        start = max(int(p["fromId"]), self.oldest)
        limit = int(p["limit"]) if not self.ignore_limit else 1000
        ids = [
            i for i in range(start, min(start + limit, self.newest + 1)) if i not in self.missing
        ]
        if request.url.path == "/api/v3/aggTrades":
            rows: list[Any] = [
                {"a": i, "p": "1.5", "q": "2", "f": 3 * i, "l": 3 * i + 2, "T": i, "m": True}
                for i in ids
            ]
        else:
            rows = [
                {"id": i, "price": "1.5", "qty": "2", "time": 1000 + i, "isBuyerMaker": False}
                for i in ids
            ]
        return httpx.Response(200, json=rows, headers={"X-MBX-USED-WEIGHT-1M": "25"})

    def _klines(self, start: int, end: int, limit: int) -> httpx.Response:
        first = -(-start // MIN) * MIN
        rows = []
        for t in range(first, end + 1, MIN):
            if t // MIN in self.missing:
                continue
            rows.append([t, "1", "2", "0.5", "1.5", "10", t + MIN - 1, "15", 7, "4", "6", "0"])
            if len(rows) == limit:
                break
        return httpx.Response(200, json=rows)


def rest(fake: FakeRest, metrics: MetricsFactory | None = None) -> BinanceRest:
    return BinanceRest(
        "http://rest.test", WeightBudget(4800), transport=httpx.MockTransport(fake), metrics=metrics
    )


async def backfill(
    fake: FakeRest, request: Any, give_up_after_s: float = 300.0, **kw: Any
) -> list[BackfillResult]:
    results: list[BackfillResult] = []

    async def deliver(result: BackfillResult) -> None:
        results.append(result)

    async with rest(fake) as client:
        worker = Backfiller(
            client, deliver, give_up_after_s=give_up_after_s, wall_ms=lambda: NOW_MS, **kw
        )
        await worker.run(request)
    return results


def trade_ids(results: list[BackfillResult]) -> list[int]:
    out = []
    for r in results:
        for rec in r.records:
            out.append(rec.trade_id if isinstance(rec, TradeRecord) else rec.agg_trade_id)  # type: ignore[union-attr]
    return out


async def test_pages_through_the_range_and_stops_exactly_at_its_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRest()
    req = RequestBackfill("BTCUSDT", 101, 2600, "trades", "reconnect")
    results = await backfill(fake, req)
    assert [(r.url.params["fromId"], r.url.params["limit"]) for r in fake.requests] == [
        ("101", "1000"),
        ("1101", "1000"),
        ("2101", "500"),
    ]
    assert trade_ids(results) == list(range(101, 2601))
    assert results[-1].final and results[-1].lost == ()
    rec = results[0].records[0]
    assert isinstance(rec, TradeRecord)
    assert (rec.symbol, rec.stream, rec.backfill, rec.trade_time, rec.event_time) == (
        "BTCUSDT", "btcusdt@trade", True, 1101, 1101,
    )  # fmt: skip
    assert b'"backfill":true' in msgspec.json.encode(rec)


async def test_rows_beyond_the_range_are_cut(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    fake.ignore_limit = True
    results = await backfill(fake, RequestBackfill("BTCUSDT", 10, 14, "trades", "id_jump"))
    assert trade_ids(results) == [10, 11, 12, 13, 14]


async def test_history_too_old_repairs_the_part_that_exists(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest(oldest=500)
    results = await backfill(fake, RequestBackfill("BTCUSDT", 100, 700, "trades", "reconnect"))
    assert trade_ids(results) == list(range(500, 701))
    assert results[-1].lost == (LostRange(100, 499, "history_too_old"),)


async def test_range_entirely_too_old(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest(oldest=5000)
    results = await backfill(fake, RequestBackfill("BTCUSDT", 100, 700, "trades", "reconnect"))
    assert trade_ids(results) == []
    assert results[-1].lost == (LostRange(100, 700, "history_too_old"),)


async def test_gives_up_after_the_deadline_when_rest_stays_down(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRest()
    fake.fail = lambda r: httpx.Response(503)
    start = trio.current_time()
    results = await backfill(fake, RequestBackfill("BTCUSDT", 1, 10, "trades", "reconnect"), 120)
    assert trio.current_time() - start <= 120
    assert len(fake.requests) > 3  # it retried
    (final,) = results
    assert final.final and final.lost == (LostRange(1, 10, "rest_unavailable"),)


async def test_retries_through_a_short_outage(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    calls = {"n": 0}

    def flaky(r: httpx.Request) -> httpx.Response | None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise httpx.ConnectError("refused", request=r)
        return None

    fake.fail = flaky
    results = await backfill(fake, RequestBackfill("BTCUSDT", 1, 10, "trades", "reconnect"))
    assert trade_ids(results) == list(range(1, 11))
    assert results[-1].lost == ()


async def test_a_429_waits_retry_after_then_repairs(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    limited = {"once": True}

    def once(r: httpx.Request) -> httpx.Response | None:
        if limited.pop("once", False):
            return httpx.Response(429, json={"code": -1003}, headers={"Retry-After": "30"})
        return None

    fake.fail = once
    start = trio.current_time()
    results = await backfill(fake, RequestBackfill("BTCUSDT", 1, 10, "trades", "reconnect"))
    assert trio.current_time() - start >= 30
    assert trade_ids(results) == list(range(1, 11))


async def test_a_rejected_request_is_lost_at_once(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    fake.fail = lambda r: httpx.Response(400, json={"code": -1121, "msg": "Invalid symbol."})
    results = await backfill(fake, RequestBackfill("NOPE", 1, 10, "trades", "reconnect"))
    assert len(fake.requests) == 1
    assert results[-1].lost == (LostRange(1, 10, "rest_rejected"),)


async def test_lagging_rest_is_retried_until_it_has_the_ids(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest(newest=5)
    req = RequestBackfill("BTCUSDT", 1, 10, "trades", "id_jump")

    async def catch_up() -> None:
        await trio.sleep(5)
        fake.newest = 100

    async with trio.open_nursery() as nursery:
        nursery.start_soon(catch_up)
        results = await backfill(fake, req)
    assert trade_ids(results) == list(range(1, 11))


async def test_agg_trades(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    results = await backfill(fake, RequestBackfill("ETHUSDT", 7, 9, "agg_trades", "reconnect"))
    assert fake.requests[0].url.path == "/api/v3/aggTrades"
    assert trade_ids(results) == [7, 8, 9]
    rec = results[0].records[0]
    assert rec.stream == "ethusdt@aggTrade"


async def test_klines_are_closed_records_of_the_requested_range(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRest()
    fake.missing = {12}  # Binance produced no 12th-minute kline (e.g. a BREAK)
    req = RequestKlines(
        "btcusdt@kline_1m", "BTCUSDT", "1m", 10 * MIN + 1, 15 * MIN - 1, "reconnect"
    )
    results = await backfill(fake, req)
    assert all(isinstance(r, KlineBackfill) for r in results)
    records = [k for r in results for k in r.records]
    assert [k.open_time // MIN for k in records] == [11, 13, 14]
    k = records[0]
    assert (k.is_closed, k.stream, k.event_time, k.first_trade_id) == (
        True, "btcusdt@kline_1m", k.close_time, -1,
    )  # fmt: skip
    assert results[-1].lost == (LostRange(12 * MIN, 12 * MIN, "not_on_rest"),)
    assert "timeZone" not in fake.requests[0].url.params


async def test_timezone_klines_ask_for_their_timezone(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    req = RequestKlines("btcusdt@kline_1h@+08:00", "BTCUSDT", "1h", 0, MIN, "reconnect")
    await backfill(fake, req)
    assert fake.requests[0].url.params["timeZone"] == "+08:00"


async def test_gap_to_ordered_tape_end_to_end(autojump_clock: trio.abc.Clock) -> None:
    """Gate -> request channel -> run_backfill -> deliver -> gate: the tape comes out whole."""
    fake = FakeRest(oldest=0)
    fake.missing = {1500}
    gate: TradeGate[TradeRecord] = TradeGate(gap_grace_s=0.0)
    tape: list[Any] = []
    requests_tx, requests_rx = trio.open_memory_channel[Any](16)

    def handle(actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, RequestBackfill):
                requests_tx.send_nowait(a)
            else:
                tape.append(a)

    async def deliver(result: BackfillResult) -> None:
        handle(route_result(result, trades=gate, klines=None, wrap=lambda r: r, now=0.0))

    def live(i: int) -> TradeRecord:
        return TradeRecord("BTCUSDT", i, "1", "1", i, i, False, 0, "binance", "btcusdt@trade", 1)

    metrics = MetricsFactory()
    async with rest(fake) as client, trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_backfill(
                requests_rx,
                client,
                deliver,
                give_up_after_s=60,
                metrics=metrics,
                task_status=task_status,
            )
        )
        handle(gate.on_live("BTCUSDT", 1000, live(1000), now=0.0))
        gate.on_reconnect()
        handle(gate.on_live("BTCUSDT", 3000, live(3000), now=0.0))
        handle(gate.on_live("BTCUSDT", 3001, live(3001), now=0.0))
        await trio.sleep(10)
        requests_tx.close()

    ids = [a.record.trade_id for a in tape if isinstance(a, Emit)]
    assert ids == [i for i in range(1000, 3002) if i != 1500]
    backfilled = [a.record.trade_id for a in tape if isinstance(a, Emit) and a.backfill]
    assert backfilled == [i for i in range(1001, 3000) if i != 1500]
    gap_records = [a.gap for a in tape if isinstance(a, PublishGap)]
    assert [(g.from_id, g.to_id, g.reason, g.repaired) for g in gap_records] == [
        (1500, 1500, "not_on_rest", False)
    ]
    assert (
        metrics.registry.get_sample_value("marketd_backfill_records_total", {"kind": "trades"})
        == 1998
    )


async def test_kline_results_route_through_the_kline_gate(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRest()
    req = RequestKlines("btcusdt@kline_1m", "BTCUSDT", "1m", 1, 3 * MIN - 1, "reconnect")
    gate: KlineGate[Any] = KlineGate()
    gate.on_live("btcusdt@kline_1m", "BTCUSDT", "1m", MIN, 2 * MIN, True, "live")
    actions: list[Any] = []
    for result in await backfill(fake, req):
        actions += route_result(result, trades=None, klines=gate, wrap=lambda r: r, now=0.0)
    assert [a.record.open_time // MIN for a in actions] == [2]  # minute 1 was already closed live


@pytest.mark.parametrize("kind", ["trades", "agg_trades"])
async def test_route_needs_the_matching_gate(kind: str) -> None:
    result = TradeBackfill(RequestBackfill("X", 1, 2, kind, "id_jump"), [], final=True)
    with pytest.raises(ValueError, match="no trade gate"):
        route_result(result, trades=None, klines=None, wrap=lambda r: r, now=0.0)
