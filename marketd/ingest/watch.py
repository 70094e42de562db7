"""Ingest health: is every WebSocket connection open and delivering, does Kafka acknowledge?

`assess_links` is pure: it takes the connections' states (marketd/ingest/source.py) and the wall
clock and names what is wrong. `watch_ingest` runs beside the pipeline, once a second, and writes
the verdict to `rt.health` ("ingest", dependencies binance_ws and kafka). Kafka is judged by its
acknowledgements; when none came lately, a metadata request (bounded) asks a broker directly, so
an idle or frozen cluster is seen within seconds. It only reports: retrying and spooling are the
connections' and the producer stage's business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import trio

from marketd.health import Dependency, address
from marketd.ingest.produce import KafkaSink
from marketd.ingest.source import ConnectionState
from marketd.logs import get_logger
from marketd.rest.errors import RestError
from marketd.runtime import Runtime

log = get_logger(__name__)

COMPONENT: Final = "ingest"
CHECK_INTERVAL_S: Final = 1.0
# An acknowledgement this recent proves Kafka answers; otherwise ask with a metadata request.
ACK_FRESH_S: Final = 3.0
PROBE_TIMEOUT_S: Final = 2.0


@attrs.frozen
class LinksVerdict:
    healthy: bool
    problem: str | None  # the first connection that is not delivering, and why


def assess_links(links: Sequence[ConnectionState], now_ns: int) -> LinksVerdict:
    """Healthy only while every connection is open and none is silent past its stream kinds'
    silence limit (a connection that never connected is not healthy either)."""
    for i, link in enumerate(links):
        if not link.open:
            why = link.last_error or "connecting"
            return LinksVerdict(False, f"connection {i} not connected: {why}")
        limit = link.silence_limit_s
        if limit != math.inf:
            silent_s = (now_ns - link.last_frame_ns) / 1e9
            if silent_s > limit:
                return LinksVerdict(
                    False, f"connection {i} silent for {silent_s:.0f}s (limit {limit:g}s)"
                )
    return LinksVerdict(True, None)


class KafkaCheck:
    """Kafka reachability as the ingest producer sees it."""

    def __init__(self, sink: KafkaSink, bootstrap: str, spooling: bool) -> None:
        self.sink = sink
        self.bootstrap = bootstrap
        self.spooling = spooling
        self.problem: str | None = None
        self._answered_at: float | None = None  # trio time of the last answered probe

    async def check(self) -> str | None:
        sink = self.sink
        age = sink.ack_age_s()
        if age is not None and age < ACK_FRESH_S:
            self.problem = None
            return None
        # An idle producer (nothing to acknowledge) is asked at most every ACK_FRESH_S.
        now = trio.current_time()
        if self._answered_at is not None and now - self._answered_at < ACK_FRESH_S:
            return None
        if await sink.probe(PROBE_TIMEOUT_S):
            self._answered_at = trio.current_time()
            self.problem = None
            return None
        self._answered_at = None
        why = sink.last_error or f"no metadata answer in {PROBE_TIMEOUT_S:g}s"
        where = "accepted records go to the disk spool" if self.spooling else "records wait"
        self.problem = f"kafka unreachable at {self.bootstrap}: {why}; {where}"
        return self.problem


async def watch_ingest(
    rt: Runtime,
    links: Sequence[ConnectionState],
    kafka: KafkaCheck,
    summary: str,
) -> None:
    """Report ingest health every CHECK_INTERVAL_S until cancelled."""
    ws_at = address(rt.config.binance.ws_url)
    ws_down = kafka_down = False
    while True:
        verdict = assess_links(links, time.time_ns())
        kafka_problem = await kafka.check()
        ws_problem = None if verdict.healthy else f"binance websocket at {ws_at}: {verdict.problem}"
        if (ws_problem is not None) != ws_down:
            ws_down = ws_problem is not None
            if ws_down:
                log.warning("ingest.binance_ws_down", reason=ws_problem)
            else:
                log.info("ingest.binance_ws_back", connections=len(links))
        if (kafka_problem is not None) != kafka_down:
            kafka_down = kafka_problem is not None
            if kafka_down:
                log.warning("ingest.kafka_down", reason=kafka_problem)
            else:
                log.info("ingest.kafka_back", bootstrap=kafka.bootstrap)
        rt.health.dependency(
            Dependency.BINANCE_WS, up=ws_problem is None, reason=ws_problem or "delivering"
        )
        rt.health.dependency(
            Dependency.KAFKA, up=kafka_problem is None, reason=kafka_problem or "acknowledging"
        )
        problems = [p for p in (ws_problem, kafka_problem) if p is not None]
        rt.health.set(
            COMPONENT,
            started=True,
            healthy=not problems,
            reason="; ".join(problems) if problems else summary,
        )
        await trio.sleep(CHECK_INTERVAL_S)


# Binance REST (the backfill's only dependency) is asked with GET /api/v3/ping (weight 1) this
# often, so an outage shows and its end is seen within seconds even when no gap needs repair:
# 12 weight a minute out of the 6,000 Binance allows an IP (README, "When something is down").
REST_PROBE_S: Final = 5.0
REST_PROBE_TIMEOUT_S: Final = 3.0
BACKFILL: Final = "backfill"


class RestWatch:
    """Binance REST reachability, from every backfill call's outcome and a periodic ping.

    Reported as the `backfill` entry of /readyz (live data still flows while REST is down, but a
    gap cannot be repaired meanwhile) and as the binance_rest dependency.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.at = address(rt.config.binance.rest_url)
        self.problem: str | None = None
        self._reported = False
        rt.health.set(BACKFILL, started=True, healthy=False, reason="starting")

    def observe(self, exc: BaseException | None) -> None:
        if exc is None:
            if self.problem is not None or not self._reported:
                if self.problem is not None:
                    log.info("backfill.rest_back", rest=self.at)
                self.problem = None
                self._report()
            return
        problem = f"binance rest unreachable at {self.at}: {exc}"[:300]
        if self.problem is None:
            log.warning("backfill.rest_down", reason=problem)
        self.problem = problem
        self._report()

    def _report(self) -> None:
        self._reported = True
        self.rt.health.part(
            BACKFILL,
            Dependency.BINANCE_REST,
            self.problem,
            ok=f"binance rest answering at {self.at}",
            meanwhile="gaps cannot be repaired meanwhile",
        )

    async def probe_forever(self, ping: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                with trio.fail_after(REST_PROBE_TIMEOUT_S):
                    await ping()
            except trio.TooSlowError:
                timeout = f"no answer to /api/v3/ping in {REST_PROBE_TIMEOUT_S:g}s"
                self.observe(TimeoutError(timeout))
            except RestError as exc:
                self.observe(exc)
            else:
                self.observe(None)
            await trio.sleep(REST_PROBE_S)
