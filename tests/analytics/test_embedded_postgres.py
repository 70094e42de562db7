"""The embedded PostgreSQL: initdb + start on loopback, migrations, kept or temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from marketd.analytics import postgres
from marketd.analytics.jobs import SPARK_DIR
from marketd.analytics.postgres import (
    MIGRATIONS,
    PostgresCluster,
    apply_migrations,
    embedded_postgres,
    migrations_dir,
)
from marketd.errors import MissingDependency

pytestmark = pytest.mark.postgres


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


async def test_embedded_server_is_migrated_and_gone_after_exit() -> None:
    with trio.fail_after(120):
        async with embedded_postgres() as dsn:
            assert dsn.startswith("postgresql://postgres@127.0.0.1:")
            tables = await trio.to_thread.run_sync(_tables, dsn)
            assert {"trade_aggregates", "indicators", "anomalies", "schema_migrations"} <= tables
            with psycopg.connect(dsn) as conn:
                (root,) = conn.execute("SHOW data_directory").fetchone() or ("",)
        assert not await trio.Path(root).exists()  # the temporary cluster is removed
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2)


def test_the_daemon_migrates_with_the_spark_packages_own_runner_and_files() -> None:
    """One schema, one runner: spark/marketd_spark/migrations, also where the daemon looks."""
    assert MIGRATIONS == migrations_dir() == SPARK_DIR / "marketd_spark" / "migrations"
    runner = postgres._runner(MIGRATIONS.resolve())
    assert Path(runner.__file__ or "") == MIGRATIONS / "__init__.py"
    assert runner.DIRECTORY == MIGRATIONS
    assert sorted(p.name for p in MIGRATIONS.glob("*.sql"))[:2] == [
        "001_analytics.sql",
        "002_indicator_columns.sql",
    ]


async def test_the_migrations_come_from_the_configured_spark_dir(tmp_path: Path) -> None:
    """analytics.spark_dir elsewhere (an install without this checkout): its migrations apply;
    without a Spark package there the server starts unmigrated (the jobs create the tables)."""
    spark_dir = tmp_path / "spark"
    shutil.copytree(MIGRATIONS, migrations_dir(spark_dir))
    (migrations_dir(spark_dir) / "999_marker.sql").write_text("CREATE TABLE marker (x int);\n")
    with trio.fail_after(120):
        async with embedded_postgres(spark_dir=spark_dir) as dsn:
            tables = await trio.to_thread.run_sync(_tables, dsn)
            assert {"trade_aggregates", "marker", "schema_migrations"} <= tables
        async with embedded_postgres(spark_dir=tmp_path / "nowhere") as dsn:
            assert await trio.to_thread.run_sync(_tables, dsn) == set()


@pytest.fixture
def kept_dir() -> Iterator[Path]:
    """A directory the `postgres` user can reach when we are root (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="marketd-test-pgdir-"))
    top.chmod(0o755)
    try:
        yield top / "pg"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_configured_directory_keeps_its_data_across_restarts(kept_dir: Path) -> None:
    where = kept_dir
    with PostgresCluster(where) as first:
        assert apply_migrations(first.dsn) == ["001_analytics.sql", "002_indicator_columns.sql"]
        with psycopg.connect(first.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO anomalies (symbol, type, window_start, window_end, observed,"
                " baseline, score, threshold, detected_at) VALUES"
                " ('BTCUSDT', 'volume_spike', 0, 60000, 2, 1, 5, 3, 1)"
            )
    with PostgresCluster(where) as again:
        assert apply_migrations(again.dsn) == []  # already there
        with psycopg.connect(again.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM anomalies").fetchone() == (1,)
    assert (where / "data" / "PG_VERSION").exists()


def test_missing_server_binaries_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(postgres.glob, "glob", lambda _pattern: [])
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("POSTGRES_BINDIR", raising=False)
    with pytest.raises(MissingDependency) as err:
        PostgresCluster()
    line = str(err.value)
    assert "\n" not in line and "apt-get install postgresql" in line
    assert os.environ["PATH"] == str(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to the postgres user")
def test_a_directory_the_postgres_user_cannot_reach_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    cluster = PostgresCluster(private / "pg")
    try:
        with pytest.raises(RuntimeError, match=r"cannot write .*postgres_dir"):
            cluster.start()
    finally:
        cluster.close()


def test_the_server_stops_when_marketd_dies_without_cleaning_up() -> None:
    """SIGKILL gives marketd no chance to stop the server: the guard's pipe does it."""
    cluster = PostgresCluster().start()
    try:
        assert cluster._proc is not None and cluster._proc.stdin is not None
        cluster._proc.stdin.close()  # what the kernel does when marketd dies
        assert cluster._proc.wait(60) == 0  # fast shutdown, clean exit
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.dsn, connect_timeout=2)
    finally:
        cluster.close()
