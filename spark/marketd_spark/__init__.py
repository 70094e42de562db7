"""Shared library of marketd's Spark submit scripts (spark/*.py); never imports the daemon.

The jobs read the raw_trades / raw_klines record contract (Kafka or JSON-lines files), reduce each
micro-batch in Spark, keep their small per-key state on the driver (versioned next to the Spark
checkpoint), and write Parquet (local or S3), PostgreSQL upserts and Redis latest values.
"""
