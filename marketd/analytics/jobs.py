"""The `spark` component: the three Spark submit scripts as supervised child processes.

Receives the resolved Kafka address, PostgreSQL DSN and Redis URL (embedded or not) and starts
spark/trade_aggregation.py, technical_indicators.py and anomaly_detection.py with `--source kafka`
(the jobs stay separate programs; this only launches them, as spark-submit or Airflow would), one
after another: the next once the previous has finished a micro-batch (at most a minute). A job
that exits is logged with the tail of its output and restarted with capped, jittered backoff; on
drain each job gets SIGTERM (it stops its query between batches) and, past the deadline, its whole
process group is killed. Secrets travel in the environment, never on the command line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
import trio

from marketd.backoff import Backoff
from marketd.config import Config
from marketd.errors import MissingDependency
from marketd.kafka.client import is_embedded
from marketd.logs import get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)

NAME = "spark"
SPARK_DIR = Path(__file__).resolve().parents[2] / "spark"
# A job that ran this long before exiting starts again from the shortest backoff.
HEALTHY_RUN_S = 60.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
TAIL_LINES = 8
# Jobs start one after another: the next once the previous finished a micro-batch, or after this.
STAGGER_MAX_S = 60.0
STAGGER_POLL_S = 0.5


@attrs.frozen
class Job:
    name: str  # also the submit script's stem: spark/<name>.py
    extra_args: tuple[str, ...]


@attrs.frozen
class Launch:
    """Everything one job needs to start: command line, environment, working directory, log."""

    job: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    log_path: Path


def jobs(cfg: Config) -> list[Job]:
    a = cfg.analytics
    return [
        Job("trade_aggregation", a.trade_aggregation_args),
        Job("technical_indicators", a.technical_indicators_args),
        Job("anomaly_detection", a.anomaly_detection_args),
    ]


def spark_dir(cfg: Config) -> Path:
    return Path(cfg.analytics.spark_dir).resolve() if cfg.analytics.spark_dir else SPARK_DIR


def launches(
    cfg: Config,
    *,
    kafka: str,
    postgres_dsn: str,
    redis_url: str | None,
    data_dir: Path,
    log_dir: Path,
    base_env: dict[str, str],
) -> list[Launch]:
    """The three jobs' command lines (pure: the component and the tests share it)."""
    a = cfg.analytics
    python = a.spark_python or sys.executable
    env = {
        **base_env,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "TOPIC_RAW_TRADES": cfg.topics.raw_trades,
        "TOPIC_RAW_KLINES": cfg.topics.raw_klines,
        "PYSPARK_PYTHON": base_env.get("PYSPARK_PYTHON", python),
        "SPARK_LOCAL_IP": base_env.get("SPARK_LOCAL_IP", "127.0.0.1"),
        # No console progress bar: the job's log is what spark.job_exited quotes.
        "PYSPARK_SUBMIT_ARGS": base_env.get(
            "PYSPARK_SUBMIT_ARGS", "--conf spark.ui.showConsoleProgress=false pyspark-shell"
        ),
    }
    # The consumer's client properties (security.protocol, sasl.*) reach the Python source as
    # KAFKA_OPTION_<KEY> (spark/marketd_spark/cli.py); the embedded cluster needs none.
    for key, value in cfg.kafka.consumer.items():
        env["KAFKA_OPTION_" + key.replace(".", "_").upper()] = str(value)
    sinks: list[str] = ["--sink", "parquet"]
    if postgres_dsn:
        env["POSTGRES_DSN"] = postgres_dsn
        sinks += ["--sink", "postgres"]
    if redis_url:
        env["REDIS_URL"] = redis_url
        sinks += ["--sink", "redis", "--redis-prefix", a.redis_prefix]
    out = []
    for job in jobs(cfg):
        argv = (
            python,
            str(spark_dir(cfg) / f"{job.name}.py"),
            *("--source", "kafka", "--kafka-reader", a.kafka_reader),
            *("--master", a.spark_master),
            *sinks,
            *("--output", str(data_dir / "parquet" / job.name)),
            *("--checkpoint", str(data_dir / "checkpoints" / job.name)),
            *job.extra_args,
        )
        out.append(Launch(job.name, argv, env, spark_dir(cfg), log_dir / f"{job.name}.log"))
    return out


def preflight(cfg: Config) -> None:
    """Raise MissingDependency (one line, how to install) when the jobs cannot start here."""
    where = spark_dir(cfg)
    missing = [j.name for j in jobs(cfg) if not (where / f"{j.name}.py").is_file()]
    if missing:
        raise MissingDependency(
            f"the Spark submit scripts are not in {where} ({', '.join(missing)}.py); "
            "set analytics.spark_dir to the checkout's spark/ directory"
        )
    if not cfg.analytics.spark_python and importlib.util.find_spec("pyspark") is None:
        raise MissingDependency(
            "pyspark is not installed in marketd's environment; run scripts/bootstrap --analytics "
            "(or pip install -e '.[spark]')"
        )
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise MissingDependency(
            "Spark needs Java 17+; install it with: apt-get install openjdk-17-jre-headless"
        )


@contextmanager
def _data_dir(cfg: Config, kafka: str) -> Iterator[tuple[Path, bool]]:
    """Checkpoints and Parquet: a temporary directory with the embedded Kafka (a checkpoint's
    offsets mean nothing to the next run's fresh topics), else analytics.state_dir."""
    if is_embedded(cfg.kafka.bootstrap_servers):
        tmp = Path(tempfile.mkdtemp(prefix="marketd-spark-"))
        try:
            yield tmp, True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        yield _state_dir(cfg), False


