"""Warm storage: idempotent upserts into PostgreSQL, one transaction per micro-batch.

Rows are keyed by symbol + window (the table's ON CONFLICT target), so a replayed batch updates the
rows it wrote before instead of duplicating them. The schema comes from spark/migrations/*.sql,
applied at start-up (idempotent, under an advisory lock) or by `python spark/migrate.py`.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from marketd_spark.sinks import Row, Table

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
_LOCK_ID = 0x6D61726B  # "mark": serialises concurrent migrators


def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations not applied yet, in file-name order; returns the ones applied."""
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
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
                    conn.execute(path.read_text(encoding="utf-8"))
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied


def upsert_sql(table: Table, key: tuple[str, ...] = ()) -> str:
    cols = ", ".join(table.pg_columns)
    values = ", ".join(["%s"] * len(table.pg_columns))
    key_cols = set(key)
    updates = ", ".join(
        [
            *(f"{c} = EXCLUDED.{c}" for c in table.pg_columns if c not in key_cols),
            "updated_at = now()",
        ]
    )
    return (
        f"INSERT INTO {table.name} ({cols}) VALUES ({values}) "
        f"ON CONFLICT {table.pg_conflict} DO UPDATE SET {updates}"
    )


def upsert(conn: psycopg.Connection, table: Table, rows: list[Row]) -> None:
    """The upsert itself, shared with the tests and anything else that fills these tables."""
    if not rows:
        return
    key = tuple(c.strip(" ()") for c in table.pg_conflict.split(","))
    with conn.cursor() as cur:
        cur.executemany(upsert_sql(table, key), [tuple(table.to_pg(r)) for r in rows])


class PostgresSink:
    def __init__(self, dsn: str, table: Table, *, apply_migrations: bool = True) -> None:
        self.dsn = dsn
        self.table = table
        if apply_migrations:
            migrate(dsn)

    def write(self, batch_id: int, rows: list[Row]) -> None:
        if not rows:
            return
        # A connection per batch: batches are seconds apart, and a fresh connection survives a
        # server restart between batches without reconnect logic.
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            upsert(conn, self.table, rows)

    def close(self) -> None:
        pass
