"""A Kafka streaming source in Python (Spark 4 data source API): no JVM connector needed.

Reads `subscribe` (comma-separated topics) through confluent-kafka and emits one binary `value`
column per record, like the JVM connector. The driver side plans each micro-batch from the
partitions' watermarks (admission control: `maxOffsetsPerTrigger`; Trigger.AvailableNow stops at
the offsets seen when the query started); every Spark task then reads one offset range on an
executor. Offsets live only in Spark's checkpoint, so a restarted query resumes exactly where the
last committed batch ended. Records deleted by retention before they were read are logged as a
gap (`kafka.gap ... lost=N`) and skipped, never a failure (the connector's failOnDataLoss=false).
Options: `kafka.<librdkafka property>` pass through (bootstrap.servers, security.protocol,
sasl.*, ssl.*), `startingOffsets`, `maxOffsetsPerTrigger`, `maxRecordsPerTask`, `pollTimeoutMs`.
See spark/README.md ("Kafka source").
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
import pyarrow as pa
from confluent_kafka.admin import AdminClient, OffsetSpec
from pyspark.sql import SparkSession
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    ReadMinRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import StructType

from marketd_spark import kafka_offsets as ko
from marketd_spark.logs import event, get_logger, setup

log = get_logger(__name__)

NAME = "marketd_kafka"
SCHEMA = "value binary"
ARROW_BATCH_ROWS = 10_000

# Defaults of the consumers, before the `kafka.*` options. Why each one: spark/README.md.
READER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    # Deleted records must surface as an error we count, not a silent jump (see `read`).
    "auto.offset.reset": "error",
    "enable.partition.eof": True,
    # The Spark connector's default: a range planned from the high watermark is fully readable.
    "isolation.level": "read_uncommitted",
    # A fast reader drains the local queue; the default 1 s backoff would stall it (BENCHMARKS.md).
    "fetch.queue.backoff.ms": 10,
    # A real broker answers as soon as data is there; librdkafka's mock only when this expires.
    "fetch.wait.max.ms": 10,
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
}


class KafkaSourceError(Exception):
    """The Kafka source cannot go on (bad options, unreachable brokers, a read that stalled)."""


@dataclass(frozen=True)
class Settings:
    topics: tuple[str, ...]
    client: dict[str, str]  # librdkafka properties (the `kafka.*` options, prefix removed)
    starting: str = "earliest"
    max_offsets_per_trigger: int = 0
    max_records_per_task: int = 0
    poll_timeout_s: float = 120.0
    log_level: str = "INFO"
    commit_group: str = field(default="")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Settings:
        opts = dict(options.items())
        lower = {k.lower(): v for k, v in opts.items()}
        topics = tuple(t.strip() for t in lower.get("subscribe", "").split(",") if t.strip())
        if not topics:
            raise KafkaSourceError("option 'subscribe' (comma-separated topics) is required")
        client = {k[len("kafka.") :]: v for k, v in opts.items() if k.lower().startswith("kafka.")}
        if not client.get("bootstrap.servers"):
            raise KafkaSourceError("option 'kafka.bootstrap.servers' is required")
        try:
            settings = cls(
                topics=topics,
                client=client,
                starting=lower.get("startingoffsets", "earliest"),
                max_offsets_per_trigger=int(lower.get("maxoffsetspertrigger", "0") or 0),
                max_records_per_task=int(lower.get("maxrecordspertask", "0") or 0),
                poll_timeout_s=int(lower.get("polltimeoutms", "120000")) / 1000,
                log_level=lower.get("loglevel", "INFO"),
                # Offsets are committed to this group only for lag monitoring (see `commit`).
                commit_group=client.get("group.id", ""),
            )
        except ValueError as exc:
            raise KafkaSourceError(f"bad Kafka source option: {exc}") from exc
        ko.parse_starting(settings.starting, topics)  # fail at start, not at the first batch
        return settings

    def consumer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = dict(READER_DEFAULTS)
        conf["group.id"] = f"marketd-spark-{uuid.uuid4().hex[:12]}"  # assign() only: never joins
        conf["client.id"] = "marketd-spark-source"
        conf.update(self.client)
        return conf


class KafkaInputPartition(InputPartition):
    def __init__(self, rng: ko.OffsetRange) -> None:
        super().__init__(rng)
        self.range = rng


class KafkaSource(DataSource):
    """`spark.readStream.format("marketd_kafka").option("subscribe", ...)`; see the module doc."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return KafkaStreamReader(Settings.from_options(self.options))


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Driver side: plans offsets from watermarks; `read` runs on the executors."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any = None  # created on first use: this object is pickled to executors
        self._committer: Any = None
        self._target: ko.Offsets | None = None  # Trigger.AvailableNow: stop here
        self._latest: ko.Offsets = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    # -- Kafka metadata (driver) ----------------------------------------------------------------

    def _client(self) -> Any:
        if self._admin is None:
            conf = {k: v for k, v in self.settings.consumer_config().items()
                    if k not in READER_DEFAULTS and k != "group.id"}  # fmt: skip
            self._admin = AdminClient(conf)
        return self._admin

    def _partitions(self) -> list[ko.TopicPartition]:
        out: list[ko.TopicPartition] = []
        for topic in self.settings.topics:
            try:
                md = self._client().list_topics(topic, timeout=30).topics.get(topic)
            except confluent_kafka.KafkaException as exc:
                raise KafkaSourceError(f"Kafka metadata for {topic!r}: {exc}") from exc
            if md is None or md.error is not None:
                continue  # not created yet: its partitions join (from earliest) when they appear
            out += [(topic, p) for p in sorted(md.partitions)]
        return out

    def _watermarks(self, tps: list[ko.TopicPartition], which: str) -> ko.Offsets:
        if not tps:
            return {}
        spec = OffsetSpec.earliest() if which == "earliest" else OffsetSpec.latest()
        request = {confluent_kafka.TopicPartition(t, p): spec for t, p in tps}
        try:
            futures = self._client().list_offsets(request, request_timeout=30)
            return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
        except confluent_kafka.KafkaException as exc:
            raise KafkaSourceError(f"Kafka {which} offsets ({len(tps)} partitions): {exc}") from exc

    # -- DataSourceStreamReader ------------------------------------------------------------------

    def initialOffset(self) -> dict[str, Any]:
        tps = self._partitions()
        starting = ko.parse_starting(self.settings.starting, self.settings.topics)
        if starting == "latest":
            offsets = self._watermarks(tps, "latest")
        else:
            offsets = self._watermarks(tps, "earliest")
            if isinstance(starting, dict):
                latest = self._watermarks(tps, "latest")
                for tp, off in starting.items():
                    if tp in offsets:
                        offsets[tp] = latest[tp] if off == -1 else offsets[tp] if off == -2 else off
        setup(self.settings.log_level)
        event(log, "kafka.source_start", topics=",".join(self.settings.topics),
              partitions=len(tps), starting=self.settings.starting)  # fmt: skip
        return ko.to_json(offsets)

    def getDefaultReadLimit(self) -> ReadLimit:
        n = self.settings.max_offsets_per_trigger
        return ReadMaxRows(n) if n > 0 else ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self._watermarks(self._partitions(), "latest")
        event(log, "kafka.available_now", records_until=sum(self._target.values()))

    def latestOffset(self, start: dict[str, Any], limit: ReadLimit) -> dict[str, Any]:
        tps = self._partitions()
        earliest = self._watermarks(tps, "earliest")
        latest = self._watermarks(tps, "latest")
        self._latest = latest
        if self._target is not None:
            latest = ko.cap(latest, self._target)
        begin = ko.from_json(start)
        max_rows = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        end = ko.admit(begin, earliest, latest, max_rows)
        if isinstance(limit, ReadMinRows):
            ready = sum(end[tp] - max(begin.get(tp, 0), earliest.get(tp, 0)) for tp in end)
            if ready < limit.min_rows:
                return start
        return ko.to_json(end)

    def reportLatestOffset(self) -> dict[str, Any] | None:
        return ko.to_json(self._latest) if self._latest else None

    def partitions(self, start: dict[str, Any], end: dict[str, Any]) -> list[InputPartition]:
        begin, stop = ko.from_json(start), ko.from_json(end)
        new = [tp for tp in stop if tp not in begin]
        # A partition that appeared in this batch starts at its earliest offset (as in the JVM
        # connector); a replay after a restart asks again, so it never reads before it.
        earliest = self._watermarks(new, "earliest") if new else {}
        rngs = ko.ranges(begin, stop, earliest,
                         max_records_per_task=self.settings.max_records_per_task)  # fmt: skip
        return [KafkaInputPartition(r) for r in rngs]

    def read(self, partition: InputPartition) -> Iterator[Any]:
        assert isinstance(partition, KafkaInputPartition)
        return read_range(self.settings, partition.range)

    def commit(self, end: dict[str, Any]) -> None:
        """Spark finished every offset before `end`. The checkpoint is what a restart uses; with
        `kafka.group.id` set the offsets also go to that group, so lag tools can watch the job."""
        if not self.settings.commit_group:
            return
        if self._committer is None:
            conf = {k: v for k, v in self.settings.consumer_config().items()
                    if k not in READER_DEFAULTS}  # fmt: skip
            conf["enable.auto.commit"] = False
            self._committer = confluent_kafka.Consumer(conf)
        TP = confluent_kafka.TopicPartition
        offsets = [TP(t, p, o) for (t, p), o in ko.from_json(end).items()]
        if offsets:
            try:
                self._committer.commit(offsets=offsets, asynchronous=False)
            except confluent_kafka.KafkaException as exc:
                # Monitoring only: the next commit catches up.
                event(log, "kafka.commit_failed", level=logging.WARNING, error=str(exc)[:300])

    def stop(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None
        self._admin = None


# -- executors ------------------------------------------------------------------------------------


def read_range(settings: Settings, rng: ko.OffsetRange) -> Iterator[Any]:
    """Yield Arrow batches of the values in `rng`; deleted records are counted as a gap."""
    setup(settings.log_level)
    KE = _KE
    consumer = confluent_kafka.Consumer(settings.consumer_config())
    tp = confluent_kafka.TopicPartition(rng.topic, rng.partition, rng.start)
    pos = rng.start
    values: list[bytes | None] = []
    deadline = time.monotonic() + settings.poll_timeout_s
    try:
        consumer.assign([tp])
        while pos < rng.end:
            msgs = consumer.consume(min(ARROW_BATCH_ROWS, rng.end - pos), 0.1)
            if not msgs and time.monotonic() > deadline:
                raise KafkaSourceError(
                    f"no record of {rng.topic}[{rng.partition}] offsets {pos}..{rng.end} within "
                    f"{settings.poll_timeout_s:g} s (pollTimeoutMs)"
                )
            for m in msgs:
                err = m.error()
                if err is None:
                    off = m.offset() or 0  # never None on a message without error
                    if off >= rng.end:
                        pos = rng.end
                        break
                    values.append(m.value())
                    pos = off + 1
                    continue
                code = err.code()
                if code == KE._PARTITION_EOF:
                    if pos < rng.end:
                        # The partition ends before the planned range (topic recreated): the
                        # rest does not exist. Nothing more will come.
                        _gap(rng, pos, rng.end, reason="truncated")
                        pos = rng.end
                    break
                if code in (KE._AUTO_OFFSET_RESET, KE.OFFSET_OUT_OF_RANGE):
                    low, _high = consumer.get_watermark_offsets(tp, timeout=30, cached=False)
                    lost_to = min(max(low, pos), rng.end)
                    _gap(rng, pos, lost_to, reason="retention")
                    pos = lost_to
                    if pos < rng.end:
                        tp = confluent_kafka.TopicPartition(rng.topic, rng.partition, pos)
                        consumer.assign([tp])
                    break
                if err.retriable() or code in _TRANSIENT:
                    continue  # librdkafka reconnects and refetches by itself
                raise KafkaSourceError(f"{rng.topic}[{rng.partition}]: {err}")
            if msgs:
                deadline = time.monotonic() + settings.poll_timeout_s
            if len(values) >= ARROW_BATCH_ROWS:
                yield _batch(values)
                values = []
        if values:
            yield _batch(values)
    finally:
        consumer.close()


_KE = confluent_kafka.KafkaError
# librdkafka reconnects and refetches by itself after these.
_TRANSIENT = frozenset((_KE._TRANSPORT, _KE._ALL_BROKERS_DOWN, _KE._TIMED_OUT, _KE._RESOLVE))


def _batch(values: list[bytes | None]) -> Any:
    return pa.RecordBatch.from_arrays([pa.array(values, type=pa.binary())], names=["value"])


def _gap(rng: ko.OffsetRange, first: int, end: int, *, reason: str) -> None:
    if end > first:
        event(log, "kafka.gap", level=logging.WARNING, topic=rng.topic, partition=rng.partition,
              from_offset=first, to_offset=end, lost=end - first, reason=reason)  # fmt: skip


# -- registration ---------------------------------------------------------------------------------

_registered: set[str] = set()


def register(spark: SparkSession) -> None:
    """Make `format("marketd_kafka")` available and ship this package to the Python workers.

    The source's planner (a Python process beside the driver) and the executors import
    `marketd_spark` to unpickle it. The package directory is added with `addFile(recursive)`: it
    lands in every node's SparkFiles root, which Spark puts on each Python worker's sys.path
    (addPyFile zips reach the executors' tasks but not the streaming planner)."""
    sc = spark.sparkContext
    app = sc.applicationId
    if app in _registered:
        return
    spark_dir = str(Path(__file__).resolve().parents[1])
    current = sc.environment.get("PYTHONPATH", "")
    if spark_dir not in current.split(os.pathsep):
        sc.environment["PYTHONPATH"] = os.pathsep.join(p for p in (current, spark_dir) if p)
    sc.addFile(str(Path(__file__).resolve().parent), recursive=True)
    wrapper = _fast_start_python(sc) if sc.master.startswith("local") else None
    previous = sc.pythonExec
    if wrapper is not None:
        sc.pythonExec = wrapper  # only the source's workers: restored right after registering
    try:
        spark.dataSource.register(KafkaSource)
    finally:
        sc.pythonExec = previous
    _registered.add(app)


def _fast_start_python(sc: Any) -> str | None:
    """A launcher for the source's Python workers that imports pyspark from its installed
    directory (with compiled .pyc) rather than from the pyspark.zip Spark puts first on their
    PYTHONPATH, which is compiled from source by every new process: ~2 s of CPU instead of
    ~0.6 s. It matters because Spark gives the planner process a fixed 10 s to connect back,
    which a loaded 2-core host misses (spark/README.md). Local masters only: the launcher is a
    file on this host."""
    import pyspark

    site = Path(pyspark.__file__).resolve().parents[1]
    if not (site / "pyspark" / "__pycache__").is_dir() or not os.path.exists(sc.pythonExec):
        return None
    fd, path = tempfile.mkstemp(prefix="marketd-spark-python-", suffix=".sh")
    with os.fdopen(fd, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sc.pythonExec}" "$@"\n'
        )
    os.chmod(path, 0o755)
    atexit.register(_unlink, path)
    return path


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
