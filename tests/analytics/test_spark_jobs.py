"""The `spark` component: the jobs' command lines, and supervision of real child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import attrs
import pytest
import trio

from marketd.analytics import jobs
from marketd.config import AnalyticsConfig, Config, KafkaConfig
from marketd.errors import MissingDependency
from marketd.metrics import MetricsFactory
from marketd.runtime import Runtime


def _cfg(**analytics: object) -> Config:
    return attrs.evolve(
        Config(),
        kafka=attrs.evolve(
            KafkaConfig(), bootstrap_servers="broker:9092", consumer={"sasl.password": "s3cret"}
        ),
        analytics=attrs.evolve(AnalyticsConfig(), **analytics),  # type: ignore[arg-type]
    )


def test_each_job_reads_kafka_and_writes_every_store_with_secrets_in_the_environment(
    tmp_path: Path,
) -> None:
    cfg = _cfg(anomaly_detection_args=("--whale-quote-abs", "1000"), kafka_reader="python")
    dsn = "postgresql://u:pw@db/marketd"
    plan = jobs.launches(
        cfg, kafka="127.0.0.1:9092", postgres_dsn=dsn, redis_url="redis://r:6379/0",
        data_dir=tmp_path, log_dir=tmp_path / "logs", base_env={"PATH": "/bin"},
    )  # fmt: skip
    assert [p.job for p in plan] == ["trade_aggregation", "technical_indicators",
                                     "anomaly_detection"]  # fmt: skip
    for p in plan:
        argv = list(p.argv)
        assert argv[1] == str(jobs.SPARK_DIR / f"{p.job}.py")
        assert argv[argv.index("--source") + 1] == "kafka"
        assert argv[argv.index("--kafka-reader") + 1] == "python"
        assert argv.count("--sink") == 3
        assert argv[argv.index("--checkpoint") + 1] == str(tmp_path / "checkpoints" / p.job)
        assert not any("pw" in a or "s3cret" in a for a in argv)  # no secret in `ps`
        assert p.env["POSTGRES_DSN"] == dsn and p.env["REDIS_URL"] == "redis://r:6379/0"
        assert p.env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:9092"
        assert p.env["KAFKA_OPTION_SASL_PASSWORD"] == "s3cret"
        assert p.env["TOPIC_RAW_TRADES"] == "raw_trades" and p.env["PATH"] == "/bin"
        assert "spark.ui.showConsoleProgress=false" in p.env["PYSPARK_SUBMIT_ARGS"]
    assert plan[2].argv[-2:] == ("--whale-quote-abs", "1000")


def test_without_postgres_the_jobs_skip_that_sink(tmp_path: Path) -> None:
    plan = jobs.launches(
        _cfg(), kafka="k:1", postgres_dsn="", redis_url=None,
        data_dir=tmp_path, log_dir=tmp_path, base_env={},
    )  # fmt: skip
    argv = list(plan[0].argv)
    assert argv.count("--sink") == 1 and "POSTGRES_DSN" not in plan[0].env


def test_missing_scripts_are_named(tmp_path: Path) -> None:
    with pytest.raises(MissingDependency, match=r"analytics\.spark_dir"):
        jobs.preflight(_cfg(spark_dir=str(tmp_path)))


# A stand-in job: the first start of each crashes (exit 3); later starts run until SIGTERM and
# exit 0, the way the real runner stops its query.
FAKE_JOB = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    marks = Path(sys.argv[0]).with_suffix(".starts")
    starts = int(marks.read_text()) if marks.exists() else 0
    marks.write_text(str(starts + 1))
    print("job start", starts + 1, sys.argv[1:3], flush=True)
    if starts == 0:
        print("boom: first start fails", flush=True)
        sys.exit(3)
    def stop(signum, frame):
        Path(sys.argv[0]).with_suffix(".stopped").write_text(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("batch.done job=fake batch=0", flush=True)  # the next job may start now
    while True:
        time.sleep(0.05)
    """
)


async def test_a_dying_job_is_restarted_and_every_job_stops_on_drain(tmp_path: Path) -> None:
    scripts = tmp_path / "spark"
    scripts.mkdir()
    for name in ("trade_aggregation", "technical_indicators", "anomaly_detection"):
        (scripts / f"{name}.py").write_text(FAKE_JOB)
    cfg = _cfg(spark_dir=str(scripts), spark_python=sys.executable,
               state_dir=str(tmp_path / "state"))  # fmt: skip
    rt = Runtime(cfg, MetricsFactory(), "127.0.0.1:1", None)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(jobs.run_spark_jobs, rt)
            while not all(
                (scripts / f"{n}.starts").exists() and (scripts / f"{n}.starts").read_text() == "2"
                for n in ("trade_aggregation", "technical_indicators", "anomaly_detection")
            ):
                await trio.sleep(0.05)
            while not rt.health.components[jobs.NAME].healthy:
                await trio.sleep(0.05)
            rt.draining.set()
    for name in ("trade_aggregation", "technical_indicators", "anomaly_detection"):
        assert (scripts / f"{name}.stopped").read_text() == signal.SIGTERM.name
        out = (tmp_path / "state" / "logs" / f"{name}.log").read_text()
        assert "boom: first start fails" in out and "job start 2" in out
    assert not rt.health.components[jobs.NAME].healthy


SLEEPER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    Path(sys.argv[1]).write_text(str(os.getpid()))
    def stop(signum, frame):
        Path(sys.argv[1] + ".stopped").write_text(signal.Signals(signum).name)
        sys.exit(5)
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)
    """
)


def _guarded(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pid_file = tmp_path / "job.pid"
    guard = subprocess.Popen(
        [sys.executable, "-m", "marketd.analytics.guard", sys.executable, str(script),
         str(pid_file)],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline and guard.poll() is None
        time.sleep(0.02)
    return guard, pid_file


def test_the_guard_stops_the_job_when_marketd_is_gone(tmp_path: Path) -> None:
    guard, pid_file = _guarded(tmp_path)
    assert guard.stdin is not None
    guard.stdin.close()  # what the kernel does when marketd dies, even by SIGKILL
    assert guard.wait(30) == 5
    assert Path(f"{pid_file}.stopped").read_text() == "SIGTERM"


def test_the_guard_forwards_sigterm_and_the_exit_status(tmp_path: Path) -> None:
    guard, pid_file = _guarded(tmp_path)
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(30) == 5
    assert Path(f"{pid_file}.stopped").read_text() == "SIGTERM"
    assert guard.stdin is not None
    guard.stdin.close()
