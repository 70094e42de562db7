"""Batch decoded records for the producer: size-bounded, age-bounded, never waiting when idle.

Receives chunks (lists of `Outgoing`) from the decoder, emits batches of at most BATCH_SIZE
records to the producer. A partial batch goes out as soon as nothing more is waiting, so an idle
pipeline adds no latency; under load batches fill up. A batch is never held longer than
BATCH_TIMEOUT_MS, checked on a BATCH_CHECK_INTERVAL_MS grid. On end of input the last partial
batch is emitted and the output channel closed: nothing accepted is dropped.
"""

from __future__ import annotations

import math

import attrs
import trio

from marketd.ingest.decode import Outgoing
from marketd.metrics import FastHistogramCollector

Batch = list[Outgoing]


@attrs.frozen
class BatchPolicy:
    size: int = 100
    timeout_s: float = 0.1
    check_interval_s: float = 0.01

    def deadline(self, started: float) -> float:
        """When a batch started at `started` must go out, rounded up to the check grid."""
        due = started + self.timeout_s
        step = self.check_interval_s
        return math.ceil(due / step) * step if step > 0 else due


async def run_batcher(
    chunks_rx: trio.MemoryReceiveChannel[list[Outgoing]],
    batches_tx: trio.MemorySendChannel[Batch],
    policy: BatchPolicy,
    *,
    batch_sizes: FastHistogramCollector | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    size = policy.size
    sizes = batch_sizes.labels() if batch_sizes is not None else None
    async with chunks_rx, batches_tx:
        task_status.started()
        pending: list[Outgoing] = []
        deadline = math.inf
        open_input = True
        while open_input or pending:
            if not pending:
                try:
                    pending = list(await chunks_rx.receive())
                except trio.EndOfChannel:
                    break
                deadline = policy.deadline(trio.current_time())
            # Take whatever is already waiting, without yielding, until full or past the age bound.
            while len(pending) < size:
                try:
                    pending.extend(chunks_rx.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    open_input = False
                    break
                if trio.current_time() >= deadline:
                    break
            # Emit full batches, then the remainder: nothing more is waiting (or it is too old).
            while pending:
                batch, pending = pending[:size], pending[size:]
                if sizes is not None:
                    sizes.observe(len(batch))
                await batches_tx.send(batch)
                if pending and len(pending) < size:
                    deadline = policy.deadline(trio.current_time())
                    break
