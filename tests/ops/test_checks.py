"""`marketd health` and `marketd check tickers`, through the real CLI parser.

The ticker check runs against a real redis-server (fresh, stale, missing and unreadable tickers)
and the Kafka mock cluster; the health check against a small HTTP server standing in for the API.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from marketd.checks import classify, local_api_url
from marketd.cli import main
from marketd.config import ApiConfig
from marketd.kafka.client import EmbeddedCluster
from marketd.tickers.redis_server import RedisProcess, free_port
from tests.support.kafka import TestKafka

# -- marketd health -------------------------------------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        body = json.dumps({"ready": code == 200, "components": {"api": "ok"}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[ThreadingHTTPServer]:
    handler = type("Api", (_Api,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_health_exits_0_when_ready(
    clean_env: pytest.MonkeyPatch,
    api_server: ThreadingHTTPServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = api_server.server_address[1]
    assert main(["health", "--url", f"http://127.0.0.1:{port}"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(f"ready: http://127.0.0.1:{port}/readyz")


def test_health_exits_1_when_not_ready(
    clean_env: pytest.MonkeyPatch,
    api_server: ThreadingHTTPServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api_server.RequestHandlerClass.status = 503  # type: ignore[attr-defined]
    port = api_server.server_address[1]
    assert main(["health", "--url", f"http://127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "HTTP 503" in out and '"ready": false' in out


def test_health_defaults_to_the_configured_port_on_loopback(
    clean_env: pytest.MonkeyPatch,
    api_server: ThreadingHTTPServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A container binds 0.0.0.0; the probe inside it must still go to loopback.
    clean_env.setenv("API_HOST", "0.0.0.0")
    clean_env.setenv("API_PORT", str(api_server.server_address[1]))
    assert main(["health"]) == 0
    assert "http://127.0.0.1:" in capsys.readouterr().out


def test_health_reads_the_port_from_the_config_file(
    clean_env: pytest.MonkeyPatch, api_server: ThreadingHTTPServer, tmp_path
) -> None:
    toml = tmp_path / "marketd.toml"
    toml.write_text(f'[api]\nhost = "0.0.0.0"\nport = {api_server.server_address[1]}\n')
    assert main(["health", "--config", str(toml)]) == 0


def test_health_exits_1_when_nothing_listens(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["health", "--url", url, "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("not ready:") and "unreachable" in out


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("10.1.2.3", "http://10.1.2.3:8000"),
    ],
)
def test_local_api_url(host: str, url: str) -> None:
    assert local_api_url(ApiConfig(host=host, port=8000)) == url


# -- classification -------------------------------------------------------------------------------


def test_classify_by_event_time_age() -> None:
    now = 1_700_000_000_000
    result = classify(
        ["FRESH", "EDGE", "STALE", "FUTURE", "GONE", "JUNK"],
        {
            "FRESH": str(now - 1_000),
            "EDGE": str(now - 30_000),  # exactly at the limit: still fresh
            "STALE": str(now - 30_001),
            "FUTURE": str(now + 2_000),  # exchange clock slightly ahead
            "GONE": None,
            "JUNK": "not-a-number",
        },
        now_ms=now,
        max_stale_s=30,
    )
    assert result.fresh == ("FRESH", "EDGE", "FUTURE")
    assert result.stale == ("STALE",)
    assert result.missing == ("GONE", "JUNK")
    assert result.ages_s == {"FRESH": 1.0, "EDGE": 30.0, "STALE": 30.001, "FUTURE": 0.0}
    assert result.bad_fraction == pytest.approx(3 / 6)


# -- marketd check tickers against real Redis and the Kafka mock cluster --------------------------


def _store(server: RedisProcess, symbol: str, event_time_ms: int) -> None:
    with redis.Redis.from_url(server.url) as client:
        client.hset(
            f"ticker:{symbol}",
            mapping={
                "last_price": "42000.00",
                "event_time": event_time_ms,
                "updated_at": int(time.time() * 1000),
            },
        )


def _run_json(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, object]]:
    code = main(["check", "tickers", "--json", "--timeout", "2", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def monitored(
    clean_env: pytest.MonkeyPatch, redis_server: RedisProcess, kafka: TestKafka
) -> RedisProcess:
    clean_env.setenv("REDIS_URL", redis_server.url)
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    clean_env.setenv("TICKER_SYMBOLS", "BTCUSDT,ETHUSDT,SOLUSDT,MATICUSDT")
    clean_env.setenv("TICKER_STALE_SECONDS", "30")
    return redis_server


@pytest.mark.redis
@pytest.mark.kafka
def test_half_bad_passes(monitored: RedisProcess, capsys: pytest.CaptureFixture[str]) -> None:
    now = int(time.time() * 1000)
    _store(monitored, "BTCUSDT", now - 1_000)
    _store(monitored, "ETHUSDT", now - 2_000)
    _store(monitored, "SOLUSDT", now - 120_000)
    # MATICUSDT: never written (Binance replaced it with POL): missing, not an error.
    code, report = _run_json(capsys)
    assert code == 0
    assert report["status"] == "ok" and report["reasons"] == []
    assert report["tracked"] == 4 and report["fresh"] == 2
    assert report["stale"] == ["SOLUSDT"] and report["missing"] == ["MATICUSDT"]
    assert report["bad_fraction"] == 0.5
    assert report["redis"]["status"] == "ok"  # type: ignore[index]
    assert report["kafka"]["status"] == "ok"  # type: ignore[index]
    assert report["kafka"]["brokers"] >= 1  # type: ignore[index]


@pytest.mark.redis
@pytest.mark.kafka
def test_more_than_half_bad_fails(
    monitored: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    _store(monitored, "BTCUSDT", now - 1_000)
    _store(monitored, "ETHUSDT", now - 45_000)
    code, report = _run_json(capsys)
    assert code == 1
    assert report["status"] == "failed"
    assert report["stale"] == ["ETHUSDT"]
    assert report["missing"] == ["SOLUSDT", "MATICUSDT"]
    assert report["bad_fraction"] == 0.75
    assert report["reasons"] == ["3 of 4 tickers stale or missing (75% > 50%)"]


@pytest.mark.redis
@pytest.mark.kafka
def test_max_stale_and_fraction_flags(
    monitored: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT", "MATICUSDT"):
        _store(monitored, symbol, now - 45_000)
    code, report = _run_json(capsys, "--max-stale", "60")
    assert (code, report["fresh"], report["max_stale_s"]) == (0, 4, 60.0)
    code, report = _run_json(capsys, "--max-stale", "10", "--max-bad-fraction", "1")
    assert (code, report["stale"]) == (0, ["BTCUSDT", "ETHUSDT", "SOLUSDT", "MATICUSDT"])
    code, report = _run_json(capsys, "--max-stale", "10", "--max-bad-fraction", "0.9")
    assert code == 1


@pytest.mark.redis
@pytest.mark.kafka
def test_human_summary_names_the_bad_tickers(
    monitored: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    _store(monitored, "BTCUSDT", now - 90_000)
    assert main(["check", "tickers"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "tickers: FAILED: 4 of 4 tickers stale or missing (100% > 50%)"
    assert "stale    BTCUSDT (90 s)" in out
    assert "missing  ETHUSDT, SOLUSDT, MATICUSDT" in out
    assert "redis    ok" in out and "kafka    ok" in out


@pytest.mark.redis
@pytest.mark.kafka
def test_redis_down_exits_3(monitored: RedisProcess, capsys: pytest.CaptureFixture[str]) -> None:
    monitored.stop()
    code, report = _run_json(capsys)
    assert code == 3
    assert report["status"] == "failed" and report["reasons"] == ["redis unreachable"]
    assert report["redis"]["status"] == "unreachable"  # type: ignore[index]
    assert report["bad_fraction"] is None


@pytest.mark.redis
@pytest.mark.kafka
def test_kafka_unreachable_fails_the_check(
    monitored: RedisProcess, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT", "MATICUSDT"):
        _store(monitored, symbol, now)
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    code = main(["check", "tickers", "--json", "--timeout", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["fresh"] == 4
    assert report["reasons"] == ["kafka unreachable"]
    assert report["kafka"]["status"] == "unreachable"


@pytest.mark.redis
@pytest.mark.kafka
def test_embedded_kafka_is_skipped(
    monitored: RedisProcess, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        _store(monitored, symbol, now)
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "embedded")
    code, report = _run_json(capsys)
    assert code == 0
    assert report["kafka"]["status"] == "skipped"  # type: ignore[index]


def test_embedded_redis_is_a_config_error(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("REDIS_URL", "embedded")
    assert main(["check", "tickers", "--json"]) == 2
    err = capsys.readouterr().err
    assert "redis.url" in err and "needs the real Redis URL" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-stale", "0"], "--max-stale"),
        (["--max-bad-fraction", "1.5"], "--max-bad-fraction"),
    ],
)
def test_bad_flags_are_config_errors(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    clean_env.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["check", "tickers", *flags]) == 2
    assert needle in capsys.readouterr().err


def test_a_bad_config_value_exits_2(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TICKER_STALE_SECONDS", "soon")
    assert main(["check", "tickers"]) == 2


@pytest.mark.kafka
def test_embedded_cluster_address_reports_ok(
    clean_env: pytest.MonkeyPatch, redis_server: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon's embedded cluster is reachable by address while it runs; the check then
    # probes it like any broker.
    with EmbeddedCluster() as cluster:
        clean_env.setenv("REDIS_URL", redis_server.url)
        clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", cluster.bootstrap_servers)
        clean_env.setenv("TICKER_SYMBOLS", "BTCUSDT")
        _store(redis_server, "BTCUSDT", int(time.time() * 1000))
        code, report = _run_json(capsys)
    assert code == 0
    assert report["kafka"]["status"] == "ok"  # type: ignore[index]


def test_health_reads_marketd_config_like_run(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    toml = tmp_path / "marketd.toml"
    toml.write_text("[api]\nport = 18123\n")
    result = subprocess.run(
        [sys.executable, "-m", "marketd.cli", "health", "--timeout", "0.5"],
        env={**os.environ, "MARKETD_CONFIG": str(toml)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "127.0.0.1:18123/readyz" in result.stdout + result.stderr
