"""The analytics tables' schema: the numbered SQL migrations beside this file, and their runner.

`migrate(dsn)` applies the *.sql files of this package not applied yet, in file-name order, each
in its own transaction, recorded in `schema_migrations`, under an advisory lock so that concurrent
migrators serialise: a job's PostgreSQL sink at start-up, `python spark/migrate.py`, and the
daemon's embedded PostgreSQL (marketd/analytics/postgres.py). It is the only runner: the daemon
loads this file from `analytics.spark_dir` by path, so it imports nothing but the standard library
and psycopg (spark/ and marketd import nothing from each other).
"""

from __future__ import annotations

from pathlib import Path

# The SQL files ship with the package (the Spark image mounts spark/, the daemon reads them from
# analytics.spark_dir): next to this module.
DIRECTORY = Path(__file__).resolve().parent
# pg_advisory_lock key ("mark"): every migrator takes the same one.
LOCK_ID = 0x6D61726B


def migrate(
    dsn: str, directory: Path = DIRECTORY, *, connect_timeout_s: float | None = None
) -> list[str]:
    """Apply the migrations not applied yet, in file-name order; returns the ones applied.

    `connect_timeout_s`: give up connecting after this long (None: the driver's default).
    """
    import psycopg

    timeout = {} if connect_timeout_s is None else {"connect_timeout": round(connect_timeout_s)}
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True, **timeout) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
            for path in sorted(directory.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    # bytes: the file is one script, sent as is (no parameters to bind)
                    conn.execute(path.read_text(encoding="utf-8").encode())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    return applied
