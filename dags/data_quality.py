"""Data quality of the analytics output: trade-aggregation bars (Parquet) per symbol and interval.

Hourly, over the last marketd_dq_lookback_minutes (default 120): completeness of windows per
symbol, duplicate windows, OHLC consistency (low <= open/close <= high), non-negative volumes,
well-formed windows, and freshness of the newest window. Any finding fails the task with a
readable summary (the check logic is in marketd_ops.quality, unit-tested without Airflow).

Variables (env fallback): marketd_dq_parquet_dir (MARKETD_DQ_PARQUET_DIR, default
<marketd_spark_data_dir>/parquet/trade_aggregation), marketd_dq_symbols (TICKER_SYMBOLS),
marketd_dq_intervals (1m,5m,15m), marketd_dq_lookback_minutes (120), marketd_dq_max_age_s (600),
marketd_dq_min_completeness (1.0; lower it for illiquid symbols).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

DEFAULT_SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT"


@task(task_id="check_trade_aggregates", retries=0, execution_timeout=timedelta(minutes=20))
def check_trade_aggregates() -> dict[str, Any]:
    from marketd_ops import quality, settings

    data_dir = settings.get(
        "marketd_spark_data_dir", "MARKETD_SPARK_DATA_DIR", "/var/lib/marketd-spark"
    )
    root = settings.get(
        "marketd_dq_parquet_dir", "MARKETD_DQ_PARQUET_DIR", f"{data_dir}/parquet/trade_aggregation"
    )
    symbols = [
        s.strip().upper()
        for s in settings.get("marketd_dq_symbols", "TICKER_SYMBOLS", DEFAULT_SYMBOLS).split(",")
        if s.strip()
    ]
    intervals = [
        i.strip()
        for i in settings.get("marketd_dq_intervals", "MARKETD_DQ_INTERVALS", "1m,5m,15m").split(
            ","
        )
        if i.strip()
    ]
    try:
        lookback_min = float(
            settings.get("marketd_dq_lookback_minutes", "MARKETD_DQ_LOOKBACK_MINUTES", "120")
        )
        max_age_s = float(settings.get("marketd_dq_max_age_s", "MARKETD_DQ_MAX_AGE_S", "600"))
        min_completeness = float(
            settings.get("marketd_dq_min_completeness", "MARKETD_DQ_MIN_COMPLETENESS", "1.0")
        )
    except ValueError as exc:
        raise AirflowFailException(f"bad data-quality setting: {exc}") from exc
    unknown = [i for i in intervals if quality.interval_ms(i) is None]
    if unknown:
        raise AirflowFailException(f"bad intervals {unknown}: labels like 1m, 5m, 15m, 1h")

    now_ms = int(time.time() * 1000)
    since_ms = now_ms - int(lookback_min * 60_000)
    try:
        rows = quality.load_bars(root, since_ms)
    except (OSError, ValueError) as exc:
        raise AirflowFailException(f"cannot read {root}: {exc}") from exc
    findings = quality.check_bars(
        rows,
        symbols=symbols,
        intervals=intervals,
        since_ms=since_ms,
        now_ms=now_ms,
        max_age_s=max_age_s,
        min_completeness=min_completeness,
    )
    summary = quality.summarize(findings, rows=len(rows), root=root)
    if findings:
        raise AirflowFailException(summary)
    log.info("%s", summary)
    return {"rows": len(rows), "symbols": symbols, "intervals": intervals}


with DAG(
    dag_id="marketd_data_quality",
    description="Completeness, duplicates, OHLC, volume and freshness of the trade aggregates",
    schedule="@hourly",
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "marketd", "retries": 0},
    tags=["marketd", "data-quality"],
    doc_md=__doc__,
):
    check_trade_aggregates()
