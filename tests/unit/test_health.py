"""Health bookkeeping (marketd/health.py), the ingest links verdict (ingest/watch.py) and the
causes a lost WebSocket names (ingest/source.py): plain calls, no I/O."""

from __future__ import annotations

import math

import pytest
import redis
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError

from marketd.config import load_config
from marketd.errors import StoreUnavailable
from marketd.health import Health, address, error_text
from marketd.ingest.source import ConnectionState, _connection_lost
from marketd.ingest.watch import KafkaCheck, assess_links
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime


def test_error_text_names_the_os_error_behind_a_client_wrapper() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise refused
        except OSError as exc:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379.") from exc
    except redis.ConnectionError as exc:
        wrapped = StoreUnavailable(f"redis: {exc}")
        wrapped.__cause__ = exc
    assert error_text(wrapped) == "Connection refused"
    # No OS error: the library's message, not our wrapper's.
    plain = StoreUnavailable("redis: Timeout reading from socket")
    plain.__cause__ = redis.TimeoutError("Timeout reading from socket")
    assert error_text(plain) == "TimeoutError: Timeout reading from socket"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@10.0.0.5:6380/0", "10.0.0.5:6380"),
        ("wss://stream.binance.com:9443/stream", "stream.binance.com:9443"),
        ("https://api.binance.com", "api.binance.com"),
        ("broker1:9092", "broker1:9092"),
        ("redis://[::1]:6379", "[::1]:6379"),
    ],
)
def test_address_never_shows_credentials(url: str, expected: str) -> None:
    assert address(url) == expected


def test_reason_says_since_when_while_unhealthy_and_since_changes_only_on_a_flip() -> None:
    health = Health()
    health.set("tickers", started=True, healthy=False, reason="redis unreachable at h:1: refused")
    first = health.components["tickers"].since_ms
    health.set("tickers", healthy=False, reason="redis unreachable at h:1: timeout")
    view = health.components["tickers"].view()
    assert health.components["tickers"].since_ms == first
    assert view["reason"].startswith("redis unreachable at h:1: timeout, since ")
    assert view["reason"].endswith("Z") and view["since"].endswith("Z")
    health.set("tickers", healthy=True, reason="consuming raw_tickers into redis")
    assert health.components["tickers"].view()["reason"] == "consuming raw_tickers into redis"


def test_ready_needs_every_enabled_component_and_every_registered_part() -> None:
    health = Health()
    enabled = ("ingest", "api")
    assert not health.ready(enabled)  # not started yet
    assert health.entries(enabled)["ingest"]["reason"] == "not started"
    for name in enabled:
        health.set(name, started=True, healthy=True, reason="ok")
    assert health.ready(enabled)
    health.set("analytics", started=True, healthy=False, reason="postgres unreachable")
    assert not health.ready(enabled)
    assert set(health.entries(enabled)) == {"ingest", "api", "analytics"}
    health.forget("analytics")
    assert health.ready(enabled)


def test_health_is_exposed_as_gauges() -> None:
    rt = Runtime(load_config(environ={}, dotenv=None).config, MetricsFactory(), "x", None)
    rt.health.set("ingest", started=True, healthy=True, reason="ok")
    rt.health.set("tickers", started=True, healthy=False, reason="redis unreachable")
    rt.health.dependency("redis", up=False, reason="refused")
    rt.health.dependency("kafka", up=True, reason="acknowledging")
    text = rt.metrics.exposition().decode()
    assert 'marketd_component_healthy{component="ingest"} 1.0' in text
    assert 'marketd_component_healthy{component="tickers"} 0.0' in text
    assert 'marketd_dependency_up{dependency="redis"} 0.0' in text
    assert 'marketd_dependency_up{dependency="kafka"} 1.0' in text


# -- ingest: every connection open and delivering ------------------------------------------------

NOW = 1_000 * 10**9


def link(*, open_: bool = True, silent_s: float = 0.0, limit_s: float = 30.0) -> ConnectionState:
    return ConnectionState(
        last_frame_ns=NOW - int(silent_s * 1e9),
        open=open_,
        silence_limit_s=limit_s,
        last_error=None if open_ else "connect_failed: ConnectionRefusedError: refused",
    )


def test_links_are_healthy_only_while_each_is_open_and_delivering() -> None:
    assert assess_links([link(), link(limit_s=math.inf, silent_s=3600)], NOW).healthy
    never = ConnectionState()  # never connected
    verdict = assess_links([link(), never], NOW)
    assert not verdict.healthy and verdict.problem == "connection 1 not connected: connecting"
    verdict = assess_links([link(open_=False)], NOW)
    assert verdict.problem == (
        "connection 0 not connected: connect_failed: ConnectionRefusedError: refused"
    )
    verdict = assess_links([link(silent_s=31)], NOW)
    assert verdict.problem == "connection 0 silent for 31s (limit 30s)"


# -- every disconnect names its cause -------------------------------------------------------------


def test_refused_connect_names_the_os_error() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as exc:
            raise HandshakeError from exc  # what trio-websocket does
    except HandshakeError as exc:
        lost = _connection_lost(exc, None)
    assert lost.reason == "connect_failed"
    assert lost.detail == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_all_attempts_failed_names_the_first_attempts_error() -> None:
    group = ExceptionGroup("attempts", [ConnectionRefusedError(111, "Connection refused")])
    err = OSError("all attempts to connect to 127.0.0.1:9 failed")
    err.__cause__ = group
    lost = _connection_lost(err, None)
    assert lost.detail == (
        "OSError: all attempts to connect to 127.0.0.1:9 failed "
        "(ConnectionRefusedError: [Errno 111] Connection refused)"
    )


def test_rejected_handshake_names_the_http_status() -> None:
    lost = _connection_lost(ConnectionRejected(503, (), b"Service Unavailable"), None)
    assert (lost.reason, lost.detail) == ("handshake_rejected", "HTTP 503 Service Unavailable")


def test_close_names_code_and_reason() -> None:
    lost = _connection_lost(ConnectionClosed(CloseReason(1008, "pong timeout")), 1.0)
    assert (lost.reason, lost.detail) == ("policy", "code=1008 pong timeout")


def test_connect_timeout() -> None:
    assert _connection_lost(trio.TooSlowError(), None).reason == "connect_timeout"


class _Sink:
    """What KafkaCheck reads of the producer: ack age, a metadata probe, the last error."""

    def __init__(self) -> None:
        self.age: float | None = None
        self.answers = True
        self.probes = 0
        self.last_error: str | None = None

    def ack_age_s(self) -> float | None:
        return self.age

    async def probe(self, timeout_s: float) -> bool:
        self.probes += 1
        if not self.answers:
            await trio.sleep(timeout_s)
        return self.answers


async def test_kafka_check_trusts_acks_and_asks_a_broker_when_none_came(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = _Sink()
    check = KafkaCheck(sink, "k1:9092", spooling=True)  # type: ignore[arg-type]
    sink.age = 0.5
    assert await check.check() is None and sink.probes == 0  # fresh acks: no request
    sink.age = None
    assert await check.check() is None and sink.probes == 1
    assert await check.check() is None and sink.probes == 1  # idle: asked at most every 3 s
    await trio.sleep(3)
    sink.answers = False
    sink.last_error = "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"
    problem = await check.check()
    assert problem == (
        "kafka unreachable at k1:9092: Connect to ipv4#127.0.0.1:9092 failed: Connection "
        "refused; accepted records go to the disk spool"
    )
    sink.answers = True
    assert await check.check() is None
