"""Pieces every job's `main` shares: interval parsing, sink construction, the run wrapper."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession

from marketd_spark.logs import event, get_logger, setup
from marketd_spark.runner import Processor, start, wait
from marketd_spark.session import get_session
from marketd_spark.sinks import Row, Sink, Table
from marketd_spark.sinks.parquet import ParquetSink
from marketd_spark.sinks.postgres import PostgresSink
from marketd_spark.sinks.redis import Latest, RedisSink
from marketd_spark.sources import SourceError

log = get_logger(__name__)

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def interval_ms(label: str) -> int:
    m = re.fullmatch(r"([1-9][0-9]{0,2})([smhd])", label)
    if not m:
        raise argparse.ArgumentTypeError(f"{label!r} is not an interval like 1m, 5m, 15m, 1h")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def make_sinks(
    args: argparse.Namespace,
    table: Table,
    *,
    latest: Callable[[list[Row]], Iterable[Latest]] | None = None,
    events: Callable[[list[Row]], Iterable[tuple[str, int, Row]]] | None = None,
) -> list[Sink]:
    sinks: list[Sink] = []
    for name in args.sink:
        if name == "parquet":
            sinks.append(ParquetSink(args.output, table))
        elif name == "postgres":
            sinks.append(PostgresSink(args.dsn, table))
        elif name == "redis":
            sinks.append(RedisSink(args.redis_url, latest=latest, events=events))
    return sinks


def run_main(
    app_name: str,
    args: argparse.Namespace,
    build: Callable[[SparkSession, argparse.Namespace], tuple[DataFrame, Processor]],
) -> int:
    """Session, source, processor, query: the body of every submit script.

    Exit status: 0 after --once or a clean stop, 1 when the source cannot be opened or the query
    failed, 2 for a files source whose local --input directory does not exist."""
    setup(args.log_level)
    local_input = args.input.removeprefix("file://") if args.input else ""
    if args.source == "files" and "://" not in local_input and not os.path.isdir(local_input):
        # Spark would fail only after starting the JVM, with a stack trace.
        event(log, "job.bad_arguments", level=logging.ERROR, job=app_name,
              error=f"--input {args.input}: no such directory")  # fmt: skip
        return 2
    spark = get_session(app_name, args.master)
    try:
        values, processor = build(spark, args)
    except (SourceError, AnalysisException) as exc:
        # Typically the Kafka connector missing from the classpath (spark-submit --packages).
        event(log, "job.failed", level=logging.ERROR, job=app_name, source=args.source,
              error=str(exc).splitlines()[0][:500])  # fmt: skip
        spark.stop()
        return 1
    reader = getattr(args, "kafka_reader_used", None) if args.source == "kafka" else None
    event(log, "job.start", job=app_name, source=args.source, sinks=",".join(args.sink),
          **({"kafka_reader": reader} if reader else {}))  # fmt: skip
    query = start(spark, args, values, processor)
    code = wait(query, processor)
    for attempt in range(2, START_ATTEMPTS + 1):
        if code == 0 or not _worker_start_timeout(query):
            break
        # Spark gives a new Python process (the Python Kafka source's planner) a fixed 10 s to
        # connect back; a heavily loaded host can miss that. The query restarts from its
        # checkpoint, so a retry loses and repeats nothing.
        event(log, "job.retry", level=logging.WARNING, job=app_name, attempt=attempt,
              reason="python worker did not connect back in time")  # fmt: skip
        values, processor = build(spark, args)
        query = start(spark, args, values, processor)
        code = wait(query, processor)
    spark.stop()
    return code


START_ATTEMPTS = 5


def _worker_start_timeout(query: Any) -> bool:
    exc = query.exception()
    return exc is not None and "failed to connect back" in str(exc)
