"""The ticker consumer's pure decisions: is a raw_tickers value valid, and should it be stored?

Receives Kafka values (bytes) and the wall clock as integers; emits typed `TickerRecord`s or
`Invalid` rejections, and per batch a `Plan`: the newest acceptable record per symbol plus a
verdict for every other one (docs/contract.md §4 late-data rules). No trio, Kafka or Redis here:
the same comparison is repeated atomically in Redis (store.py) so rule 2 also holds across
instances.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Final

import attrs
import msgspec

from marketd.records import SCHEMA_VERSION, TickerRecord

# Prices and quantities: exact decimal strings as Binance sends them ("118234.56000000").
# A regex rather than Decimal(): Decimal accepts "NaN", "Infinity", "1e5" and " 1", none of
# which the contract allows, and it costs ~1 µs per field.
_UNSIGNED = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_SIGNED = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

# 24 h change and change percent may be negative; every other decimal is non-negative.
SIGNED_FIELDS: Final = ("price_change", "price_change_pct")
UNSIGNED_FIELDS: Final = (
    "last_price", "last_qty", "weighted_avg_price", "open", "high", "low", "volume",
    "quote_volume", "best_bid", "best_bid_qty", "best_ask", "best_ask_qty",
)  # fmt: skip
_decoder = msgspec.json.Decoder(TickerRecord)


class Invalid(Exception):
    """A value that breaks the raw_tickers contract. `reason` is the DLQ/metrics code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def parse_ticker(value: bytes | None) -> TickerRecord:
    """Decode and check one raw_tickers value; raises Invalid with a reason code."""
    if not value:
        raise Invalid("empty_value", "the Kafka message has no value")
    try:
        record = _decoder.decode(value)
    except msgspec.ValidationError as exc:
        text = str(exc)
        reason = "missing_field" if "missing required field" in text else "wrong_type"
        raise Invalid(reason, text) from None
    except msgspec.DecodeError as exc:
        raise Invalid("bad_json", str(exc)) from None
    if record.schema_version != SCHEMA_VERSION:
        raise Invalid(
            "schema_version", f"schema_version={record.schema_version}, expected {SCHEMA_VERSION}"
        )
    for name in UNSIGNED_FIELDS:
        text = getattr(record, name)
        if _UNSIGNED.fullmatch(text) is None:
            if _SIGNED.fullmatch(text) is not None:
                raise Invalid("negative_value", f"{name}={text!r} is negative")
            raise Invalid("bad_decimal", f"{name}={text!r} is not a finite decimal")
    for name in SIGNED_FIELDS:
        text = getattr(record, name)
        if _SIGNED.fullmatch(text) is None:
            raise Invalid("bad_decimal", f"{name}={text!r} is not a finite decimal")
    if record.trades_count < 0:
        raise Invalid("negative_value", f"trades_count={record.trades_count} is negative")
    if record.event_time <= 0:
        raise Invalid("bad_time", f"event_time={record.event_time} is not a positive epoch ms")
    if not record.symbol:
        raise Invalid("missing_field", "symbol is empty")
    return record


class Verdict(enum.Enum):
    """What happens to one valid record. The values are the metric labels."""

    STORE = "store"
    WATERMARK = "watermark"  # rule 1: older than now - watermark delay
    FUTURE = "future"  # rule 3: further in the future than the tolerated clock skew
    OLDER = "older_than_stored"  # rule 2: older than what is (or is being) stored
    DUPLICATE = "duplicate"  # same event_time as the stored value: skipped, not rewritten
    SUPERSEDED = "superseded"  # a newer record for the same symbol is in the same batch


@attrs.frozen
class Limits:
    watermark_delay_ms: int
    max_future_ms: int


def judge(event_time_ms: int, now_ms: int, stored_ms: int | None, limits: Limits) -> Verdict:
    """docs/contract.md §4 for one record against the newest event time stored (or None)."""
    if event_time_ms < now_ms - limits.watermark_delay_ms:
        return Verdict.WATERMARK
    if event_time_ms > now_ms + limits.max_future_ms:
        return Verdict.FUTURE
    if stored_ms is not None:
        if event_time_ms < stored_ms:
            return Verdict.OLDER
        if event_time_ms == stored_ms:
            return Verdict.DUPLICATE
    return Verdict.STORE


@attrs.frozen
class Plan:
    """One batch, decided: at most one record per symbol to write, and every verdict counted."""

    writes: dict[str, TickerRecord]  # symbol -> the newest acceptable record
    skipped: dict[Verdict, int]  # verdict -> how many records (never STORE)


def plan_batch(
    records: Iterable[TickerRecord],
    now_ms: int,
    stored: Mapping[str, int],
    limits: Limits,
) -> Plan:
    """Collapse a batch to the newest acceptable record per symbol.

    `stored` is what this process knows to be in Redis (symbol -> event_time). It only ever
    under-estimates Redis (other instances may have written newer values), so a record it
    rejects as older would be rejected by the Redis script too; the script has the last word.
    """
    writes: dict[str, TickerRecord] = {}
    skipped: dict[Verdict, int] = {}
    for record in records:
        verdict = judge(record.event_time, now_ms, stored.get(record.symbol), limits)
        if verdict is Verdict.STORE:
            pending = writes.get(record.symbol)
            if pending is None or record.event_time > pending.event_time:
                writes[record.symbol] = record
                if pending is None:
                    continue
                verdict = Verdict.SUPERSEDED  # the one it replaced
            elif record.event_time == pending.event_time:
                verdict = Verdict.DUPLICATE
            else:
                verdict = Verdict.SUPERSEDED
        skipped[verdict] = skipped.get(verdict, 0) + 1
    return Plan(writes, skipped)


# -- the Redis hash (docs/contract.md §3) ---------------------------------------------------------

HASH_FIELDS: Final = (
    "last_price", "price_change", "price_change_pct", "open", "high", "low", "volume",
    "quote_volume", "trades_count", "event_time", "updated_at",
)  # fmt: skip
SYMBOL_RE: Final = re.compile(r"[A-Z0-9]{2,30}")


def ticker_key(symbol: str) -> str:
    return f"ticker:{symbol}"


def hash_fields(record: TickerRecord, updated_at_ms: int) -> list[str | int]:
    """Field/value pairs of the docs/contract.md §3 hash, flattened for HSET, HASH_FIELDS order."""
    return [
        "last_price", record.last_price,
        "price_change", record.price_change,
        "price_change_pct", record.price_change_pct,
        "open", record.open,
        "high", record.high,
        "low", record.low,
        "volume", record.volume,
        "quote_volume", record.quote_volume,
        "trades_count", record.trades_count,
        "event_time", record.event_time,
        "updated_at", updated_at_ms,
    ]  # fmt: skip


def tracked_symbols(symbols: Iterable[str]) -> frozenset[str]:
    """TICKER_SYMBOLS are case-insensitive: compare upper-cased."""
    return frozenset(s.strip().upper() for s in symbols if s.strip())
