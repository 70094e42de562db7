"""Spark job supervision with a stand-in spark-submit (a script that runs or dies on demand).

Real processes: jobs are spawned detached, found alive through /proc, restarted when dead or
stalled, and reaped by the test afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from marketd_ops import spark_jobs
from marketd_ops.spark_jobs import JobFailing, SparkSettings, build_command

FAKE_SUBMIT = """#!/bin/sh
# Stand-in for spark-submit: prints its arguments, then behaves as $FAKE_SPARK_BEHAVIOUR says.
echo "args: $*"
case "$FAKE_SPARK_BEHAVIOUR" in
  run) while :; do sleep 1; done ;;  # stays this shell: its command line names the job
  die) echo "boom: job crashed" ; exit 3 ;;
  ok) exit 0 ;;
esac
"""


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SparkSettings]:
    submit = tmp_path / "spark-submit"
    submit.write_text(FAKE_SUBMIT)
    submit.chmod(0o755)
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "run")
    spawned: list[int] = []
    spawn = spark_jobs._spawn

    def recording_spawn(*args: object, **kwargs: object) -> int:
        pid = spawn(*args, **kwargs)  # type: ignore[arg-type]
        spawned.append(pid)
        return pid

    monkeypatch.setattr(spark_jobs, "_spawn", recording_spawn)
    s = SparkSettings(
        spark_submit=str(submit),
        jobs_dir=str(tmp_path / "spark"),
        data_dir=str(tmp_path / "data"),
        state_dir=str(tmp_path / "run"),
        sinks=("parquet", "postgres"),
        postgres_dsn="postgresql://marketd@127.0.0.1/marketd",
        kafka_bootstrap_servers="127.0.0.1:9092",
        env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"},
        max_restarts=2,
    )
    yield s
    # Stop and reap every job the test spawned (their sessions: the shell and its sleep).
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped by the test already
            os.waitpid(pid, 0)


def _reap(pid: int) -> None:
    os.waitpid(pid, 0)


def _wait_log(s: SparkSettings, job: str, needle: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = spark_jobs.log_tail(s, job, 50)
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not in log:\n{spark_jobs.log_tail(s, job, 50)}")


def test_command_follows_the_jobs_cli_contract(settings: SparkSettings) -> None:
    argv = build_command(settings, "trade_aggregation")
    assert argv[:3] == [settings.spark_submit, "--master", "local[2]"]
    assert argv[3:] == [
        f"{settings.jobs_dir}/trade_aggregation.py",
        "--source",
        "kafka",
        "--kafka-reader",
        "auto",
        "--sink",
        "parquet",
        "--sink",
        "postgres",
        "--output",
        f"{settings.data_dir}/parquet/trade_aggregation",
        "--checkpoint",
        f"{settings.data_dir}/checkpoints/trade_aggregation",
        "--dsn",
        "postgresql://marketd@127.0.0.1/marketd",
    ]
    files = SparkSettings(
        source="files", input_dir="/in", mode="once", submit_args=("--packages", "x")
    )
    argv = build_command(files, "anomaly_detection")
    assert argv[3:5] == ["--packages", "x"]
    assert argv[6:10] == ["--source", "files", "--input", "/in"]
    assert argv[-1] == "--once"
    with pytest.raises(ValueError, match="unknown Spark job"):
        build_command(files, "nope")


def test_settings_from_variables() -> None:
    values = {
        "marketd_spark_mode": "once",
        "marketd_spark_sinks": "parquet, redis",
        "marketd_spark_submit_args": "--packages org.apache.spark:spark-sql-kafka-0-10_2.13:4.0.1",
        "marketd_kafka_bootstrap_servers": "kafka:9092",
        "marketd_spark_data_dir": "/srv/spark",
    }
    s = SparkSettings.from_lookup(lambda var, env, default: values.get(var, default))
    assert (s.mode, s.sinks, s.state_dir) == ("once", ("parquet", "redis"), "/srv/spark/run")
    assert s.submit_args[0] == "--packages"
    assert s.env == {"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}
    assert s.kafka_reader == "auto"


def test_secrets_and_kafka_properties_travel_in_the_environment() -> None:
    """The same command as marketd's own launcher: DSN, Redis URL, SASL in the environment."""
    values = {
        "marketd_kafka_bootstrap_servers": "kafka:9093",
        "marketd_postgres_dsn": "postgresql://marketd:pw@db/marketd",
        "marketd_spark_redis_url": "redis://:pw2@redis:6379/0",
        "marketd_spark_sinks": "postgres,redis",
        "marketd_spark_kafka_reader": "python",
        "marketd_spark_kafka_options": "security.protocol=SASL_SSL, sasl.password=pw3",
    }
    s = SparkSettings.from_lookup(lambda var, env, default: values.get(var, default))
    argv = build_command(s, "anomaly_detection")
    assert argv[argv.index("--kafka-reader") + 1] == "python"
    assert not any("pw" in a for a in argv)
    assert s.env == {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9093",
        "POSTGRES_DSN": "postgresql://marketd:pw@db/marketd",
        "REDIS_URL": "redis://:pw2@redis:6379/0",
        "KAFKA_OPTION_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_OPTION_SASL_PASSWORD": "pw3",
    }
    with pytest.raises(ValueError, match="auto, jvm or python"):
        SparkSettings.from_lookup(lambda var, env, default: "scala" if "reader" in var else default)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        SparkSettings.from_lookup(
            lambda var, env, default: "justakey" if "kafka_options" in var else default
        )
    with pytest.raises(ValueError, match="streaming or once"):
        SparkSettings.from_lookup(
            lambda var, env, default: "sometimes" if "mode" in var else default
        )


