"""Streaming sources: Kafka (production) or a directory of JSON-lines files (tests, offline use).

Both yield one `value` string column holding a record of the ingest contract, so the jobs parse
them identically. The Kafka seam needs the connector on the classpath (spark-submit --packages
org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>); it is not in the pip wheel.
Files must appear atomically (write elsewhere, then rename into the directory).
"""

from __future__ import annotations

import argparse

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

KAFKA_PACKAGE = "org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>"


class SourceError(Exception):
    pass


def read_values(spark: SparkSession, args: argparse.Namespace, topic: str) -> DataFrame:
    if args.source == "files":
        reader = spark.readStream.format("text")
        if args.max_files_per_trigger:
            reader = reader.option("maxFilesPerTrigger", str(args.max_files_per_trigger))
        return reader.load(args.input).select(F.col("value"))
    if args.kafka_bootstrap_servers == "embedded":
        raise SourceError(
            "KAFKA_BOOTSTRAP_SERVERS=embedded names the daemon's in-process mock cluster; give "
            "Spark its host:port (the daemon logs it) or a real broker"
        )
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.kafka_bootstrap_servers)
        .option("subscribe", topic)
        .option("startingOffsets", args.starting_offsets)
        # Records deleted by retention before we read them are a gap, not a reason to stop.
        .option("failOnDataLoss", "false")
    )
    if args.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(args.max_offsets_per_trigger))
    try:
        loaded = reader.load()
    except AnalysisException as exc:
        if "KAFKA_DATA_SOURCE_NOT_ENABLED" not in str(exc):
            raise
        raise SourceError(
            f"the Kafka connector is not on Spark's classpath: run under spark-submit --packages "
            f"{KAFKA_PACKAGE}, or use --source files"
        ) from exc
    return loaded.select(F.col("value").cast("string").alias("value"))
