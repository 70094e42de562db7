"""A private PostgreSQL server: the `analytics.postgres_dsn = "embedded"` setting.

`PostgresCluster` runs initdb in a temporary (or a configured, kept) directory, runs the server on
127.0.0.1 and a free port as a guarded child (it stops when marketd dies, however it dies), and
stops it on close (fast shutdown).
initdb refuses to run as root: as root the server runs as the `postgres` user (runuser).
`apply_migrations` brings the analytics tables up to date with the Spark jobs' own migrations and
runner (spark/marketd_spark/migrations, found under `analytics.spark_dir`: one schema, one runner).
`embedded_postgres` wraps both for the trio daemon and yields the DSN.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from types import ModuleType

import attrs
import trio

from marketd.analytics.jobs import SPARK_DIR
from marketd.config import Config
from marketd.errors import FatalComponentError, MissingDependency
from marketd.logs import get_logger
from marketd.tickers.redis_server import free_port

log = get_logger(__name__)

INSTALL_HINT = (
    "install the server with: apt-get install postgresql (Debian/Ubuntu) or brew install postgresql"
)
# Where the Spark package keeps its migrations (SQL files + runner) under a spark/ directory.
MIGRATIONS_IN_SPARK_DIR = Path("marketd_spark", "migrations")
# The Spark jobs' migrations in this checkout (analytics.spark_dir = '').
MIGRATIONS = SPARK_DIR / MIGRATIONS_IN_SPARK_DIR
MIGRATE_CONNECT_TIMEOUT_S = 10.0
_RUN_AS = "postgres"


def find_bindir() -> Path:
    """The directory of initdb and postgres: $POSTGRES_BINDIR, Debian's newest
    /usr/lib/postgresql/<version>/bin, else PATH."""
    candidates = [os.environ.get("POSTGRES_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "postgres").exists():
            return Path(c)
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").exists():
        return Path(initdb).parent
    raise MissingDependency(f"PostgreSQL server (initdb, postgres) not found; {INSTALL_HINT}")


def _version(path: str) -> int:
    try:
        return int(Path(path).parent.name.split(".")[0])
    except ValueError:
        return 0


class PostgresCluster:
    """A PostgreSQL server of our own on 127.0.0.1:<port>, trust auth for user `postgres`."""

    def __init__(self, directory: str | Path | None = None, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pwd.getpwnam(_RUN_AS)
            except KeyError:
                raise MissingDependency(
                    f"running as root, and there is no '{_RUN_AS}' user to run PostgreSQL as "
                    f"(initdb refuses root); {INSTALL_HINT}"
                ) from None
        # Sockets go in a short private path (unix socket paths are limited to ~100 bytes).
        self._sockdir = Path(tempfile.mkdtemp(prefix="marketd-pgs-"))
        self._temporary = directory is None
        self.root = (
            Path(tempfile.mkdtemp(prefix="marketd-pg-"))
            if directory is None
            else Path(directory).resolve()
        )
        self.datadir = self.root / "data"
        self.started = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout_s: float = 120.0) -> None:
        cmd = [str(a) for a in argv]
        if self._as_root:
            cmd = ["runuser", "-u", _RUN_AS, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-800:]}"
            )

    def start(self) -> PostgresCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            for path in (self.root, self._sockdir):
                shutil.chown(path, _RUN_AS, _RUN_AS)
            reach = subprocess.run(
                ["runuser", "-u", _RUN_AS, "--", "test", "-w", str(self.root)], check=False
            )
            if reach.returncode != 0:
                raise RuntimeError(
                    f"the '{_RUN_AS}' user cannot write {self.root} (a parent directory is not "
                    "searchable by others, e.g. /root); set analytics.postgres_dir to a directory "
                    "under /var/lib or /srv, or leave it empty for a temporary cluster"
                )
        fresh = not (self.datadir / "PG_VERSION").exists()
        if fresh:
            self._run(
                str(self.bindir / "initdb"),
                *("-D", str(self.datadir), "-U", "postgres", "--auth=trust"),
                *("-E", "UTF8", "--locale=C"),
                *(("--no-sync",) if self._temporary else ()),
            )
        options = [
            *("-p", str(self.port), "-k", str(self._sockdir)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "max_connections=50"),
        ]
        if self._temporary:
            # Thrown away on exit: durability buys nothing, and fsync is slow on shared disks.
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            options += ["-c", "full_page_writes=off"]
        # The server is our child through the guard (not pg_ctl's detached daemon): when marketd
        # dies, even by SIGKILL, the guard's stdin pipe closes and it shuts the server down
        # (SIGINT: PostgreSQL's fast shutdown). marketd/analytics/guard.py.
        guard = [sys.executable, "-m", "marketd.analytics.guard", "--stop-signal", "INT"]
        if self._as_root:
            guard += ["--user", _RUN_AS]
        with (self.root / "server.log").open("ab") as log_file:
            self._proc = subprocess.Popen(
                [*guard, "--", str(self.bindir / "postgres"), "-D", str(self.datadir), *options],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = True
        self._wait_ready(timeout_s=60.0)
        log.info(
            "postgres.embedded_started",
            dsn=self.dsn,
            data_dir=str(self.datadir),
            initdb=fresh,
            persistence="none (temporary directory)" if self._temporary else "kept",
        )
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self.started = False
                raise RuntimeError(f"postgres exited at start: {self._log_tail()}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections in {timeout_s:g}s: {exc}; "
                        f"{self._log_tail()}"
                    ) from exc
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-5:])[-800:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        self.started = False
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the guard passes it on: fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            if self._temporary:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrations_dir(spark_dir: Path = SPARK_DIR) -> Path:
    """The migrations of the Spark package under `spark_dir` (analytics.spark_dir)."""
    return spark_dir / MIGRATIONS_IN_SPARK_DIR


@cache
def _runner(directory: Path) -> ModuleType:
    """The Spark package's migration runner, loaded from its file: marketd does not import the
    Spark package (nor put spark/ on sys.path); the runner needs only psycopg."""
    spec = importlib.util.spec_from_file_location(
        "marketd_spark_migrations", directory / "__init__.py"
    )
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no migration runner in {directory}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_migrations(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Apply the *.sql files not applied yet (schema_migrations), in name order; returns them.

    Runs the Spark package's own runner (spark/marketd_spark/migrations/__init__.py): the same
    table and advisory lock as the jobs' sinks, so either side may migrate first.
    """
    applied: list[str] = _runner(directory.resolve()).migrate(
        dsn, directory, connect_timeout_s=MIGRATE_CONNECT_TIMEOUT_S
    )
    return applied


