"""Builds the SparkSession of a job: local[2] when run with plain `python` and no --master.

Under spark-submit the master and resources come from spark-submit; the session time zone is
always UTC so epoch-ms <-> timestamp <-> date conversions (Parquet date partitions) never depend on
the host's zone.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


def under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_session(app_name: str, master: str | None = None) -> SparkSession:
    builder = SparkSession.builder.appName(app_name).config("spark.sql.session.timeZone", "UTC")
    if master or not under_spark_submit():
        local = master is None or master.startswith("local")
        builder = builder.master(master or "local[2]")
        if local:
            # Plain `python spark/<job>.py`: Python workers must be this interpreter, the driver
            # binds loopback only, and a 2-core box wants few shuffle partitions and no UI port.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            builder = (
                builder.config("spark.sql.shuffle.partitions", "2")
                .config("spark.ui.enabled", "false")
                .config("spark.driver.host", "127.0.0.1")
            )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark
