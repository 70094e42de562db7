"""What every component of the daemon is handed: config, metrics, addresses, health, drain signal.

A component is `async def run(rt: Runtime, *, task_status) -> None`: it calls
`task_status.started()` once it is ready to accept input, returns once `rt.draining` is set and it
has drained what it accepted, and raises on failure (the supervisor restarts it).
"""

from __future__ import annotations

import time

import attrs
import trio

from marketd.config import Config
from marketd.metrics import MetricsFactory


@attrs.define
class ComponentHealth:
    started: bool = False
    healthy: bool = False
    detail: str = "starting"
    since_ms: int = attrs.field(factory=lambda: int(time.time() * 1000))


@attrs.define
class Health:
    """Component name -> health, read by /readyz and `marketd health`."""

    components: dict[str, ComponentHealth] = attrs.field(factory=dict)

    def set(
        self, name: str, *, started: bool | None = None, healthy: bool, detail: str = ""
    ) -> None:
        current = self.components.setdefault(name, ComponentHealth())
        changed = current.healthy != healthy or current.detail != detail
        if started is not None:
            current.started = started
        current.healthy = healthy
        current.detail = detail
        if changed:
            current.since_ms = int(time.time() * 1000)

    def ready(self, enabled: tuple[str, ...]) -> bool:
        return all(
            (h := self.components.get(n)) is not None and h.started and h.healthy for n in enabled
        )


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
