"""The API component: the Quart-Trio app served by Hypercorn inside the daemon's nursery.

Binds API_HOST:API_PORT, calls started() once listening (logs `api.listening`), and shuts down
gracefully when `rt.draining` is set: Hypercorn stops accepting, lets in-flight requests finish
(bounded by GRACEFUL_TIMEOUT_S), then the app's lifespan stops its Redis reader. An address it
cannot listen on is an ApiBindError (a one-line configuration error, exit 2). Connections close
as HTTP says they should (HTTP/1.0, `Connection: close`, KEEP_ALIVE_S idle): see
marketd/api/middleware.py CloseAfterResponse for the Quart-Trio/Hypercorn interaction that
prevented it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from marketd.api.app import API_COMPONENT, create_app
from marketd.api.bind import bind_error, probe_bind
from marketd.logs import get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)

GRACEFUL_TIMEOUT_S: Final = 5.0  # in-flight requests get this long after the drain signal
KEEP_ALIVE_S: Final = 5.0


def hypercorn_config(host: str, port: int) -> HyperConfig:
    config = HyperConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # per-request lines would flood; /metrics counts requests
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    return config


async def serve_app(
    app: Any,
    config: HyperConfig,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns; started() with the bound (host, port) pairs."""

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        addresses = []
        for bind in binds:
            parts = urlsplit(bind)
            addresses.append((parts.hostname or "", parts.port or 0))
        task_status.started(addresses)


async def run_api(
    rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Component entry point: started() once listening; returns after the drain."""
    cfg = rt.config.api
    rt.health.set(API_COMPONENT, started=False, healthy=False, detail="starting")
    # Probe the address first (with sockets closed whatever happens: Hypercorn's own failed bind
    # leaves its socket to the garbage collector), so a bad api.host/api.port fails here.
    where = ("at start-up", "at start-up")
    await trio.to_thread.run_sync(probe_bind, cfg.host, cfg.port, where)
    app = create_app(rt)
    listening = False
    try:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                functools.partial(serve_app, app, hypercorn_config(cfg.host, cfg.port)),
                rt.draining.wait,
            )
            listening = True
            for host, port in addresses:
                log.info("api.listening", host=host, port=port)
            rt.health.set(API_COMPONENT, started=True, healthy=True, detail="listening")
            task_status.started()
    except (OSError, BaseExceptionGroup) as exc:
        # The probe passed but the address was taken in between: the same one-line error.
        failure = None if listening else _os_error(exc)
        if failure is None:
            raise
        raise bind_error(failure, cfg.host, cfg.port, where) from exc
    finally:
        rt.health.set(API_COMPONENT, healthy=False, detail="stopped")
    log.info("api.stopped")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError of a failed bind, alone or in (nested) exception groups, else None."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_os_error(e) for e in exc.exceptions]
        if len(leaves) == 1:
            return leaves[0]
    return None
