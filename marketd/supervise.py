"""Supervision of the daemon's components: restart on failure, give up when it keeps failing.

A component that raises is logged with its traceback and restarted after a capped, full-jitter
backoff. More than `max_failures` failures within `failure_window_s` raise FatalComponentError,
which takes the process down with a non-zero exit so systemd/docker restart it cleanly. A clean
return (after a drain) ends supervision. Nothing is swallowed: every failure is logged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from marketd.backoff import Backoff
from marketd.config import SupervisorConfig
from marketd.errors import FatalComponentError
from marketd.logs import get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)


class _OnceStatus:
    """Forwards the first started() to the nursery; restarts report to nobody."""

    def __init__(self, outer: trio.TaskStatus[None]) -> None:
        self._outer = outer
        self.started_once = False

    def started(self, value: None = None) -> None:
        if not self.started_once:
            self.started_once = True
            self._outer.started(value)


async def supervise(
    name: str,
    component: Callable[..., Awaitable[None]],
    rt: Runtime,
    policy: SupervisorConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    status = _OnceStatus(task_status)
    failures: deque[float] = deque()
    backoff = Backoff(policy.backoff_initial_s, policy.backoff_max_s)
    restarts = rt.metrics.counter("component_restarts", "component failures", ["component"])
    while True:
        run_started = trio.current_time()
        try:
            await component(rt, task_status=status)
            return
        except Exception as exc:
            now = trio.current_time()
            restarts.labels(name).inc()
            rt.health.set(name, healthy=False, detail=f"failed: {type(exc).__name__}: {exc}"[:300])
            if rt.draining.is_set():
                log.error("component.failed_during_drain", component=name, exc_info=exc)
                raise
            failures.append(now)
            while failures and now - failures[0] > policy.failure_window_s:
                failures.popleft()
            if len(failures) > policy.max_failures:
                log.error(
                    "component.giving_up",
                    component=name,
                    failures=len(failures),
                    window_s=policy.failure_window_s,
                    exc_info=exc,
                )
                raise FatalComponentError(
                    f"{name} failed {len(failures)} times in {policy.failure_window_s:g}s"
                ) from exc
            if now - run_started > policy.failure_window_s:
                backoff.reset()
            delay = backoff.delay()
            log.error(
                "component.failed",
                component=name,
                restart_in_s=round(delay, 3),
                failures=len(failures),
                exc_info=exc,
            )
            with trio.move_on_after(delay):
                await rt.draining.wait()
            if rt.draining.is_set():
                return
