"""Tape keeping: the continuity gates applied to decoded records (shared by every connection).

Receives decoded `Outgoing` records (with their identity), reconnect notices from the sources
and backfill results; emits records in per-symbol id order with overlap duplicates dropped,
backfill requests for the backfill task, gap records for the gaps topic, and dead-letter records
for the trades the trade gate quarantines as implausible. Pure (the request and result types are
repair.py's, no REST client) apart from the clock passed in. The connection tasks, the backfill
task and the tick task call it through `TapeIntake` (intake.py), never with an await in between.
`seed_trades()` at start-up continues the tape a previous process published. At drain, `flush()`
releases every held record behind an unrepaired gap record, so nothing accepted is kept back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import msgspec

from marketd.ingest.continuity import (
    Action,
    Emit,
    KlineGate,
    PublishGap,
    Quarantine,
    TickerDedup,
    TradeGate,
)
from marketd.ingest.decode import Outgoing, Reason, dlq_record
from marketd.ingest.repair import (
    BACKFILL_HEADER,
    BackfillResult,
    GapReason,
    Request,
    RequestBackfill,
    RequestKlines,
    TradeBackfill,
    record_id,
)
from marketd.ingest.streams import StreamKind, StreamSpec
from marketd.metrics import MetricsFactory

_encode = msgspec.json.Encoder().encode

R = TypeVar("R")

__all__ = ["Reconnected", "Request", "TapeKeeper", "route_result"]


class _Stream(msgspec.Struct):
    stream: str | None = None


@attrs.frozen
class Reconnected:
    """A source lost its connection and has a new one: what it carried may have a hole."""

    conn: int
    streams: tuple[StreamSpec, ...]


class TapeKeeper:
    def __init__(
        self,
        *,
        gaps_topic: str,
        backfill_topics: dict[type, str],
        request: Callable[[Request], bool],
        gap_grace_s: float = 1.0,
        max_held: int = 50_000,
        metrics: MetricsFactory | None = None,
        dlq_topic: str = "raw_dlq",
        dlq_max_raw_bytes: int = 8192,
    ) -> None:
        """`request` hands a backfill request on; False when backfill is unavailable.
        `dlq_topic` receives the quarantined trades (the decoded record as `raw`)."""
        self.gaps_topic = gaps_topic
        self.dlq_topic = dlq_topic
        self.dlq_max_raw_bytes = dlq_max_raw_bytes
        # The decoder's counter (one per registry): a quarantined trade is a rejected frame too.
        self._rejected = (metrics or MetricsFactory()).fast_counter(
            "decode_rejected", "frames rejected per reason", "reason"
        )
        self._backfill_topics = backfill_topics  # record type -> topic of recovered records
        self._request = request
        self.trades: TradeGate[Outgoing] = TradeGate(
            gap_grace_s=gap_grace_s, max_held=max_held, metrics=metrics
        )
        self.klines: KlineGate[Outgoing] = KlineGate(metrics=metrics)
        self.tickers = TickerDedup(metrics)

    def seed_trades(self, last_ids: Mapping[str, int]) -> None:
        """Per symbol, the last trade id published before this process started (from the spool
        and/or the topic tail), before any trade arrives. See `TradeGate.seed`: a live trade
        right after it is emitted as usual, a later one opens a "restart" gap that is backfilled
        at once, and ids up to it are dropped as duplicates. Unseeded symbols start fresh."""
        for symbol, last_id in last_ids.items():
            self.trades.seed(symbol, last_id)

    def admit(self, chunk: Sequence[Outgoing], now: float) -> list[Outgoing]:
        """Decoded records in, records to publish out (same order unless a gate holds some)."""
        out: list[Outgoing] = []
        trades_on_live = self.trades.on_live
        for o in chunk:
            ident = o.ident
            if ident is None:
                out.append(o)
                continue
            kind = ident[0]
            if kind == "trade":
                actions = trades_on_live(ident[1], ident[2], o, now=now, trade_time_ms=ident[3])
                if len(actions) == 1 and type(actions[0]) is Emit:
                    out.append(o)  # the common case: the next id, nothing held
                else:
                    self._apply(actions, out, now)
            elif kind == "kline":
                _, stream, symbol, interval, open_time, event_time, closed, close_time = ident
                self._apply(
                    self.klines.on_live(
                        stream,
                        symbol,
                        interval,
                        open_time,
                        event_time,
                        closed,
                        o,
                        close_time=close_time,
                    ),
                    out,
                    now,
                )
            elif self.tickers.admit((ident[1], ident[2]), ident[3]):
                out.append(o)
        return out

    def on_reconnect(self, notice: Reconnected) -> None:
        for spec in notice.streams:
            if spec.kind is StreamKind.TRADE and spec.symbol is not None:
                self.trades.on_reconnect(spec.symbol)
            elif spec.kind is StreamKind.KLINE:
                self.klines.on_reconnect(spec.name)

    def on_backfill(self, result: BackfillResult, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._apply(
            route_result(result, trades=self.trades, klines=self.klines, wrap=self._wrap, now=now),
            out,
            now,
        )
        return out

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._apply(self.trades.tick(now), out, now)
        return out

    def flush(self, reason: str = GapReason.SHUTDOWN) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._apply(self.trades.flush(reason), out, 0.0)
        return out

    def _apply(self, actions: list[Action[Outgoing]], out: list[Outgoing], now: float) -> None:
        for action in actions:
            if isinstance(action, Emit):
                out.append(action.record)
            elif isinstance(action, PublishGap):
                gap = action.gap
                out.append(
                    Outgoing(self.gaps_topic, gap.symbol.encode(), _encode(gap), 0, None, None)
                )
            elif isinstance(action, Quarantine):
                out.append(self._dead_letter(action))
            elif isinstance(action, RequestBackfill | RequestKlines) and not self._request(action):
                self._unavailable(action, out, now)

    def _dead_letter(self, q: Quarantine[Outgoing]) -> Outgoing:
        """The DLQ record of a quarantined trade: its decoded value stands in for the frame."""
        o = q.record
        self._rejected.inc(Reason.IMPLAUSIBLE_ID)
        stream = msgspec.json.decode(o.value, type=_Stream).stream
        record = dlq_record(
            o.value,
            Reason.IMPLAUSIBLE_ID,
            q.detail,
            stream,
            o.recv_ns // 1_000_000,
            self.dlq_max_raw_bytes,
        )
        return Outgoing(self.dlq_topic, o.key, _encode(record), o.recv_ns)

    def _wrap(self, record: Any) -> Outgoing:
        """A record recovered over REST, ready to produce, marked by a header (and value field)."""
        topic = self._backfill_topics[type(record)]
        return Outgoing(topic, record.symbol.encode(), _encode(record), 0, [BACKFILL_HEADER], None)

    def _unavailable(self, request: Request, out: list[Outgoing], now: float) -> None:
        # No backfill here (disabled, or its queue is full): the range is a known, recorded gap.
        if isinstance(request, RequestBackfill):
            self._apply(
                self.trades.on_backfill_failed(
                    request.symbol,
                    request.from_id,
                    request.to_id,
                    GapReason.BACKFILL_UNAVAILABLE,
                    now=now,
                ),
                out,
                now,
            )


def route_result(
    result: BackfillResult,
    *,
    trades: TradeGate[R] | None,
    klines: KlineGate[R] | None,
    wrap: Callable[[Any], R],
    now: float,
) -> list[Action[R]]:
    """Feed one backfill result into its gate; `wrap` turns a record into the gate's R.

    `trades` is the gate of the request's kind (trades or agg_trades). A result for a gate the
    caller does not have is an error in the wiring.
    """
    if isinstance(result, TradeBackfill):
        if trades is None:
            raise ValueError(f"no trade gate for {result.request}")
        req = result.request
        actions = trades.on_backfill(
            req.symbol, [(record_id(r), r.trade_time, wrap(r)) for r in result.records], now=now
        )
        if result.final:
            actions += trades.on_backfill_done(
                req.symbol, req.from_id, req.to_id, result.lost, now=now
            )
        return actions
    if klines is None:
        raise ValueError(f"no kline gate for {result.request}")
    actions = klines.on_backfill(
        result.request.stream, [(k.open_time, wrap(k)) for k in result.records]
    )
    if result.final:
        actions += klines.on_backfill_done(result.request, result.lost)
    return actions
