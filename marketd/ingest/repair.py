"""Gap repair's vocabulary: what the gates ask the REST backfill for and what comes back (pure).

The continuity gates (continuity.py) emit `RequestBackfill`/`RequestKlines`; the backfill driver
(backfill.py) answers each with pages of recovered records (`TradeBackfill`/`KlineBackfill`) and
one final result listing the `LostRange`s it could not recover; the tape keeper (tape.py) feeds
the results back into the gates. Kinds and reasons are enums shared by all of them and written
as their string values into gap records, metrics labels and logs. `TradePaging`/`KlinePaging`
keep the bookkeeping of one request while the driver pages through REST: where the next page
starts, which answered rows belong to the range, what is lost and why. No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, NamedTuple

import attrs

from marketd.ingest.streams import interval_ms
from marketd.records import AggTradeRecord, KlineRecord, TradeRecord


class GapKind(enum.StrEnum):
    """Which tape a gap is in (the `kind` of gap records and backfill requests)."""

    TRADES = "trades"  # trade ids (REST historicalTrades)
    AGG_TRADES = "agg_trades"  # aggregate trade ids (REST aggTrades)
    KLINES = "klines"  # kline open times (REST klines)


class GapReason(enum.StrEnum):
    """Why ids went missing (the first three), or why the missing ids were not recovered."""

    RECONNECT = "reconnect"  # a connection was replaced without overlap
    ID_JUMP = "id_jump"  # the live tape skipped ids (a rotation the other connection did not fill)
    RESTART = "restart"  # between the last id a previous process published and this one's first
    HISTORY_TOO_OLD = "history_too_old"  # older than what REST keeps
    NOT_ON_REST = (
        "not_on_rest"  # REST has no such ids (not promised contiguous, docs/binance.md §7.2)
    )
    REST_UNAVAILABLE = "rest_unavailable"  # REST did not answer before the give-up deadline
    REST_REJECTED = "rest_rejected"  # REST refused the request (4xx other than limits)
    RATE_LIMITED = "rate_limited"  # 429/418 until the give-up deadline
    REST_BAD_RESPONSE = "rest_bad_response"  # REST answered with something unreadable
    REST_LAGGING = "rest_lagging"  # REST did not have the ids the live stream showed in time
    BACKFILL_UNAVAILABLE = "backfill_unavailable"  # no backfill here (disabled, or queue full)
    HOLD_OVERFLOW = "hold_overflow"  # too many trades held behind the hole: given up
    TAPE_RESET = "tape_reset"  # the live tape restarted far below: the old tape's holes close
    SHUTDOWN = "shutdown"  # the process drained while the hole was still open


# Kafka header on every record that came from REST (TradeRecord also carries "backfill": true in
# its JSON value; KlineRecord and AggTradeRecord have no such field, so the header is the mark).
BACKFILL_HEADER: Final = ("backfill", b"1")


@attrs.frozen
class RequestBackfill:
    """Fetch trade ids from_id..to_id (inclusive) of `symbol` over REST."""

    symbol: str
    from_id: int
    to_id: int
    kind: str  # GapKind.TRADES (historicalTrades) | GapKind.AGG_TRADES (aggTrades)
    reason: str  # GapReason.RECONNECT | ID_JUMP | RESTART


@attrs.frozen
class RequestKlines:
    """Fetch the klines of `stream` with open time in [start_ms, end_ms] over REST (all closed)."""

    stream: str
    symbol: str
    interval: str
    start_ms: int
    end_ms: int
    reason: str  # GapReason.RECONNECT


Request = RequestBackfill | RequestKlines


class LostRange(NamedTuple):
    """Ids (or kline open times) a backfill could not recover, and why (a `GapReason`)."""

    from_id: int
    to_id: int
    reason: str


@attrs.frozen
class TradeBackfill:
    """A page of recovered trades (or aggregate trades), ascending ids within the request.

    `final` results carry no records; `lost` lists what could not be recovered (only on final).
    Trade records have backfill=True; event_time = trade_time (REST has no event time).
    """

    request: RequestBackfill
    records: Sequence[TradeRecord | AggTradeRecord]
    final: bool = False
    lost: tuple[LostRange, ...] = ()


@attrs.frozen
class KlineBackfill:
    """A page of recovered closed klines, ascending open time within the request.

    event_time = close_time and first/last_trade_id = -1: REST kline rows carry neither.
    `lost` (only on final) are open-time ranges Binance did not return.
    """

    request: RequestKlines
    records: Sequence[KlineRecord]
    final: bool = False
    lost: tuple[LostRange, ...] = ()


BackfillResult = TradeBackfill | KlineBackfill


def request_kind(request: Request) -> str:
    """The metrics/log label of a request: its trade kind, or "klines"."""
    return request.kind if isinstance(request, RequestBackfill) else GapKind.KLINES


def outcome(request: Request, lost: Sequence[LostRange]) -> str:
    """How a finished request went: "repaired" (nothing lost), "partial" or "failed" (all lost)."""
    if not lost:
        return "repaired"
    start, end = (
        (request.from_id, request.to_id)
        if isinstance(request, RequestBackfill)
        else (request.start_ms, request.end_ms)
    )
    return "partial" if sum(r.to_id - r.from_id + 1 for r in lost) < end - start + 1 else "failed"


def missing_trades_reason(cursor: int, from_id: int) -> GapReason:
    """Why REST's answer starts after `cursor`: missing at the start of the range, the ids are
    older than what REST keeps; further in, Binance skipped them (docs/binance.md §7.2)."""
    return GapReason.HISTORY_TOO_OLD if cursor == from_id else GapReason.NOT_ON_REST


def record_id(record: TradeRecord | AggTradeRecord) -> int:
    """The id a trade gate orders a recovered record by."""
    return record.trade_id if isinstance(record, TradeRecord) else record.agg_trade_id


# -- paging through REST ---------------------------------------------------------------------------


@attrs.define
class TradePaging:
    """One trade backfill's progress: REST is asked for ids from `cursor` on, a page at a time."""

    request: RequestBackfill
    cursor: int
    lost: list[LostRange] = attrs.field(factory=list)

    @classmethod
    def start(cls, request: RequestBackfill) -> TradePaging:
        return cls(request, request.from_id)

    def limit(self, max_limit: int) -> int | None:
        """How many ids to ask for next; None once the whole range is answered or given up."""
        if self.cursor > self.request.to_id:
            return None
        return min(max_limit, self.request.to_id - self.cursor + 1)

    def on_page(self, first_id: int, last_id: int) -> int | None:
        """REST answered ids first_id..last_id (ascending, at least one) from the cursor on.

        Returns the highest id of the answer that belongs to the range (the rest is not ours),
        or None when nothing does and the range is over. Ids skipped before `first_id` are lost.
        """
        req = self.request
        why = missing_trades_reason(self.cursor, req.from_id)
        if first_id > req.to_id:
            self.lost.append(LostRange(self.cursor, req.to_id, why))
            self.cursor = req.to_id + 1
            return None
        if first_id > self.cursor:
            self.lost.append(LostRange(self.cursor, first_id - 1, why))
        self.cursor = last_id + 1
        return req.to_id

    def give_up(self, reason: str) -> None:
        """The rest of the range cannot be had (REST down past the deadline, rejected...)."""
        self.lost.append(LostRange(self.cursor, self.request.to_id, reason))
        self.cursor = self.request.to_id + 1


