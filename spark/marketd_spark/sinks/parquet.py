"""Cold storage: Parquet partitioned by date (UTC, of the row's time column) and symbol.

Layout: <root>/date=YYYY-MM-DD/symbol=SYM/part-<batch id>.parquet (Hive style; the partition
columns live in the path, as Spark and pyarrow datasets expect). A replayed batch overwrites its own
files. <root> is a local path or s3a:// (or s3://) bucket/prefix: MinIO and other S3-compatible
stores through AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), region AWS_REGION or AWS_DEFAULT_REGION.
Written with pyarrow from the driver, so no Hadoop s3a jars are needed.
"""

from __future__ import annotations

import datetime as dt
import os
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from marketd_spark.sinks import Row, Table

PARTITIONS = ("date", "symbol")


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    parts = urlsplit(root)
    if parts.scheme in ("s3", "s3a"):
        env = os.environ
        endpoint = (
            env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or env.get("S3_ENDPOINT_URL")
        )
        kwargs: dict[str, object] = {
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        }
        if env.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = env.get("AWS_SECRET_ACCESS_KEY", "")
            if env.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
        if endpoint:
            ep = urlsplit(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        return pafs.S3FileSystem(**kwargs), f"{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parts.path)
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)  # hdfs://, gs://, ... as pyarrow knows them
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def utc_date(epoch_ms: int) -> str:
    return dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")


class ParquetSink:
    def __init__(self, root: str, table: Table) -> None:
        self.fs, self.root = filesystem(root)
        self.table = table
        self.file_schema = pa.schema([f for f in table.schema if f.name not in PARTITIONS])
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    def write(self, batch_id: int, rows: list[Row]) -> None:
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            key = (utc_date(row[self.table.time_column]), row["symbol"])
            groups.setdefault(key, []).append(row)
        for (date, symbol), part in sorted(groups.items()):
            directory = f"{self.root}/date={date}/symbol={symbol}"
            self.fs.create_dir(directory, recursive=True)
            data = pa.Table.from_pylist(part, schema=self.file_schema)
            final = f"{directory}/part-{batch_id:012d}.parquet"
            if self._local:
                # Readers skip names starting with "." (Spark, pyarrow): no half-written file.
                tmp = f"{directory}/.part-{batch_id:012d}.parquet.tmp"
                pq.write_table(data, tmp, filesystem=self.fs)
                self.fs.move(tmp, final)
            else:
                pq.write_table(data, final, filesystem=self.fs)  # an S3 PUT is atomic

    def close(self) -> None:
        pass