def _state_dir(cfg: Config) -> Path:
    return Path(os.path.abspath(cfg.analytics.state_dir))


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())[-1500:]


class _Board:
    """Which jobs run now: the component is healthy when all of them do."""

    def __init__(self, rt: Runtime, names: list[str]) -> None:
        self.rt = rt
        self.state = dict.fromkeys(names, "starting")

    def set(self, job: str, state: str) -> None:
        self.state[job] = state
        bad = {j: s for j, s in self.state.items() if s != "running"}
        reason = "; ".join(f"{j} {s}" for j, s in bad.items()) or "3 Spark jobs running"
        self.rt.health.set(NAME, started=True, healthy=not bad, reason=reason)


async def _run_job(rt: Runtime, launch: Launch, board: _Board, offsets: dict[Path, int]) -> None:
    """Start the job, restart it when it exits, stop it on drain."""
    backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
    grace_s = max(1.0, rt.config.shutdown.drain_timeout_s * 0.8)
    restarts = 0
    while not rt.draining.is_set():
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with launch.log_path.open("ab") as out:
            offsets[launch.log_path] = out.tell()  # where this run's output starts
            proc = await trio.lowlevel.open_process(
                # The guard stops the job when marketd dies, however it dies (guard.py).
                [sys.executable, "-m", "marketd.analytics.guard", *launch.argv],
                env=launch.env,
                cwd=str(launch.cwd),
                stdin=subprocess.PIPE,  # held open while we live: its EOF tells the guard
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: a terminal's Ctrl-C reaches marketd only (which stops the
                # jobs in order), and a forced stop can kill the job's JVM with it.
                start_new_session=True,
            )
        started = trio.current_time()
        board.set(launch.job, "running")
        log.info("spark.job_started", job=launch.job, pid=proc.pid, restarts=restarts,
                 log=str(launch.log_path))  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_drain, rt, proc, launch.job, grace_s)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:  # cancelled: the drain deadline passed
                _kill_group(proc)
            with trio.CancelScope(shield=True):
                await proc.wait()
                # Whatever is left in the job's process group (a JVM still winding down after
                # the guard exited) must not outlive this run: its state is in the checkpoint.
                _kill_group(proc)
                if proc.stdin is not None:
                    await proc.stdin.aclose()
        ran_s = trio.current_time() - started
        if rt.draining.is_set():
            board.set(launch.job, "stopped")
            log.info("spark.job_stopped", job=launch.job, exit_code=code, ran_s=round(ran_s, 1))
            return
        if ran_s > HEALTHY_RUN_S:
            backoff.reset()
        delay = backoff.delay()
        restarts += 1
        board.set(launch.job, f"restarting after exit {code}")
        log.warning("spark.job_exited", job=launch.job, exit_code=code, ran_s=round(ran_s, 1),
                    restart_in_s=round(delay, 2), restarts=restarts,
                    tail=_tail(launch.log_path))  # fmt: skip
        with trio.move_on_after(delay):
            await rt.draining.wait()
    board.set(launch.job, "stopped")


async def _until_settled(rt: Runtime, launch: Launch, offsets: dict[Path, int]) -> None:
    """Wait until the job has finished its first micro-batch (its log says `batch.done`), at most
    STAGGER_MAX_S. Starting a JVM, a session and the first Python workers is the heavy part of a
    job's life; three at once on two cores starve each other, and Spark gives a Python worker
    only 10 s to connect back (measured: all three jobs failed together at load average 37)."""
    with trio.move_on_after(STAGGER_MAX_S):
        while not rt.draining.is_set():
            start = offsets.get(launch.log_path, 0)
            if b"batch.done" in await trio.to_thread.run_sync(_log_since, launch.log_path, start):
                return
            with trio.move_on_after(STAGGER_POLL_S):
                await rt.draining.wait()


def _log_since(path: Path, offset: int) -> bytes:
    """What the job logged since its last start (the log is appended across runs)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


async def _stop_on_drain(rt: Runtime, proc: trio.Process, job: str, grace_s: float) -> None:
    await rt.draining.wait()
    log.info("spark.job_stopping", job=job, pid=proc.pid, grace_s=round(grace_s, 1))
    proc.send_signal(signal.SIGTERM)  # the runner stops the query between batches, exit 0
    with trio.move_on_after(grace_s):
        await proc.wait()
        return
    log.warning("spark.job_killed", job=job, pid=proc.pid, detail="no clean stop in time")
    _kill_group(proc)


def _kill_group(proc: trio.Process) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_spark_jobs(
    rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    cfg = rt.config
    preflight(cfg)
    with _data_dir(cfg, rt.kafka_bootstrap) as (data_dir, temporary):
        plan = launches(
            cfg,
            kafka=rt.kafka_bootstrap,
            postgres_dsn=cfg.analytics.postgres_dsn,
            redis_url=rt.redis_url,
            data_dir=data_dir,
            log_dir=_state_dir(cfg) / "logs",
            base_env=dict(os.environ),
        )
        board = _Board(rt, [p.job for p in plan])
        log.info(
            "spark.starting",
            jobs=",".join(p.job for p in plan),
            kafka=rt.kafka_bootstrap,
            data_dir=str(data_dir),
            temporary=temporary,
            kafka_reader=cfg.analytics.kafka_reader,
            postgres=bool(cfg.analytics.postgres_dsn),
        )
        task_status.started()
        offsets: dict[Path, int] = {}
        async with trio.open_nursery() as nursery:
            for i, launch in enumerate(plan):
                if i:
                    await _until_settled(rt, plan[i - 1], offsets)
                nursery.start_soon(_run_job, rt, launch, board, offsets)


__all__ = ["NAME", "Launch", "launches", "preflight", "run_spark_jobs"]
