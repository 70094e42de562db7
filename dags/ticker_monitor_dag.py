"""Ticker monitor: every 2 minutes, Redis and Kafka health and ticker freshness.

The product contract: docs/contract.md §6.

The logic lives in marketd: this DAG runs the daemon's own `marketd check tickers --json`
(executable from the Variable `marketd_bin` / env MARKETD_BIN, so this Airflow needs none of the
daemon's dependencies) and turns its verdict into a task failure, which Airflow alerts on: more
than half of the tracked tickers missing or stale, Redis unreachable, or Kafka unreachable.

Variables (or environment variables): marketd_bin (MARKETD_BIN, default `marketd`),
marketd_config (MARKETD_CONFIG: the daemon's marketd.toml; REDIS_URL etc. in the worker's
environment also work), marketd_max_stale_s (MARKETD_MAX_STALE_SECONDS, default: the daemon's
TICKER_STALE_SECONDS), marketd_max_bad_fraction (MARKETD_MAX_BAD_FRACTION, default 0.5).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 60
EXIT_MEANING = {1: "check failed", 2: "configuration error", 3: "Redis unreachable"}


def summarize(report: dict[str, Any]) -> str:
    """One readable paragraph from `marketd check tickers --json`."""
    lines = [
        f"tickers {report['status'].upper()}"
        + (f": {'; '.join(report['reasons'])}" if report.get("reasons") else ""),
        f"redis {report['redis'].get('status')}, kafka {report['kafka'].get('status')}",
    ]
    if report.get("bad_fraction") is not None:
        ages = report.get("ages_s", {})
        lines.append(
            f"{report['fresh']}/{report['tracked']} fresh, bad fraction "
            f"{report['bad_fraction']:.0%} (fails above {report['max_bad_fraction']:.0%})"
        )
        if report["stale"]:
            lines.append(
                "stale: " + ", ".join(f"{s} ({ages.get(s, 0):.0f} s)" for s in report["stale"])
            )
        if report["missing"]:
            lines.append("missing: " + ", ".join(report["missing"]))
    for probe in ("redis", "kafka"):
        if "error" in report[probe]:
            lines.append(f"{probe} error: {report[probe]['error']}")
    return "\n".join(lines)


@task(task_id="check_tickers", retries=0, execution_timeout=timedelta(seconds=CHECK_TIMEOUT_S + 30))
def check_tickers() -> dict[str, Any]:
    from marketd_ops import settings

    argv = [settings.get("marketd_bin", "MARKETD_BIN", "marketd"), "check", "tickers", "--json"]
    config = settings.get("marketd_config", "MARKETD_CONFIG", "")
    if config:
        argv += ["--config", config]
    max_stale = settings.get("marketd_max_stale_s", "MARKETD_MAX_STALE_SECONDS", "")
    if max_stale:
        argv += ["--max-stale", max_stale]
    argv += [
        "--max-bad-fraction",
        settings.get("marketd_max_bad_fraction", "MARKETD_MAX_BAD_FRACTION", "0.5"),
    ]
    log.info("running %s", " ".join(argv))
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
            env=os.environ.copy(),
        )
    except FileNotFoundError as exc:
        raise AirflowFailException(
            f"{argv[0]} not found: set the Airflow Variable marketd_bin (or MARKETD_BIN) to the "
            "daemon's marketd executable, e.g. /opt/marketd/bin/marketd"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise AirflowFailException(f"marketd check tickers took over {CHECK_TIMEOUT_S} s") from exc
    if result.stderr.strip():
        log.warning("marketd stderr: %s", result.stderr.strip())
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        meaning = EXIT_MEANING.get(result.returncode, f"exit {result.returncode}")
        raise AirflowFailException(
            f"marketd check tickers: {meaning}: {(result.stderr or result.stdout).strip()[:2000]}"
        ) from None
    summary = summarize(report)
    if result.returncode != 0:
        meaning = EXIT_MEANING.get(result.returncode, f"exit {result.returncode}")
        raise AirflowFailException(f"{meaning}\n{summary}")
    log.info("%s", summary)
    return report


with DAG(
    dag_id="marketd_ticker_monitor",
    description="Redis/Kafka health and ticker freshness (marketd check tickers)",
    schedule="*/2 * * * *",
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=2),
    default_args={"owner": "marketd", "retries": 0},
    tags=["marketd", "monitoring"],
    doc_md=__doc__,
):
    check_tickers()
