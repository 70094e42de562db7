"""What the book keeper publishes, built from the core's values (pure: no I/O, no trio).

Receives validated depth values and the sync core's commands; returns the contract's Kafka
records (marketd/records.py: raw_depth, raw_depth_partial, book_snapshots, raw_gaps of kind
`depth`) encoded as JSON, and classifies a refused depth payload into the dead-letter reason
codes every other kind uses (README, "DLQ reasons"). docs/books.md describes the records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from marketd import records as rec
from marketd.books.model import INT64_MAX, DepthDataError, DepthError
from marketd.books.sync import BookView, PublishGap, SnapshotReason

_ENCODE = msgspec.json.Encoder().encode
_SIGNED = re.compile(r"-[0-9]+(?:\.[0-9]+)?")
_UNSIGNED = re.compile(r"[0-9]+(?:\.[0-9]+)?")
DIFF_KEYS: Final = ("e", "E", "s", "U", "u", "b", "a")
PARTIAL_KEYS: Final = ("lastUpdateId", "bids", "asks")


@dataclass(frozen=True, slots=True, kw_only=True)
class BookTopics:
    raw_depth: str = "raw_depth"
    raw_depth_partial: str = "raw_depth_partial"
    book_snapshots: str = "book_snapshots"
    gaps: str = "raw_gaps"
    dlq: str = "raw_dlq"


def depth_value(
    *,
    symbol: str,
    first_update_id: int,
    last_update_id: int,
    bids: rec.Levels,
    asks: rec.Levels,
    event_time_ms: int,
    ingested_at_ms: int,
    stream: str,
) -> bytes:
    return _ENCODE(
        rec.DepthRecord(
            symbol=symbol,
            first_update_id=first_update_id,
            last_update_id=last_update_id,
            bids=bids,
            asks=asks,
            event_time=event_time_ms,
            ingested_at=ingested_at_ms,
            source=rec.SOURCE,
            stream=stream,
            schema_version=rec.SCHEMA_VERSION,
        )
    )


class _DepthRecordRaw(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """records.DepthRecord with the level arrays as ready JSON (same fields, same order)."""

    symbol: str
    first_update_id: int
    last_update_id: int
    bids: msgspec.Raw
    asks: msgspec.Raw
    event_time: int
    ingested_at: int
    source: str
    stream: str
    schema_version: int


def depth_value_raw(
    *,
    symbol: str,
    first_update_id: int,
    last_update_id: int,
    bids_json: msgspec.Raw,
    asks_json: msgspec.Raw,
    event_time_ms: int,
    ingested_at_ms: int,
    stream: str,
) -> bytes:
    """`depth_value`, byte for byte, with the levels as the frame's own compact JSON arrays
    (model.decode_diff checked them): they are copied, not decoded and encoded again."""
    return _ENCODE(
        _DepthRecordRaw(
            symbol=symbol,
            first_update_id=first_update_id,
            last_update_id=last_update_id,
            bids=bids_json,
            asks=asks_json,
            event_time=event_time_ms,
            ingested_at=ingested_at_ms,
            source=rec.SOURCE,
            stream=stream,
            schema_version=rec.SCHEMA_VERSION,
        )
    )


def partial_value(
    *,
    symbol: str,
    last_update_id: int,
    bids: rec.Levels,
    asks: rec.Levels,
    depth: int,
    ingested_at_ms: int,
    stream: str,
) -> bytes:
    return _ENCODE(
        rec.DepthPartialRecord(
            symbol=symbol,
            last_update_id=last_update_id,
            bids=bids,
            asks=asks,
            depth=depth,
            event_time=None,
            ingested_at=ingested_at_ms,
            source=rec.SOURCE,
            stream=stream,
            schema_version=rec.SCHEMA_VERSION,
        )
    )


def snapshot_value(view: BookView, reason: SnapshotReason, ingested_at_ms: int) -> bytes:
    """A book_snapshots record; an out-of-sync view carries no levels (the core's view)."""
    return _ENCODE(
        rec.BookSnapshotRecord(
            symbol=view.symbol,
            last_update_id=view.last_update_id,
            event_time=view.event_time_ms,
            bids=view.bids,
            asks=view.asks,
            depth=view.depth,
            in_sync=view.in_sync,
            reason=reason.value,
            ingested_at=ingested_at_ms,
            source=rec.SOURCE,
            schema_version=rec.SCHEMA_VERSION,
        )
    )


def gap_value(gap: PublishGap, stream: str, detected_at_ms: int) -> bytes:
    """A raw_gaps record of kind `depth`: the update ids the book skipped, up to the id of the
    snapshot it was rebuilt from (`repaired`: the book is exact again from there)."""
    return _ENCODE(
        rec.GapRecord(
            symbol=gap.symbol,
            stream=stream,
            kind=gap.kind,
            from_id=gap.from_update_id,
            to_id=gap.to_update_id,
            from_time=None,
            to_time=None,
            reason=gap.reason.value,
            repaired=gap.repaired,
            detected_at=detected_at_ms,
            schema_version=rec.SCHEMA_VERSION,
        )
    )


# -- dead-letter reasons ------------------------------------------------------------------------


def reject_reason(exc: DepthDataError, payload: Any, *, partial: bool) -> str:
    """The dead-letter reason code (ingest's `Reason` values) of a refused depth payload.

    The core says what class of problem it found; the shared codes are finer (a negative
    quantity and an unparsable one differ), so the payload is looked at again, on this rare
    path only.
    """
    reason = exc.reason
    if reason is DepthError.WRONG_SYMBOL:
        return "symbol_mismatch"
    if reason is DepthError.WRONG_EVENT:
        return "event_type_mismatch"
    if reason is DepthError.TOO_DEEP:
        return "inconsistent_values"  # more levels than the stream name says
    if not isinstance(payload, Mapping):
        return "not_an_object"
    if reason is DepthError.BAD_FIELD:
        keys = PARTIAL_KEYS if partial else DIFF_KEYS
        if any(k not in payload for k in keys):
            return "missing_field"
        return "wrong_type"
    if reason is DepthError.BAD_ID:
        for key in ("lastUpdateId",) if partial else ("U", "u"):
            value = payload.get(key)
            if isinstance(value, int) and value < 0:
                return "negative_value"
            if isinstance(value, int) and value > INT64_MAX:
                return "out_of_range"
        return "inconsistent_values"  # U > u
    return _level_reason(payload, partial=partial)


def _level_reason(payload: Mapping[str, Any], *, partial: bool) -> str:
    for key in ("bids", "asks") if partial else ("b", "a"):
        side = payload.get(key)
        if not isinstance(side, list):
            continue
        for item in side:
            if not isinstance(item, list) or len(item) != 2:
                return "wrong_type"
            for value in item:
                if not isinstance(value, str):
                    return "wrong_type"
                if _SIGNED.fullmatch(value):
                    return "negative_value"
                if not _UNSIGNED.fullmatch(value):
                    return "bad_decimal"
            if not item[0].strip("0."):
                return "out_of_range"  # a price of zero
    return "bad_decimal"
