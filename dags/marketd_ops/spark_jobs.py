"""Submit, watch and restart marketd's Spark jobs from Airflow, without Airflow imports.

A streaming job runs detached from the Airflow task (its own session, so the task's end does not
kill it) with a pid file and a log under `state_dir`. `supervise` leaves a live, progressing job
alone, restarts a dead one or one whose checkpoint has not advanced for `stall_after_s`, and
raises `JobFailing` when a job needed more than `max_restarts` restarts within an hour. In
`once` mode the job runs to completion (`--once`, Spark's availableNow trigger) inside the task.
The command line is the one `marketd run` uses with analytics.spark_jobs
(marketd/analytics/jobs.py): `--source kafka --kafka-reader auto` (Spark's connector when
submitted with it, else the jobs' Python Kafka source), with the PostgreSQL DSN, Redis URL and
Kafka client properties in the environment rather than on the command line (where `ps` would
show a password).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

JOBS = ("trade_aggregation", "technical_indicators", "anomaly_detection")
RESTART_WINDOW_S = 3600.0


class JobFailing(RuntimeError):
    """A job keeps dying (or cannot be started): someone has to look."""


@dataclass(frozen=True)
class SparkSettings:
    spark_submit: str = "spark-submit"
    master: str = "local[2]"
    submit_args: tuple[str, ...] = ()  # e.g. --packages org.apache.spark:spark-sql-kafka-...
    jobs_dir: str = "spark"
    source: str = "kafka"  # kafka | files
    input_dir: str = ""  # with source=files
    sinks: tuple[str, ...] = ("parquet",)
    data_dir: str = "/var/lib/marketd-spark"
    state_dir: str = "/var/lib/marketd-spark/run"
    postgres_dsn: str = ""
    redis_url: str = ""
    kafka_bootstrap_servers: str = ""
    kafka_reader: str = "auto"  # auto | jvm | python (the jobs' --kafka-reader)
    mode: str = "streaming"  # streaming | once
    stall_after_s: float = 900.0  # 0 disables the progress check
    max_restarts: int = 3
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_lookup(cls, get: Callable[[str, str, str], str]) -> SparkSettings:
        """Build from `get(variable, env, default)` (marketd_ops.settings.get in the DAG)."""
        d = cls()
        mode = get("marketd_spark_mode", "MARKETD_SPARK_MODE", d.mode)
        if mode not in ("streaming", "once"):
            raise ValueError(f"marketd_spark_mode must be streaming or once, got {mode!r}")
        source = get("marketd_spark_source", "MARKETD_SPARK_SOURCE", d.source)
        if source not in ("kafka", "files"):
            raise ValueError(f"marketd_spark_source must be kafka or files, got {source!r}")
        data_dir = get("marketd_spark_data_dir", "MARKETD_SPARK_DATA_DIR", d.data_dir)
        sinks = get("marketd_spark_sinks", "MARKETD_SPARK_SINKS", ",".join(d.sinks))
        bootstrap = get("marketd_kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", "")
        reader = get("marketd_spark_kafka_reader", "MARKETD_SPARK_KAFKA_READER", d.kafka_reader)
        if reader not in ("auto", "jvm", "python"):
            raise ValueError(
                f"marketd_spark_kafka_reader must be auto, jvm or python, got {reader!r}"
            )
        dsn = get("marketd_postgres_dsn", "POSTGRES_DSN", "")
        redis_url = get("marketd_spark_redis_url", "MARKETD_SPARK_REDIS_URL", "")
        options = get("marketd_spark_kafka_options", "MARKETD_SPARK_KAFKA_OPTIONS", "")
        env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap} if bootstrap else {}
        env.update(_kafka_option_env(options))
        if dsn:
            env["POSTGRES_DSN"] = dsn
        if redis_url:
            env["REDIS_URL"] = redis_url
        return cls(
            spark_submit=get("marketd_spark_submit", "SPARK_SUBMIT", d.spark_submit),
            master=get("marketd_spark_master", "SPARK_MASTER", d.master),
            submit_args=tuple(
                shlex.split(get("marketd_spark_submit_args", "MARKETD_SPARK_SUBMIT_ARGS", ""))
            ),
            jobs_dir=get("marketd_spark_jobs_dir", "MARKETD_SPARK_JOBS_DIR", d.jobs_dir),
            source=source,
            input_dir=get("marketd_spark_input_dir", "MARKETD_SPARK_INPUT_DIR", ""),
            sinks=tuple(s.strip() for s in sinks.split(",") if s.strip()),
            data_dir=data_dir,
            state_dir=get("marketd_spark_state_dir", "MARKETD_SPARK_STATE_DIR", f"{data_dir}/run"),
            postgres_dsn=dsn,
            redis_url=redis_url,
            kafka_bootstrap_servers=bootstrap,
            kafka_reader=reader,
            mode=mode,
            stall_after_s=float(
                get("marketd_spark_stall_after_s", "MARKETD_SPARK_STALL_AFTER_S", "900")
            ),
            max_restarts=int(get("marketd_spark_max_restarts", "MARKETD_SPARK_MAX_RESTARTS", "3")),
            env=env,
        )

    def output_dir(self, job: str) -> Path:
        return Path(self.data_dir) / "parquet" / job

    def checkpoint_dir(self, job: str) -> Path:
        return Path(self.data_dir) / "checkpoints" / job


def _kafka_option_env(text: str) -> dict[str, str]:
    """ "security.protocol=SASL_SSL,sasl.password=..." -> KAFKA_OPTION_<KEY> variables, which the
    jobs read as Kafka client properties (spark/marketd_spark/cli.py)."""
    out = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"marketd_spark_kafka_options: {item!r} is not KEY=VALUE")
        out["KAFKA_OPTION_" + key.strip().replace(".", "_").upper()] = value.strip()
    return out


def build_command(s: SparkSettings, job: str) -> list[str]:
    """spark-submit argv following the jobs' CLI contract."""
    if job not in JOBS:
        raise ValueError(f"unknown Spark job {job!r}; known: {', '.join(JOBS)}")
    argv = [s.spark_submit, "--master", s.master, *s.submit_args]
    argv += [str(Path(s.jobs_dir) / f"{job}.py"), "--source", s.source]
    if s.source == "files":
        if not s.input_dir:
            raise ValueError("marketd_spark_input_dir is required with source=files")
        argv += ["--input", s.input_dir]
    else:
        argv += ["--kafka-reader", s.kafka_reader]
    for sink in s.sinks:
        argv += ["--sink", sink]
    argv += ["--output", str(s.output_dir(job)), "--checkpoint", str(s.checkpoint_dir(job))]
    # The DSN and the Redis URL reach the job as POSTGRES_DSN / REDIS_URL (s.env): a password on
    # the command line would show in `ps` and in the log's command header.
    if s.postgres_dsn and "POSTGRES_DSN" not in s.env:
        argv += ["--dsn", s.postgres_dsn]
    if s.redis_url and "REDIS_URL" not in s.env:
        argv += ["--redis-url", s.redis_url]
    if s.mode == "once":
        argv.append("--once")
    return argv


