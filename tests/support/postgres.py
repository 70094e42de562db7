"""A private PostgreSQL server for tests: initdb on a temp dir, loopback, a free port, fsync off.

`PostgresProcess` finds the server binaries (Debian's /usr/lib/postgresql/<ver>/bin or PATH), runs
initdb as the `postgres` user when we are root (initdb refuses root), starts the server with
`pg_ctl` and stops it (immediate mode) and removes the directory on close. `postgres_server` is a
session fixture; `postgres_dsn` gives each test its own fresh database. Import them into a conftest.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "install PostgreSQL server binaries: apt-get install postgresql"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_bindir() -> Path:
    env = os.environ.get("MARKETD_TEST_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists():
            return Path(c)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(f"PostgreSQL initdb not found; {INSTALL_HINT}")


class PostgresProcess:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.port = _free_port()
        self._tmp = Path(tempfile.mkdtemp(prefix="marketd-pg-"))
        self.datadir = self._tmp / "data"
        self.sockdir = self._tmp / "sock"
        self._as_postgres = os.geteuid() == 0
        self.started = False

    def _run(self, *cmd: str) -> None:
        argv = [str(a) for a in cmd]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed: {res.stdout[-1000:]} {res.stderr[-1000:]}"
            )

    def start(self) -> PostgresProcess:
        self.sockdir.mkdir()
        if self._as_postgres:
            shutil.chown(self._tmp, "postgres", "postgres")
            shutil.chown(self.sockdir, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.datadir), "-o", options, "-w", "-t", "60",
            "-l", str(self._tmp / "server.log"), "start",
        )  # fmt: skip
        self.started = True
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def close(self) -> None:
        try:
            if self.started:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                )
                self.started = False
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    server = PostgresProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresProcess) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()
