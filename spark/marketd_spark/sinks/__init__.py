"""Sinks of the jobs' results: Parquet (local or S3), PostgreSQL upserts, Redis latest values.

Every sink is idempotent per micro-batch: a batch that Spark replays after a crash rewrites the same
Parquet files (named by batch id), upserts the same keys and sets the same Redis values, so a replay
never duplicates a row. `Table` describes one output: its columns and its upsert key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

Row = dict[str, Any]


@dataclass(frozen=True)
class Table:
    name: str  # PostgreSQL table; also names the job in logs
    schema: pa.Schema  # the Parquet columns, partition columns (symbol, date) included
    time_column: str  # epoch ms column whose UTC date partitions the Parquet output
    pg_columns: tuple[str, ...]
    pg_conflict: str  # the ON CONFLICT target, e.g. "(symbol, interval, window_start)"
    to_pg: Callable[[Row], Sequence[Any]]


class Sink(Protocol):
    def write(self, batch_id: int, rows: list[Row]) -> None: ...

    def close(self) -> None: ...
