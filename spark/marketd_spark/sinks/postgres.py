"""Warm storage: idempotent upserts into PostgreSQL, one transaction per micro-batch.

Rows are keyed by symbol + window (the table's ON CONFLICT target), so a replayed batch updates the
rows it wrote before instead of duplicating them. The schema is marketd_spark/migrations (SQL
files and their one runner, `migrate`), applied at start-up (idempotent, under an advisory lock)
or by `python spark/migrate.py`.
"""

from __future__ import annotations

import psycopg

from marketd_spark.migrations import migrate
from marketd_spark.sinks import Row, Table

__all__ = ["PostgresSink", "migrate", "upsert", "upsert_sql"]


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