@attrs.define
class KlinePaging:
    """One kline backfill's progress: REST is asked for open times from `cursor` on."""

    request: RequestKlines
    step_ms: int  # the interval's length
    fixed: bool  # False for months: they have no fixed length, so holes cannot be measured
    cursor: int
    prev: int | None = None  # open time of the last kline taken
    lost: list[LostRange] = attrs.field(factory=list)

    @classmethod
    def start(cls, request: RequestKlines) -> KlinePaging:
        fixed = request.interval != "1M"
        return cls(request, interval_ms(request.interval), fixed, request.start_ms)

    @property
    def done(self) -> bool:
        return self.cursor > self.request.end_ms

    def wanted(self, open_time: int, close_time: int, now_ms: int) -> bool:
        """A kline of the answer belongs to the range and is over by the wall clock (an open
        kline is never backfilled: the live stream will close it)."""
        return self.cursor <= open_time <= self.request.end_ms and close_time < now_ms

    def on_page(self, open_times: Sequence[int]) -> bool:
        """The open times (ascending) of the wanted klines of one answer; False: no more pages.

        Open times missing between two klines are lost ("not_on_rest"); an answer with none
        at all ends the range, and when nothing came for a range of at least one interval, all
        of it is lost.
        """
        req = self.request
        if not open_times:
            if self.prev is None and req.end_ms - req.start_ms + 1 >= self.step_ms:
                self.lost.append(LostRange(req.start_ms, req.end_ms, GapReason.NOT_ON_REST))
            self.cursor = req.end_ms + 1
            return False
        step = self.step_ms
        for t in open_times:
            if self.fixed and self.prev is not None and t - self.prev > step:
                self.lost.append(LostRange(self.prev + step, t - step, GapReason.NOT_ON_REST))
            self.prev = t
        self.cursor = open_times[-1] + 1
        return True

    def give_up(self, reason: str) -> None:
        self.lost.append(LostRange(self.cursor, self.request.end_ms, reason))
        self.cursor = self.request.end_ms + 1