def with_postgres_dsn(cfg: Config, dsn: str) -> Config:
    """cfg with analytics.postgres_dsn resolved (what the API and the Spark jobs connect to)."""
    return attrs.evolve(cfg, analytics=attrs.evolve(cfg.analytics, postgres_dsn=dsn))


@asynccontextmanager
async def embedded_postgres(directory: str = "", spark_dir: Path = SPARK_DIR) -> AsyncIterator[str]:
    """Start a private PostgreSQL (in `directory`, or a temporary one), migrate it with the Spark
    package's migrations under `spark_dir` (analytics.spark_dir), yield its DSN; stop it on exit."""
    import psycopg

    migrations = migrations_dir(spark_dir)

    cluster = PostgresCluster(directory or None)
    try:
        try:
            await trio.to_thread.run_sync(cluster.start)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise FatalComponentError(f"embedded PostgreSQL did not start: {exc}") from exc
        if (migrations / "__init__.py").is_file():
            try:
                applied = await trio.to_thread.run_sync(apply_migrations, cluster.dsn, migrations)
            except psycopg.Error as exc:
                raise FatalComponentError(f"embedded PostgreSQL: migration failed: {exc}") from exc
            log.info("postgres.migrated", applied=",".join(applied) or "none (up to date)")
        else:
            log.warning(
                "postgres.no_migrations",
                directory=str(migrations),
                detail="no Spark package there (set analytics.spark_dir to a checkout's spark/): "
                "the Spark jobs create the tables when they start",
            )
        yield cluster.dsn
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.close)
        log.info("postgres.embedded_stopped", dsn=cluster.dsn)


__all__ = [
    "INSTALL_HINT",
    "PostgresCluster",
    "apply_migrations",
    "embedded_postgres",
    "migrations_dir",
    "with_postgres_dsn",
]
