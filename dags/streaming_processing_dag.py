"""Streaming processing: submits, watches and restarts marketd's Spark jobs (docs/contract.md §6).

Every 5 minutes, for each job (spark/trade_aggregation.py, spark/technical_indicators.py,
spark/anomaly_detection.py): in `streaming` mode, leave a live and progressing job alone, start a
missing one, restart one that died or whose checkpoint stopped advancing, and fail the task when
a job needed more than marketd_spark_max_restarts restarts within an hour; in `once` mode, run
the job with --once (Spark's availableNow trigger) to completion. Logs and pid files live under
marketd_spark_state_dir; streaming jobs run detached on the worker, so pin this DAG to one worker
(queue) when Airflow has several.

Variables (env fallback in parentheses): marketd_spark_mode (MARKETD_SPARK_MODE: streaming|once),
marketd_spark_submit (SPARK_SUBMIT), marketd_spark_master (SPARK_MASTER, local[2]),
marketd_spark_submit_args (MARKETD_SPARK_SUBMIT_ARGS, e.g. --packages for the Kafka connector),
marketd_spark_jobs_dir (MARKETD_SPARK_JOBS_DIR), marketd_spark_source (kafka|files),
marketd_spark_input_dir, marketd_spark_sinks (comma-separated: parquet,postgres,redis),
marketd_spark_data_dir, marketd_spark_state_dir, marketd_postgres_dsn (POSTGRES_DSN),
marketd_spark_redis_url, marketd_kafka_bootstrap_servers (KAFKA_BOOTSTRAP_SERVERS),
marketd_spark_kafka_reader (MARKETD_SPARK_KAFKA_READER: auto = Spark's Kafka connector when
marketd_spark_submit_args bring it, else the jobs' Python Kafka source; jvm; python),
marketd_spark_kafka_options (KEY=VALUE,... Kafka client properties such as SASL, passed to the
jobs as environment variables),
marketd_spark_stall_after_s (900; 0 disables), marketd_spark_max_restarts (3), marketd_queue.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

JOBS = ("trade_aggregation", "technical_indicators", "anomaly_detection")
ONCE_TIMEOUT_S = 50 * 60


def _settings() -> Any:
    from marketd_ops import settings
    from marketd_ops.spark_jobs import SparkSettings

    try:
        return SparkSettings.from_lookup(settings.get)
    except ValueError as exc:
        raise AirflowFailException(f"bad setting: {exc}") from exc


@task(task_id="preflight", retries=0)
def preflight() -> dict[str, Any]:
    """Fail early and clearly: spark-submit and the job scripts must be where the settings say."""
    s = _settings()
    problems = []
    if shutil.which(s.spark_submit) is None:
        problems.append(f"spark-submit not found: {s.spark_submit!r} (marketd_spark_submit)")
    for job in JOBS:
        script = Path(s.jobs_dir) / f"{job}.py"
        if not script.is_file():
            problems.append(f"missing job script {script} (marketd_spark_jobs_dir)")
    if s.source == "kafka" and not s.kafka_bootstrap_servers:
        problems.append("marketd_kafka_bootstrap_servers is not set (source kafka)")
    for directory in (Path(s.data_dir), Path(s.state_dir)):
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            problems.append(f"{directory} is not writable")
    if problems:
        raise AirflowFailException("Spark pipeline cannot run:\n  " + "\n  ".join(problems))
    return {"mode": s.mode, "source": s.source, "sinks": list(s.sinks)}


def _supervise_task(job: str) -> Any:
    @task(task_id=f"supervise_{job}", retries=1, retry_delay=timedelta(seconds=30))
    def supervise() -> dict[str, object]:
        from marketd_ops import spark_jobs

        s = _settings()
        try:
            if s.mode == "once":
                result = spark_jobs.run_once(s, job, timeout_s=ONCE_TIMEOUT_S)
            else:
                result = spark_jobs.supervise(s, job)
        except spark_jobs.JobFailing as exc:
            raise AirflowFailException(str(exc)) from exc
        log.info("%s", result)
        return result

    return supervise()


with DAG(
    dag_id="marketd_streaming_processing",
    description="Submit, watch and restart the Spark jobs (aggregates, indicators, anomalies)",
    schedule="*/5 * * * *",
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=55),
    default_args={"owner": "marketd", "queue": os.environ.get("MARKETD_QUEUE", "default")},
    tags=["marketd", "spark"],
    doc_md=__doc__,
):
    checked = preflight()
    for name in JOBS:
        checked >> _supervise_task(name)
