"""WeightBudget on virtual time: reservation, server reconciliation, 429/418 blocks."""

from __future__ import annotations

import logging

import pytest
import trio

from marketd.metrics import MetricsFactory
from marketd.rest.budget import WeightBudget


async def test_requests_within_the_budget_do_not_wait(autojump_clock: trio.abc.Clock) -> None:
    budget = WeightBudget(100)
    start = trio.current_time()
    for _ in range(4):
        await budget.acquire(25)
    assert trio.current_time() == start
    assert budget.used() == 100


async def test_over_budget_waits_for_the_oldest_weight_to_expire(
    autojump_clock: trio.abc.Clock,
) -> None:
    budget = WeightBudget(100)
    start = trio.current_time()
    await budget.acquire(60)
    await trio.sleep(10)
    await budget.acquire(30)
    await budget.acquire(30)
    assert trio.current_time() == pytest.approx(start + 60)
    assert budget.used() == 60


async def test_server_reported_weight_counts_against_the_budget(
    autojump_clock: trio.abc.Clock,
) -> None:
    metrics = MetricsFactory()
    budget = WeightBudget(100, metrics=metrics)
    await budget.acquire(10)
    budget.observe(200, used_weight=90, retry_after_s=None)  # another process on this IP
    assert budget.used() == 90
    assert metrics.registry.get_sample_value("marketd_rest_weight_server_used") == 90
    start = trio.current_time()
    await budget.acquire(20)
    assert trio.current_time() == pytest.approx(start + 60)
    # A lower server figure never lowers our (conservative) estimate.
    budget.observe(200, used_weight=5, retry_after_s=None)
    assert budget.used() == 20


async def test_429_blocks_every_request_until_retry_after(autojump_clock: trio.abc.Clock) -> None:
    budget = WeightBudget(1000)
    start = trio.current_time()
    budget.observe(429, used_weight=None, retry_after_s=30)
    done: list[float] = []

    async def request() -> None:
        await budget.acquire(1)
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(request)
    assert done == [pytest.approx(30)] * 3


async def test_429_without_retry_after_blocks_a_minute(autojump_clock: trio.abc.Clock) -> None:
    budget = WeightBudget(1000)
    start = trio.current_time()
    budget.observe(429, used_weight=None, retry_after_s=None)
    await budget.acquire(1)
    assert trio.current_time() - start == pytest.approx(60)


async def test_418_blocks_until_the_ban_ends_and_logs_an_error(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = MetricsFactory()
    budget = WeightBudget(1000, metrics=metrics)
    start = trio.current_time()
    with caplog.at_level(logging.ERROR, logger="marketd.rest.budget"):
        budget.observe(418, used_weight=6100, retry_after_s=120)
    assert [r.getMessage() for r in caplog.records] == ["rest.banned"]
    assert metrics.registry.get_sample_value("marketd_rest_blocked_total", {"status": "418"}) == 1
    await budget.acquire(1)
    assert trio.current_time() - start == pytest.approx(120)


async def test_a_large_request_is_not_starved_by_small_ones(autojump_clock: trio.abc.Clock) -> None:
    budget = WeightBudget(100)
    await budget.acquire(90)
    order: list[str] = []

    async def request(name: str, weight: int) -> None:
        await budget.acquire(weight)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "big", 50)
        await trio.sleep(1)
        for i in range(3):
            nursery.start_soon(request, f"small{i}", 5)
            await trio.lowlevel.checkpoint()
    assert order[0] == "big"


async def test_impossible_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        await WeightBudget(10).acquire(11)
