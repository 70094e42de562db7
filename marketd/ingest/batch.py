"""Batches for the producer: size-bounded slices of the tape keeper's output, in tape order.

On the ingest path the outbox (marketd/ingest/intake.py) cuts what one chunk of frames produced
into batches of at most `batch.size` records and offers them to the sink at once, from the
connection's own task: a batch is never held back waiting for more, so an idle pipeline adds no
latency, and under load a chunk holds many frames, so batches fill up. `split_batches` is the
same cut for callers holding a whole list. Pure: no I/O, no trio.
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
