"""The daemon: one trio nursery of supervised components, started side by side.

Resolves the embedded Kafka mock cluster and the embedded redis-server when configured, starts
the API, the ticker consumer and the ingest pipeline (those enabled) concurrently -- no start-up
chain between them: each depends only on its own outside services and reports whether it can
reach them in `rt.health`, so one that is unreachable holds up nobody -- and owns the signals:
the first SIGINT/SIGTERM sets `rt.draining` (every component stops taking input and drains), a
second signal or the drain deadline cancels everything. Returns the process exit code.
"""

from __future__ import annotations

import importlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from marketd.config import Config
from marketd.errors import ConfigError, FatalComponentError, MissingDependency
from marketd.kafka.client import EmbeddedCluster, is_embedded
from marketd.logs import get_logger
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime
from marketd.streams import book_symbols
from marketd.supervise import supervise

log = get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _components(cfg: Config) -> list[tuple[str, Callable[..., Awaitable[None]]]]:
    """Enabled components. They start concurrently; the order is only that of the logs."""
    out: list[tuple[str, Callable[..., Awaitable[None]]]] = []
    if cfg.components.api:
        from marketd.api.server import run_api

        out.append(("api", run_api))
    if cfg.components.tickers:
        from marketd.tickers.consume import run_tickers

        out.append(("tickers", run_tickers))
    if cfg.components.ingest:
        from marketd.ingest.pipeline import run_ingest

        out.append(("ingest", run_ingest))
    if cfg.analytics.spark_jobs:
        from marketd.analytics.jobs import NAME, run_spark_jobs

        out.append((NAME, run_spark_jobs))
    return out


@asynccontextmanager
async def _kafka(cfg: Config) -> AsyncIterator[str]:
    needed = cfg.components.ingest or cfg.components.tickers or cfg.analytics.spark_jobs
    if not needed or not is_embedded(cfg.kafka.bootstrap_servers):
        yield cfg.kafka.bootstrap_servers  # an API-only process talks to no Kafka
        return
    cluster = await trio.to_thread.run_sync(EmbeddedCluster)
    log.warning(
        "kafka.embedded_started",
        bootstrap_servers=cluster.bootstrap_servers,
        note="librdkafka mock cluster: in-process, ephemeral, a few MB per partition; "
        "other clients can connect to this address while marketd runs",
    )
    try:
        yield cluster.bootstrap_servers
    finally:
        cluster.close()


@asynccontextmanager
async def _redis(cfg: Config) -> AsyncIterator[str | None]:
    # Ingest needs Redis only for the order books it keeps (book:{SYMBOL}).
    books = cfg.components.ingest and bool(book_symbols(cfg.binance.streams, cfg.book.symbols))
    needed = cfg.components.tickers or cfg.components.api or cfg.analytics.spark_jobs or books
    if not needed:
        yield None
        return
    if cfg.redis.url != "embedded":
        yield cfg.redis.url
        return
    from marketd.tickers.redis_server import embedded_redis

    async with embedded_redis() as url:
        yield url


@asynccontextmanager
async def _postgres(cfg: Config) -> AsyncIterator[Config]:
    """cfg with analytics.postgres_dsn = "embedded" replaced by a private server's DSN."""
    needed = cfg.components.api or cfg.analytics.spark_jobs
    if not needed or cfg.analytics.postgres_dsn.strip().lower() != "embedded":
        yield cfg
        return
    from marketd.analytics.jobs import spark_dir
    from marketd.analytics.postgres import embedded_postgres, with_postgres_dsn

    async with embedded_postgres(cfg.analytics.postgres_dir, spark_dir(cfg)) as dsn:
        yield with_postgres_dsn(cfg, dsn)


async def _watch_signals(
    rt: Runtime,
    everything: trio.CancelScope,
    outcome: dict[str, int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info(
                "daemon.draining",
                signal=name,
                deadline_s=rt.config.shutdown.drain_timeout_s,
                detail="second signal exits immediately",
            )
            _notify("STOPPING=1")
            rt.draining.set()
            break
        with trio.move_on_after(rt.config.shutdown.drain_timeout_s) as deadline:
            async for signum in signals:
                log.warning("daemon.exit_now", signal=signal.Signals(signum).name)
                outcome["code"] = EXIT_INTERRUPTED
                everything.cancel()
                return
        if deadline.cancelled_caught:
            log.error("daemon.drain_timeout", deadline_s=rt.config.shutdown.drain_timeout_s)
            outcome["code"] = EXIT_FAILED
            everything.cancel()


async def _start(
    nursery: trio.Nursery, name: str, component: Callable[..., Awaitable[None]], rt: Runtime
) -> None:
    """Start one supervised component in `nursery`; siblings start at the same time, so one
    that is slow to report started (it never waits for an outside service) delays only READY."""
    await nursery.start(supervise, name, component, rt, rt.config.supervisor)


def _notify(state: str) -> None:
    """systemd readiness (Type=notify), when the sdnotify helper is part of this build."""
    try:
        sdnotify = importlib.import_module("marketd.sdnotify")
    except ImportError:
        return
    sdnotify.notify(state)


async def run_daemon(cfg: Config, *, metrics: MetricsFactory | None = None) -> int:
    metrics = metrics or MetricsFactory()
    outcome = {"code": EXIT_OK}
    components = _components(cfg)
    try:
        async with AsyncExitStack() as stack:
            kafka = await stack.enter_async_context(_kafka(cfg))
            redis_url = await stack.enter_async_context(_redis(cfg))
            cfg = await stack.enter_async_context(_postgres(cfg))
            rt = Runtime(cfg, metrics, kafka, redis_url)
            info = metrics.gauge("info", "static facts about this process", ["components", "shard"])
            info.labels(",".join(n for n, _ in components), cfg.ingest.shard).set(1)
            async with trio.open_nursery() as outer:
                await outer.start(_watch_signals, rt, outer.cancel_scope, outcome)
                async with trio.open_nursery() as nursery:
                    async with trio.open_nursery() as starting:
                        for name, component in components:
                            starting.start_soon(_start, nursery, name, component, rt)
                    log.info(
                        "daemon.started",
                        components=",".join(n for n, _ in components),
                        kafka=kafka,
                        redis=_safe(redis_url),
                    )
                    _notify("READY=1")
                outer.cancel_scope.cancel()  # components are done: stop watching signals
    except* ConfigError as group:
        # A setting found wrong only when a component starts (the API's bind): exit 2.
        log.error("daemon.exit", reason=f"config error: {_first_leaf(group)}")
        outcome["code"] = EXIT_CONFIG
    except* (FatalComponentError, MissingDependency) as group:
        first = _first_leaf(group)
        cause = _first_leaf(first.__cause__) if first.__cause__ is not None else None
        log.error(
            "daemon.exit",
            reason=str(first),
            cause=f"{type(cause).__name__}: {cause}" if cause is not None else None,
        )
        # Restarts cannot fix a configuration error (e.g. the API's port in use): exit 2.
        outcome["code"] = EXIT_CONFIG if isinstance(cause, ConfigError) else EXIT_FAILED
    log.info("daemon.stopped", exit_code=outcome["code"])
    return outcome["code"]


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real exception in (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _safe(url: str | None) -> str | None:
    from marketd.config import redact_value

    return redact_value("redis.url", url) if url else url
