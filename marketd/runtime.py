"""What every component of the daemon is handed: config, metrics, addresses, health, drain signal.

A component is `async def run(rt: Runtime, *, task_status) -> None`: it calls
`task_status.started()` as soon as it runs (never after waiting for an outside service: that is
`rt.health`, see marketd/health.py), returns once `rt.draining` is set and it has drained what it
accepted, and raises on failure (the supervisor restarts it).
"""

from __future__ import annotations

import time

import attrs
import trio

from marketd.config import Config
from marketd.health import ComponentHealth, Health
from marketd.metrics import MetricsFactory


@attrs.define
class Runtime:
    config: Config
    metrics: MetricsFactory
    kafka_bootstrap: str  # resolved: the embedded cluster's address or the configured brokers
    redis_url: str | None  # resolved: the embedded redis-server's URL or the configured one
    health: Health = attrs.field(factory=Health)
    # Set on the first SIGINT/SIGTERM: stop taking new input, drain, return.
    draining: trio.Event = attrs.field(factory=trio.Event)
    started_at_ms: int = attrs.field(factory=lambda: int(time.time() * 1000))

    def __attrs_post_init__(self) -> None:
        health = self.health
        self.metrics.state_gauge(
            "component_healthy",
            "1 while the component (or part: backfill, analytics) is started and healthy",
            "component",
            health.component_gauge,
        )
        self.metrics.state_gauge(
            "dependency_up",
            "1 while the outside service answers, as last seen by the component using it",
            "dependency",
            health.dependency_gauge,
        )


__all__ = ["ComponentHealth", "Health", "Runtime"]
