"""Supervision of the daemon's components: restart on failure, give up when it keeps failing.

A component that raises is logged with its traceback and restarted after a capped, full-jitter
backoff. More than `max_failures` failures within `failure_window_s` raise FatalComponentError,
which takes the process down with a non-zero exit so systemd/docker restart it cleanly. A clean
return (after a drain) ends supervision. Nothing is swallowed: every failure is logged.

An outside service that cannot be reached is a state, not a failure: components retry it
themselves and report it in `rt.health`. If a TransientError (Redis, Kafka, a connection) still
escapes a component, it is restarted with the same capped backoff for as long as it takes, marked
unhealthy with the error, and never counted towards the give-up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from marketd.backoff import Backoff
from marketd.config import SupervisorConfig
from marketd.errors import ConfigError, FatalComponentError, TransientError
from marketd.health import error_text
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
            if rt.draining.is_set():
                rt.health.set(name, healthy=False, reason=f"failed: {_describe(exc)}"[:300])
                log.error("component.failed_during_drain", component=name, exc_info=exc)
                raise
            if _configuration(exc):
                # A restart cannot fix a configuration problem (e.g. api.port taken after the
                # CLI's probe): exit 2 with its one line now, not after max_failures tracebacks.
                rt.health.set(name, healthy=False, reason=f"failed: {_describe(exc)}"[:300])
                raise
            if _transient(exc):
                if now - run_started > policy.failure_window_s:
                    backoff.reset()
                delay = backoff.delay()
                rt.health.set(name, healthy=False, reason=f"{_describe(exc)}"[:300])
                log.warning(
                    "component.dependency_unavailable",
                    component=name,
                    error=_describe(exc)[:300],
                    restart_in_s=round(delay, 3),
                    detail="not counted as a failure; retrying for as long as it takes",
                )
                with trio.move_on_after(delay):
                    await rt.draining.wait()
                if rt.draining.is_set():
                    return
                continue
            rt.health.set(name, healthy=False, reason=f"failed: {_describe(exc)}"[:300])
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


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _transient(exc: BaseException) -> bool:
    """Only unreachable outside services (every leaf of a group a TransientError)."""
    leaves = _leaves(exc)
    return bool(leaves) and all(isinstance(e, TransientError) for e in leaves)


def _configuration(exc: BaseException) -> bool:
    return any(isinstance(e, ConfigError) for e in _leaves(exc))


def _describe(exc: BaseException) -> str:
    leaf = _leaves(exc)[0] if isinstance(exc, BaseExceptionGroup) else exc
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else error_text(leaf)
