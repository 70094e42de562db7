from __future__ import annotations

import pytest
import trio
import trio.testing

from marketd.config import SupervisorConfig, load_config
from marketd.errors import FatalComponentError
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
