"""Health of the daemon's components and of the outside services they depend on.

Components write their state here (`Health.set`, `Health.dependency`); /readyz, `marketd health`
and the `marketd_component_healthy` / `marketd_dependency_up` gauges read it. "Started" (the task
runs) and "healthy" (it does its job now) are separate: an unreachable dependency makes a component
unhealthy with a reason naming the dependency, the error and since when; it is never a failure.
Pure bookkeeping: no trio, no I/O.
"""

from __future__ import annotations

import enum
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import attrs

from marketd.errors import MarketdError


class Dependency(enum.StrEnum):
    """Outside services, as named in readyz and the `dependency` label."""

    REDIS = "redis"
    KAFKA = "kafka"
    BINANCE_WS = "binance_ws"
    BINANCE_REST = "binance_rest"
    POSTGRES = "postgres"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def utc_stamp(ms: int) -> str:
    """`12:48:06Z`-style time of day for reasons; the full date is in `since`."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%SZ")


def iso_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def error_text(exc: BaseException) -> str:
    """The most telling message of an error: the OS error behind a client library's wrapper
    (`Connection refused`), else `Type: message`."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not c for c in chain):
        chain.append(cur)
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        cur = cur.__cause__ or cur.__context__
    # Our own wrappers (StoreUnavailable, ...) only repeat the library's message.
    telling = next((c for c in chain if not isinstance(c, MarketdError)), exc)
    text = str(telling).strip()
    return f"{type(telling).__name__}: {text}" if text else type(telling).__name__


def address(url: str) -> str:
    """`host:port` of a service URL (no credentials, no path) for reasons and logs."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


@attrs.define
class ComponentHealth:
    started: bool = False
    healthy: bool = False
    reason: str = "starting"
    since_ms: int = attrs.field(factory=_now_ms)  # when `healthy` last changed

    def view(self) -> dict[str, Any]:
        reason = self.reason
        if not self.healthy and self.started:
            reason = f"{reason}, since {utc_stamp(self.since_ms)}"
        return {
            "started": self.started,
            "healthy": self.healthy,
            "reason": reason,
            "since": iso_utc(self.since_ms),
            "since_ms": self.since_ms,
        }


@attrs.define
class DependencyState:
    up: bool
    reason: str
    since_ms: int = attrs.field(factory=_now_ms)

    def view(self) -> dict[str, Any]:
        return {"up": self.up, "reason": self.reason, "since": iso_utc(self.since_ms)}


@attrs.define
class Health:
    """Component name -> health and dependency name -> reachability.

    Besides the configured components (ingest, tickers, api), a component may register a part
    with its own dependency as an entry of its own (`backfill`: Binance REST, `analytics`:
    PostgreSQL), so the part's outage shows without calling the whole component unhealthy.
    """

    components: dict[str, ComponentHealth] = attrs.field(factory=dict)
    dependencies: dict[str, DependencyState] = attrs.field(factory=dict)

    def set(
        self,
        name: str,
        *,
        started: bool | None = None,
        healthy: bool,
        reason: str = "",
        detail: str | None = None,  # older name of `reason`
    ) -> None:
        text = reason or detail or ""
        current = self.components.setdefault(name, ComponentHealth())
        if current.healthy != healthy or (started is not None and started != current.started):
            current.since_ms = _now_ms()
        if started is not None:
            current.started = started
        current.healthy = healthy
        current.reason = text

    def dependency(self, name: Dependency | str, *, up: bool, reason: str = "") -> None:
        key = str(name)
        current = self.dependencies.get(key)
        if current is None or current.up != up:
            self.dependencies[key] = DependencyState(up, reason)
        else:
            current.reason = reason

    def part(
        self, name: str, dependency: Dependency, problem: str | None, *, ok: str, meanwhile: str
    ) -> None:
        """A part with one dependency of its own (`backfill`, `analytics`), in one call: the
        dependency is up ("answering") or down with `problem`; the part is healthy with `ok`, or
        unhealthy with `problem` and what that means `meanwhile`."""
        self.dependency(dependency, up=problem is None, reason=problem or "answering")
        self.set(
            name,
            started=True,
            healthy=problem is None,
            reason=f"{problem}; {meanwhile}" if problem else ok,
        )

    def forget(self, name: str) -> None:
        self.components.pop(name, None)

    def entries(self, enabled: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """What /readyz shows: every enabled component, then the registered parts."""
        out: dict[str, dict[str, Any]] = {}
        for name in enabled:
            h = self.components.get(name)
            out[name] = (
                h.view()
                if h is not None
                else {"started": False, "healthy": False, "reason": "not started"}
            )
        for name, h in self.components.items():
            if name not in out:
                out[name] = h.view()
        return out

    def ready(self, enabled: tuple[str, ...]) -> bool:
        return all(e["started"] and e["healthy"] for e in self.entries(enabled).values())

    def component_gauge(self) -> dict[str, float]:
        return {n: 1.0 if h.started and h.healthy else 0.0 for n, h in self.components.items()}

    def dependency_gauge(self) -> dict[str, float]:
        return {n: 1.0 if d.up else 0.0 for n, d in self.dependencies.items()}
