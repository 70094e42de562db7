"""Runs one job: source -> foreachBatch(processor) with driver state -> sinks; stops cleanly.

`start(spark, args, values, processor)` starts the streaming query (Trigger.AvailableNow with
--once, else a processing-time trigger); each micro-batch loads the state saved by the previous
batch, lets the processor reduce the batch and write its sinks, then saves the new state. `main`
wraps that for the submit scripts: SIGINT/SIGTERM stop the query between batches, exit status 0 on
a clean stop, 1 when the query failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from marketd_spark.logs import event, get_logger
from marketd_spark.state import StateStore

log = get_logger(__name__)


class Processor(Protocol):
    name: str

    def process(self, batch: DataFrame, batch_id: int, state: dict[str, Any]) -> dict[str, Any]:
        """Reduce one micro-batch, write the sinks, return the state to save."""
        ...

    def close(self) -> None: ...


def state_dir(checkpoint: str) -> Path:
    if "://" in checkpoint and not checkpoint.startswith("file://"):
        raise ValueError(f"--checkpoint must be a local or mounted path, not {checkpoint!r}")
    return Path(checkpoint.removeprefix("file://")) / "driver_state"


def start(
    spark: SparkSession, args: argparse.Namespace, values: DataFrame, processor: Processor
) -> StreamingQuery:
    store = StateStore(state_dir(args.checkpoint))

    def on_batch(batch: DataFrame, batch_id: int) -> None:
        t0 = time.monotonic()
        state = store.load_before(batch_id)
        new_state = processor.process(batch, batch_id, state)
        store.save(batch_id, new_state)
        event(
            log,
            "batch.done",
            job=processor.name,
            batch=batch_id,
            seconds=round(time.monotonic() - t0, 3),
        )

    writer = (
        values.writeStream.queryName(processor.name)
        .foreachBatch(on_batch)
        .option("checkpointLocation", os.path.join(args.checkpoint, "spark"))
    )
    if args.once:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{args.trigger_seconds} seconds")
    return writer.start()


def wait(query: StreamingQuery, processor: Processor) -> int:
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        event(log, "job.stopping", job=processor.name, signal=signal.Signals(signum).name)
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Short waits so the signal handler runs; query.stop() must come from this thread.
        while query.isActive and not stopping:
            try:
                query.awaitTermination(1)
            except StreamingQueryException:
                break  # reported below from query.exception(), as job.failed
        if stopping:
            query.stop()
        exc = query.exception()
        if exc is not None:
            event(log, "job.failed", level=logging.ERROR, job=processor.name, error=str(exc)[:2000])
            return 1
        event(log, "job.stopped", job=processor.name)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        processor.close()
