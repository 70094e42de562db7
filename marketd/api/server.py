"""The API component: the Quart-Trio app served by Hypercorn inside the daemon's nursery.

Binds API_HOST:API_PORT, calls started() once listening (logs `api.listening`), and shuts down
gracefully when `rt.draining` is set: Hypercorn stops accepting, lets in-flight requests finish
(bounded by GRACEFUL_TIMEOUT_S), then the app's lifespan stops its Redis reader. An address it
cannot listen on is an ApiBindError (a one-line configuration error, exit 2). Connections close
as HTTP says they should (HTTP/1.0, `Connection: close`, KEEP_ALIVE_S idle): see
CloseAfterResponse for the Quart-Trio/Hypercorn interaction that prevented it.
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


class CloseAfterResponse:
    """ASGI middleware: the app hears `http.disconnect` only once its last send has returned.

    Quart-Trio runs each request as two tasks in one nursery: one sends the response, one waits
    for `http.disconnect` and cancels the nursery when it comes. Hypercorn-trio delivers that
    disconnect from *inside* the app's last `send`, which then goes on to close the socket (for
    HTTP/1.0 and `Connection: close`) or to arm the keep-alive timer. The cancellation landed on
    the next checkpoint of that very send, so the socket was never closed and the idle timer
    never armed: such clients hung until they gave up, and idle connections stayed open for
    ever (one file descriptor each). Holding the disconnect back until the last send is done lets
    Hypercorn finish its bookkeeping. (A shielding cancel scope around the last send works too
    but costs more per request, and would also shield it from a shutdown's cancellation.)
    Upstream: pgjones/hypercorn issue #330 ("Connection:close ignored?").
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        last_sent: trio.Event | None = None  # set once the response's last send has returned

        async def send_tracking_last(message: Any) -> None:
            nonlocal last_sent
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                last_sent = trio.Event()
                try:
                    await send(message)
                finally:
                    last_sent.set()
            else:
                await send(message)

        async def receive_after_last() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect" and last_sent is not None:
                await last_sent.wait()
            return message

        await self.app(scope, receive_after_last, send_tracking_last)


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
    app = CloseAfterResponse(create_app(rt))
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