# -- process bookkeeping -------------------------------------------------------------------------


def _paths(s: SparkSettings, job: str) -> tuple[Path, Path, Path]:
    state = Path(s.state_dir)
    return state / f"{job}.pid", state / f"{job}.log", state / f"{job}.restarts.json"


def _alive(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie, not yet reaped, has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> list[bytes]:
    # /proc/<pid>/cmdline reads empty for a moment while a process is in execve (right after a
    # spawn); only kernel threads keep it empty, so wait out that moment briefly.
    deadline = time.monotonic() + 1.0
    while True:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        if raw or time.monotonic() > deadline:
            return raw.split(b"\0")
        time.sleep(0.01)


def running_pid(s: SparkSettings, job: str) -> int | None:
    """The job's pid if it is alive and still our job (a recycled pid is not)."""
    pid_file, _, _ = _paths(s, job)
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = _cmdline(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if not _alive(pid):
        return None
    script = f"{job}.py".encode()
    return pid if any(arg.endswith(script) for arg in cmdline) else None


def progress_age_s(s: SparkSettings, job: str, now: float) -> float | None:
    """Seconds since the query last committed a micro-batch (None: no checkpoint yet)."""
    newest = None
    root = s.checkpoint_dir(job)
    # The jobs keep Spark's own checkpoint under <--checkpoint>/spark (marketd_spark.runner).
    for d in (root / "spark" / "commits", root / "spark" / "offsets", root / "commits"):
        if d.is_dir():
            for entry in d.iterdir():
                mtime = entry.stat().st_mtime
                newest = mtime if newest is None else max(newest, mtime)
    return None if newest is None else now - newest


def log_tail(s: SparkSettings, job: str, lines: int = 20) -> str:
    _, log, _ = _paths(s, job)
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start(s: SparkSettings, job: str) -> int:
    """Launch the job detached (own session): it outlives the Airflow task that started it."""
    pid_file, log, _ = _paths(s, job)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    argv = build_command(s, job)
    pid = _spawn(argv, log, s.env)
    pid_file.write_text(f"{pid}\n")
    return pid


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> int:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with log.open("ab") as out:
        out.write(f"\n=== {stamp} {shlex.join(argv)}\n".encode())
    # posix_spawn with setsid rather than Popen: there is no handle to wait for (the job is not
    # ours to reap; the short-lived task process exits), and the new session keeps the task's
    # end from taking the job with it.
    return os.posix_spawnp(
        argv[0],
        argv,
        {**os.environ, **env},
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def stop(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the job's session (driver and its children), SIGKILL after `timeout_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _record_restart(s: SparkSettings, job: str, now: float) -> int:
    _, _, history = _paths(s, job)
    try:
        times = [float(t) for t in json.loads(history.read_text())]
    except (FileNotFoundError, ValueError):
        times = []
    times = [t for t in times if now - t < RESTART_WINDOW_S] + [now]
    history.write_text(json.dumps(times))
    return len(times)


def supervise(s: SparkSettings, job: str, now: float | None = None) -> dict[str, object]:
    """Ensure the streaming job runs and progresses; returns what was done."""
    now = time.time() if now is None else now
    pid = running_pid(s, job)
    if pid is not None:
        age = progress_age_s(s, job, now)
        if s.stall_after_s <= 0 or age is None or age <= s.stall_after_s:
            return {"job": job, "action": "running", "pid": pid, "progress_age_s": age}
        stop(pid)
        reason = f"no micro-batch committed for {age:.0f} s"
    else:
        _, log, _ = _paths(s, job)
        reason = "not running" if not log.exists() else "exited"
    restarts = _record_restart(s, job, now) if reason != "not running" else 0
    new_pid = start(s, job)
    result: dict[str, object] = {
        "job": job,
        "action": "started" if reason == "not running" else "restarted",
        "reason": reason,
        "pid": new_pid,
        "restarts_last_hour": restarts,
    }
    if restarts > s.max_restarts:
        raise JobFailing(
            f"{job}: restarted {restarts} times in the last hour ({reason}); restarted again "
            f"as pid {new_pid}. Last log lines:\n{log_tail(s, job)}"
        )
    return result


def run_once(s: SparkSettings, job: str, timeout_s: float) -> dict[str, object]:
    """Run the job with --once to completion; raises JobFailing on a non-zero exit."""
    _, log, _ = _paths(s, job)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = build_command(s, job)
    started = time.monotonic()
    with log.open("ab") as out:
        out.write(f"\n=== once {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            code = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **s.env},
                timeout=timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as exc:
            raise JobFailing(f"{job}: --once run exceeded {timeout_s:g} s") from exc
    if code != 0:
        raise JobFailing(f"{job}: exited {code}. Last log lines:\n{log_tail(s, job)}")
    return {"job": job, "action": "ran_once", "seconds": round(time.monotonic() - started, 1)}
