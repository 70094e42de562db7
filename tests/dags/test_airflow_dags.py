"""The DAGs in real Apache Airflow (its own venv, as a subprocess): import, schedule, tasks,
dependencies; and `airflow dags test` of the ticker monitor against a real Redis."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from marketd.tickers.redis_server import RedisProcess
from tests.dags.conftest import ROOT
from tests.support.kafka import TestKafka

pytestmark = pytest.mark.airflow

MARKETD_BIN = Path(sys.executable).parent / "marketd"


def test_dags_import_with_expected_schedules_and_tasks(
    airflow_python: Path, airflow_home: dict[str, str]
) -> None:
    result = subprocess.run(
        [str(airflow_python), str(ROOT / "tests/dags/airflow_checks.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=airflow_home,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "airflow checks OK" in result.stdout


def test_list_import_errors_is_clean(airflow_python: Path, airflow_home: dict[str, str]) -> None:
    result = subprocess.run(
        [str(airflow_python.parent / "airflow"), "dags", "list-import-errors", "--local"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=airflow_home,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _dags_test(
    airflow_python: Path, env: dict[str, str], redis_url: str, kafka: str, symbols: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(airflow_python.parent / "airflow"), "dags", "test", "marketd_ticker_monitor"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={
            **env,
            "MARKETD_BIN": str(MARKETD_BIN),
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "TICKER_SYMBOLS": symbols,
            "TICKER_STALE_SECONDS": "30",
        },
    )


def _seed_fresh_btc_stale_eth(redis_server: RedisProcess) -> None:
    """BTCUSDT fresh, ETHUSDT two minutes old (stale at the default 30 s)."""
    now = int(time.time() * 1000)
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset("ticker:BTCUSDT", mapping={"event_time": now, "last_price": "1"})
        client.hset("ticker:ETHUSDT", mapping={"event_time": now - 120_000, "last_price": "1"})


@pytest.mark.redis
@pytest.mark.kafka
def test_monitor_dag_run_succeeds_with_half_the_tickers_stale(
    airflow_python: Path,
    airflow_home: dict[str, str],
    redis_server: RedisProcess,
    kafka: TestKafka,
) -> None:
    _seed_fresh_btc_stale_eth(redis_server)
    result = _dags_test(
        airflow_python, airflow_home, redis_server.url, kafka.bootstrap_servers, "BTCUSDT,ETHUSDT"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # One of two stale is 50%: the DAG fails only when MORE than half are bad.
    assert "tickers OK" in output and "kafka ok" in output
    assert "1/2 fresh, bad fraction 50%" in output


@pytest.mark.redis
@pytest.mark.kafka
def test_monitor_dag_run_fails_when_most_tickers_are_stale_or_missing(
    airflow_python: Path,
    airflow_home: dict[str, str],
    redis_server: RedisProcess,
    kafka: TestKafka,
) -> None:
    _seed_fresh_btc_stale_eth(redis_server)
    result = _dags_test(
        airflow_python,
        airflow_home,
        redis_server.url,
        kafka.bootstrap_servers,
        "BTCUSDT,ETHUSDT,MATICUSDT",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "AirflowFailException: check failed" in output
    assert "2 of 3 tickers stale or missing (67% > 50%)" in output
    # Stale for 120 s when written; the Airflow run starts seconds later on a loaded machine.
    assert re.search(r"stale: ETHUSDT \(1[2-9]\d s\)", output) and "missing: MATICUSDT" in output
