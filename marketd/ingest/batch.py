"""Batches for the producer: size-bounded slices of the decode stage's output, in tape order.

The decode stage (marketd/ingest/pipeline.py `run_decoder`) cuts what one wake-up produced into
batches of at most `batch.size` records and hands them straight to the producer stage: a batch
is never held back waiting for more, so an idle pipeline adds no latency, and under load each
wake-up takes thousands of frames, so batches fill up. (A separate batcher task used to re-slice
the decoder's chunks: one more task wake-up per chunk for no reordering, docs/performance.md.)
Pure: no I/O, no trio.
"""

from __future__ import annotations

from marketd.ingest.decode import Outgoing

Batch = list[Outgoing]


def split_batches(records: list[Outgoing], size: int) -> list[Batch]:
    """`records` cut into consecutive batches of at most `size` (≥ 1), order kept; the list
    itself when it fits (no copy)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, not {size}")
    if len(records) <= size:
        return [records] if records else []
    return [records[i : i + size] for i in range(0, len(records), size)]
