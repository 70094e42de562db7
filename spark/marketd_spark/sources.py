"""Streaming sources: Kafka (production) or a directory of JSON-lines files (tests, offline use).

Every source yields one `value` string column holding a record of the ingest contract, so the
jobs parse them identically. Kafka is read by Spark's JVM connector when it is on the classpath
(spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>; it is not in
the pip wheel) or by the Python source in `kafka_source.py` (confluent-kafka only);
`--kafka-reader auto` picks the connector when Spark finds it, else Python. `topic` may be a
comma-separated list. Files must appear atomically (write elsewhere, then rename into the
directory).
"""

from __future__ import annotations

import argparse
import logging

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from marketd_spark import kafka_source
from marketd_spark.logs import event, get_logger

log = get_logger(__name__)

KAFKA_PACKAGE = "org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>"


class SourceError(Exception):
    pass


def read_values(spark: SparkSession, args: argparse.Namespace, topic: str) -> DataFrame:
    if args.source == "files":
        reader = spark.readStream.format("text")
        if args.max_files_per_trigger:
            reader = reader.option("maxFilesPerTrigger", str(args.max_files_per_trigger))
        return reader.load(args.input).select(F.col("value"))
    if args.kafka_bootstrap_servers.strip() == "embedded":
        raise SourceError(
            "KAFKA_BOOTSTRAP_SERVERS=embedded names the daemon's in-process mock cluster; give "
            "Spark its host:port (the daemon logs it) or a real broker"
        )
    choice = getattr(args, "kafka_reader", "auto")
    loaded: DataFrame | None = None
    reason = "requested"
    if choice in ("auto", "jvm"):
        try:
            loaded = _jvm(spark, args, topic)
        except SourceError:
            if choice == "jvm":
                raise
            reason = "connector not on the classpath"
    if loaded is None:
        loaded = _python(spark, args, topic)
        used = "python"
    else:
        used = "jvm"
        reason = "connector on the classpath" if choice == "auto" else reason
    args.kafka_reader_used = used
    event(log, "source.kafka", reader=used, reason=reason, topic=topic,
          bootstrap_servers=args.kafka_bootstrap_servers,
          options=",".join(sorted(getattr(args, "kafka_options", {}))) or "-")  # fmt: skip
    return loaded.select(F.col("value").cast("string").alias("value"))


def _jvm(spark: SparkSession, args: argparse.Namespace, topic: str) -> DataFrame:
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.kafka_bootstrap_servers)
        .option("subscribe", topic)
        .option("startingOffsets", args.starting_offsets)
        # Records deleted by retention before we read them are a gap, not a reason to stop.
        .option("failOnDataLoss", "false")
    )
    for key, value in getattr(args, "kafka_options", {}).items():
        reader = reader.option(f"kafka.{key}", value)
    if args.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(args.max_offsets_per_trigger))
    try:
        return reader.load()
    except AnalysisException as exc:
        if "KAFKA_DATA_SOURCE_NOT_ENABLED" not in str(exc):
            raise
        raise SourceError(
            f"the Kafka connector is not on Spark's classpath: run under spark-submit --packages "
            f"{KAFKA_PACKAGE}, use --kafka-reader python, or --source files"
        ) from exc


def _python(spark: SparkSession, args: argparse.Namespace, topic: str) -> DataFrame:
    options = {
        "subscribe": topic,
        "kafka.bootstrap.servers": args.kafka_bootstrap_servers,
        "startingOffsets": args.starting_offsets,
        "logLevel": logging.getLevelName(log.getEffectiveLevel()),
    }
    options.update({f"kafka.{k}": v for k, v in getattr(args, "kafka_options", {}).items()})
    if args.max_offsets_per_trigger:
        options["maxOffsetsPerTrigger"] = str(args.max_offsets_per_trigger)
    try:
        kafka_source.Settings.from_options(options)  # bad options fail here, not in a worker
    except kafka_source.KafkaSourceError as exc:
        raise SourceError(str(exc)) from exc
    kafka_source.register(spark)
    return spark.readStream.format(kafka_source.NAME).options(**options).load()
