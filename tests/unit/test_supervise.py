from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from marketd.config import SupervisorConfig, load_config
from marketd.errors import (
    ApiBindError,
    FatalComponentError,
    KafkaUnavailable,
    StoreUnavailable,
)
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime
from marketd.supervise import supervise


def runtime() -> Runtime:
    return Runtime(load_config(environ={}, dotenv=None).config, MetricsFactory(), "x", None)


async def test_failing_component_restarts_then_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()
    runs = []

    async def flaky(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise RuntimeError("boom")
        task_status.started()
        await rt.draining.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "flaky", flaky, rt, SupervisorConfig(max_failures=5))
        assert len(runs) == 3
        rt.draining.set()
    assert runs[1] > runs[0]  # waited a backoff before restarting


async def test_component_that_keeps_failing_takes_the_process_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()

    async def broken(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        raise ValueError("always")

    with pytest.raises(FatalComponentError, match="broken failed 4 times") as info:
        await supervise("broken", broken, rt, SupervisorConfig(max_failures=3, backoff_max_s=1))
    assert isinstance(info.value.__cause__, ValueError)


async def test_configuration_error_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()
    runs = []

    async def misconfigured(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        runs.append(1)
        raise ApiBindError("api.port", "env API_PORT", "8000: already in use")

    with pytest.raises(ApiBindError):
        await supervise("api", misconfigured, rt, SupervisorConfig(max_failures=3))
    assert runs == [1]
    assert not rt.health.components["api"].healthy


async def test_clean_return_ends_supervision(autojump_clock: trio.testing.MockClock) -> None:
    rt = runtime()
    calls = []

    async def once(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        calls.append(1)
        task_status.started()

    await supervise("once", once, rt, SupervisorConfig())
    assert calls == [1]


async def test_restarted_component_redeclares_its_metrics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()
    runs = []

    async def declares(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        counter = rt.metrics.counter("things", "things seen", ["kind"])
        counter.labels("x").inc()
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        task_status.started()

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "a", declares, rt, SupervisorConfig())
        await nursery.start(supervise, "b", declares, rt, SupervisorConfig())
    assert b'marketd_things_total{kind="x"} 4.0' in rt.metrics.exposition()


async def test_unreachable_dependency_is_retried_forever_and_never_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A TransientError (Redis, Kafka, a connection) is a state: restarted with capped backoff
    far past max_failures, reported unhealthy with its reason, never FatalComponentError."""
    rt = runtime()
    runs = []

    async def waits_for_redis(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        runs.append(trio.current_time())
        task_status.started()
        if len(runs) <= 20:
            raise StoreUnavailable("redis: Error 111 connecting to 127.0.0.1:6379.")
        await rt.draining.wait()

    policy = SupervisorConfig(max_failures=2, failure_window_s=600, backoff_max_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "tickers", waits_for_redis, rt, policy)
        while len(runs) < 3:
            await trio.sleep(0.1)
        health = rt.health.components["tickers"]
        assert not health.healthy and "StoreUnavailable: redis: Error 111" in health.reason
        while len(runs) <= 20:
            await trio.sleep(1)
        rt.draining.set()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert max(gaps) <= 5.0 + 1e-9  # capped backoff
    assert len(runs) == 21


async def test_group_of_transient_errors_is_transient_but_a_mixed_one_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rt = runtime()

    async def mixed(
        rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        raise ExceptionGroup("both", [KafkaUnavailable("down"), ValueError("bug")])

    with pytest.raises(FatalComponentError, match="mixed failed 3 times"):
        await supervise("mixed", mixed, rt, SupervisorConfig(max_failures=2, backoff_max_s=1))