def test_missing_job_is_started_then_left_alone(settings: SparkSettings) -> None:
    first = spark_jobs.supervise(settings, "trade_aggregation")
    assert first["action"] == "started"
    pid = first["pid"]
    assert isinstance(pid, int)
    log = _wait_log(settings, "trade_aggregation", "args: --master local[2]")
    assert "--sink parquet --sink postgres" in log
    again = spark_jobs.supervise(settings, "trade_aggregation")
    assert again == {
        "job": "trade_aggregation",
        "action": "running",
        "pid": pid,
        "progress_age_s": None,
    }


def test_dead_job_is_restarted(settings: SparkSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "die")
    first = spark_jobs.supervise(settings, "anomaly_detection")
    _wait_log(settings, "anomaly_detection", "boom: job crashed")
    assert isinstance(first["pid"], int)
    _reap(first["pid"])
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "run")
    second = spark_jobs.supervise(settings, "anomaly_detection")
    assert second["action"] == "restarted" and second["reason"] == "exited"
    assert second["restarts_last_hour"] == 1
    assert spark_jobs.running_pid(settings, "anomaly_detection") == second["pid"]


def test_a_job_that_keeps_dying_fails_the_task(
    settings: SparkSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "die")
    result = spark_jobs.supervise(settings, "technical_indicators")
    for _ in range(settings.max_restarts):
        assert isinstance(result["pid"], int)
        _wait_log(settings, "technical_indicators", "boom")
        _reap(result["pid"])
        result = spark_jobs.supervise(settings, "technical_indicators")
    assert isinstance(result["pid"], int)
    _reap(result["pid"])
    with pytest.raises(JobFailing, match=r"restarted 3 times in the last hour") as exc_info:
        spark_jobs.supervise(settings, "technical_indicators")
    assert "boom: job crashed" in str(exc_info.value)


def test_stalled_job_is_restarted(settings: SparkSettings) -> None:
    first = spark_jobs.supervise(settings, "trade_aggregation")
    commits = settings.checkpoint_dir("trade_aggregation") / "spark" / "commits"
    commits.mkdir(parents=True)
    (commits / "0").write_text("v1")
    now = time.time()
    assert spark_jobs.supervise(settings, "trade_aggregation", now=now)["action"] == "running"
    later = now + settings.stall_after_s + 60
    second = spark_jobs.supervise(settings, "trade_aggregation", now=later)
    assert second["action"] == "restarted"
    assert str(second["reason"]).startswith("no micro-batch committed for")
    assert isinstance(first["pid"], int)
    _reap(first["pid"])  # it was stopped by SIGTERM
    assert second["pid"] != first["pid"]


def test_once_mode_runs_to_completion(
    settings: SparkSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    once = SparkSettings(**{**settings.__dict__, "mode": "once"})
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "ok")
    result = spark_jobs.run_once(once, "trade_aggregation", timeout_s=30)
    assert result["action"] == "ran_once"
    assert "--once" in _wait_log(once, "trade_aggregation", "args:")
    monkeypatch.setenv("FAKE_SPARK_BEHAVIOUR", "die")
    with pytest.raises(JobFailing, match="exited 3"):
        spark_jobs.run_once(once, "trade_aggregation", timeout_s=30)
