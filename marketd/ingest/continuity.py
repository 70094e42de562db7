"""Continuity of the tape and de-duplication of overlapping connections (pure: no trio, no I/O).

`TradeGate` receives trades from live connections (one, or two overlapping during a rotation)
and from REST backfill, and returns actions: emit in strictly increasing id order per symbol,
request a backfill for a missing id range, publish a gap record. Duplicates are dropped and
counted. `KlineGate` and `TickerDedup` drop the overlap for klines and tickers and find the
closed klines a reconnect missed. Nothing here blocks; state lives until the object is dropped.
The requests, lost ranges, gap kinds and reasons are gap repair's vocabulary (repair.py).

Per-symbol guarantee of `TradeGate` (what `marketd verify tape` checks): each symbol's trades are
emitted with strictly increasing ids, each id at most once; an id is skipped only after a gap
record (repaired=false) for it was emitted, in tape order. Backfilled trades are emitted in
their place in that order (never after a later live trade), flagged `backfill=True`.

No single corrupt value may make a gate discard the valid data after it (README, "No trade
lost"): the trade gate holds an id that is implausibly far from its tape aside until the next
trade confirms it (or quarantines it), and the kline and ticker gates only trust what a second
record corroborates.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

import attrs
from prometheus_client import CollectorRegistry

from marketd.ingest.repair import GapKind, GapReason, LostRange, RequestBackfill, RequestKlines
from marketd.metrics import MetricsFactory
from marketd.records import SCHEMA_VERSION, GapRecord

R = TypeVar("R")

DEFAULT_GAP_GRACE_S: Final = 1.0
# A live trade this far below its tape (the seed, or what this process published) is no lagging
# copy: Binance never re-sends old trades on a connection. Once the next trade continues it, it
# is a new tape (a test exchange restarted, a topic re-used across environments); otherwise it
# was an outlier. Closer below, ids are dropped as already published (the overlap of two
# connections; the hypothesis tests feed such orders).
TAPE_RESET_IDS: Final = 100_000
DEFAULT_MAX_HELD: Final = 50_000
# How far a live trade id may plausibly jump ahead of its tape: BASE ids at once, plus
# TRADE_RATE_PER_S ids per second since the symbol's last live trade (counted for at most
# STEP_HORIZON_S). The rate is a design assumption, not a Binance figure: well above what the
# busiest spot symbols trade, so a reconnect's hole always fits, while a corrupt id (10^12,
# 2^62) does not (README, "No trade lost"). A jump beyond the bound is not trusted
# blindly: the trade waits aside until the next live trade of its symbol continues it (a real
# jump: a restart after a long stop, or a new tape) or continues the old tape (an outlier: the
# held trade goes to the dead-letter topic as implausible_id).
ID_STEP_BASE: Final = 10_000
TRADE_RATE_PER_S: Final = 100_000
STEP_HORIZON_S: Final = 3_600.0

# -- actions --------------------------------------------------------------------------------------


class Emit(NamedTuple, Generic[R]):
    """Publish `record` now (in this order). `backfill`: it came from REST, mark it so."""

    record: R
    backfill: bool = False


@attrs.frozen
class PublishGap:
    """Publish `gap` to the gaps topic (it is already counted in marketd_gaps_total)."""

    gap: GapRecord


@attrs.frozen
class Quarantine(Generic[R]):
    """Do not publish `record`: dead-letter it (reason implausible_id) with `detail`."""

    record: R
    detail: str


Action = Emit[R] | RequestBackfill | RequestKlines | PublishGap | Quarantine[R]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _GapMetrics:
    def __init__(self, m: MetricsFactory) -> None:
        self.gaps = m.counter(
            "gaps", "trade/kline gaps, by outcome", ["kind", "reason", "repaired"]
        )
        self.duplicates = m.counter(
            "overlap_duplicates", "records dropped as already emitted", ["kind", "source"]
        )
        self.resets = m.counter(
            "tape_resets",
            "symbols whose live tape restarted far below the one published (confirmed by a "
            "second trade)",
            ["kind"],
        )
        self.outliers = m.counter(
            "gate_outliers",
            "live trades held aside as implausibly far from their tape, by outcome",
            ["kind", "outcome"],
        )


# The gates of one daemon share one registry; each family may be registered there only once.
_shared: weakref.WeakKeyDictionary[CollectorRegistry, _GapMetrics] = weakref.WeakKeyDictionary()


def _gap_metrics(metrics: MetricsFactory | None) -> _GapMetrics:
    m = metrics or MetricsFactory()
    found = _shared.get(m.registry)
    if found is None:
        found = _shared[m.registry] = _GapMetrics(m)
    return found


# -- trades ---------------------------------------------------------------------------------------


@attrs.define
class _Hole:
    """Ids from_id..to_id are missing (neither emitted nor held)."""

    from_id: int
    to_id: int
    since: float  # caller's monotonic clock, when it was detected
    reason: str  # why it appeared (reconnect/id_jump/restart), or why it was lost (when `lost`)
    requested: bool = False
    lost: bool = False  # backfill gave up on it: skipped with a gap record when the tape gets here


@attrs.define
class _Request:
    from_id: int
    to_id: int
    reason: str
    recovered: int = 0  # records the backfill delivered (and that were not duplicates)
    lost: bool = False


@attrs.define
class _Suspect(Generic[R]):
    """A live trade implausibly far from the tape, waiting for the next trade's verdict."""

    trade_id: int
    record: R
    trade_time: int | None
    since: float  # caller's monotonic clock, when it arrived
    below: bool  # far below the tape (a new tape?) rather than far above (a jump?)


@attrs.define
class _Trades(Generic[R]):
    last: int | None = None  # last emitted id
    last_time: int | None = None
    top: int = 0  # highest id held (== last when nothing is held)
    held: dict[int, tuple[R, bool, int | None]] = attrs.field(factory=dict)
    holes: list[_Hole] = attrs.field(factory=list)  # ordered, disjoint, all inside (last, top)
    requests: list[_Request] = attrs.field(factory=list)
    reconnected: bool = False
    # The last id a previous process published (`TradeGate.seed`): while `top` is still this id,
    # nothing of this process has been taken yet, and a jump past it is the restart's hole.
    seed: int | None = None
    # The tape's position was corroborated: seeded, or a second live trade continued the first.
    confirmed: bool = False
    last_live: float | None = None  # caller's clock at the last live trade taken
    suspect: _Suspect[R] | None = None


class TradeGate(Generic[R]):
    """Per-symbol ordering, de-duplication and gap detection for one trade stream kind.

    Feed it every live trade (`on_live`), every backfilled page (`on_backfill`) and the end of
    each backfill (`on_backfill_done`); call `tick(now)` at least every `gap_grace_s` so gaps of
    quiet symbols are requested. `now` is any monotonic clock in seconds (`trio.current_time()`).
    A jump is requested after `gap_grace_s` (the other connection of a rotation usually fills
    it within milliseconds; 0 = at once), or at once after `on_reconnect`, or at once when it
    follows a `seed` (the ids a restart missed).
    """

    def __init__(
        self,
        *,
        kind: str = GapKind.TRADES,
        gap_grace_s: float = DEFAULT_GAP_GRACE_S,
        max_held: int = DEFAULT_MAX_HELD,
        metrics: MetricsFactory | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        if kind not in (GapKind.TRADES, GapKind.AGG_TRADES):
            raise ValueError(f"kind must be trades or agg_trades, not {kind!r}")
        self.kind = kind
        self.gap_grace_s = gap_grace_s
        self.max_held = max_held
        self._stream_suffix = "@trade" if kind == GapKind.TRADES else "@aggTrade"
        self._state: dict[str, _Trades[R]] = {}
        self._wall_ms = wall_ms
        self._m = _gap_metrics(metrics)
        self._dup_live = self._m.duplicates.labels(kind, "live")
        self._resets = self._m.resets.labels(kind)
        self._dup_backfill = self._m.duplicates.labels(kind, "backfill")

    # -- inputs -------------------------------------------------------------------------------

    def seed(self, symbol: str, last_id: int) -> None:
        """`last_id` of `symbol` was published before this process started (spool, topic tail).

        The symbol then continues that tape instead of starting a new one: a first live trade
        `last_id + 1` is emitted as usual; a higher one makes `last_id + 1 .. id - 1` a gap
        (reason "restart") that is requested at once, with live trades held behind it like any
        other; ids up to `last_id` are duplicates (dropped, counted). Call it before the
        symbol's first trade; seeding again before then keeps the higher id (several sources
        may know part of the tail). Raises ValueError once the symbol has trades, or for a
        negative id.
        """
        if last_id < 0:
            raise ValueError(f"seed for {symbol!r} must be a trade id >= 0, not {last_id!r}")
        st = self._state.get(symbol)
        if st is None:
            self._state[symbol] = _Trades(last=last_id, top=last_id, seed=last_id, confirmed=True)
            return
        if st.seed is None or st.top != st.seed or st.held or st.suspect is not None:
            raise ValueError(
                f"cannot seed {symbol!r} with {last_id}: it already has trades (last {st.last})"
            )
        if last_id > st.seed:
            st.last = st.top = st.seed = last_id

    def on_live(
        self,
        symbol: str,
        trade_id: int,
        record: R,
        *,
        now: float,
        trade_time_ms: int | None = None,
    ) -> list[Action[R]]:
        """A trade from a live connection. `trade_time_ms` only feeds gap records' times.

        A trade implausibly far from the tape (see ID_STEP_BASE and TAPE_RESET_IDS) is held
        aside: the next live trade of the symbol either continues it (it is taken, as a jump
        or, far below, as a new tape) or continues the tape (it is quarantined).
        """
        st = self._state.get(symbol)
        if st is None:
            st = self._state[symbol] = _Trades()
        last = st.last
        # Fast path: the next id, nothing held or aside (every trade on a healthy connection).
        if last is not None and trade_id == last + 1 and not st.held and st.suspect is None:
            st.last = st.top = trade_id
            st.last_time = trade_time_ms
            st.last_live = now
            st.confirmed = True
            return [Emit(record)]
        if last is None:
            # First trade of an unseeded symbol: nothing to compare with. Taken; should it be
            # an outlier, the real tape far below it resets the symbol (TAPE_RESET_IDS), one far
            # above it starts afresh instead of asking REST for the ids in between.
            st.last = st.top = trade_id
            st.last_time = trade_time_ms
            st.last_live = now
            return [Emit(record)]
        out: list[Action[R]] = []
        suspect = st.suspect
        if suspect is not None:
            self._judge(symbol, st, suspect, trade_id, record, trade_time_ms, now, out)
        else:
            below = self._far(st, trade_id, now)
            if below is not None:
                st.suspect = _Suspect(trade_id, record, trade_time_ms, now, below)
                return out
            self._take_live(symbol, st, trade_id, record, trade_time_ms, now, out)
        self._drain(symbol, st, out)
        self._due(symbol, st, now, out)
        return out

    def on_reconnect(self, symbol: str | None = None) -> None:
        """A connection was lost and replaced (no overlap): the next jump is requested at once.

        Not for a planned rotation where both connections overlap: there the other connection
        fills small jumps itself.
        """
        targets = [self._state[symbol]] if symbol in self._state else []
        if symbol is None:
            targets = list(self._state.values())
        for st in targets:
            st.reconnected = True

    def on_backfill(
        self, symbol: str, trades: Iterable[tuple[int, int | None, R]], *, now: float = 0.0
    ) -> list[Action[R]]:
        """A page of backfilled trades: (trade_id, trade_time_ms, record), any order."""
        out: list[Action[R]] = []
        st = self._state.get(symbol)
        if st is None or st.last is None:
            return out  # nothing was requested for this symbol
        for trade_id, trade_time, record in trades:
            if not any(r.from_id <= trade_id <= r.to_id for r in st.requests):
                # Not (or no longer) asked for: already emitted, or of a tape since reset.
                self._dup_backfill.inc()
                continue
            if self._accept(symbol, st, trade_id, record, True, trade_time, now, out):
                for req in st.requests:
                    if req.from_id <= trade_id <= req.to_id:
                        req.recovered += 1
                        break
        self._drain(symbol, st, out)
        return out

    def on_backfill_done(
        self,
        symbol: str,
        from_id: int,
        to_id: int,
        lost: Sequence[LostRange] = (),
        *,
        now: float = 0.0,
    ) -> list[Action[R]]:
        """The backfill of from_id..to_id ended; `lost` are ranges it could not recover.

        Ids of the range still missing afterwards are lost too (reason "not_on_rest": Binance
        does not promise contiguous ids, docs/binance.md §7.2), so nothing is held forever.
        """
        out: list[Action[R]] = []
        st = self._state.get(symbol)
        if st is None:
            return out
        for r in lost:
            self._lose(st, max(r.from_id, from_id), min(r.to_id, to_id), r.reason)
        self._lose(st, from_id, to_id, GapReason.NOT_ON_REST)
        self._drain(symbol, st, out)
        return out

    def on_backfill_failed(
        self, symbol: str, from_id: int, to_id: int, reason: str, *, now: float = 0.0
    ) -> list[Action[R]]:
        """The whole range is unrecoverable: gap record(s) with repaired=false, then release."""
        return self.on_backfill_done(
            symbol, from_id, to_id, [LostRange(from_id, to_id, reason)], now=now
        )

    def tick(self, now: float) -> list[Action[R]]:
        """Request the gaps whose grace period has passed."""
        out: list[Action[R]] = []
        for symbol, st in self._state.items():
            if st.holes:
                self._due(symbol, st, now, out)
        return out

    def flush(self, reason: str = GapReason.SHUTDOWN) -> list[Action[R]]:
        """Give up every open gap now (at shutdown): gap records, then every held trade."""
        out: list[Action[R]] = []
        for symbol, st in self._state.items():
            if st.holes and st.last is not None:
                self._lose(st, st.last + 1, st.top, reason)
                self._drain(symbol, st, out)
            if st.suspect is not None:
                self._quarantine(st, st.suspect, f"no trade confirmed it before {reason}", out)
                st.suspect = None
        return out

    # -- state, for metrics, health and tests --------------------------------------------------

    def last_id(self, symbol: str) -> int | None:
        st = self._state.get(symbol)
        return None if st is None else st.last

    def held(self, symbol: str | None = None) -> int:
        if symbol is not None:
            st = self._state.get(symbol)
            return 0 if st is None else len(st.held)
        return sum(len(st.held) for st in self._state.values())

    def missing(self, symbol: str) -> list[tuple[int, int]]:
        st = self._state.get(symbol)
        return [] if st is None else [(h.from_id, h.to_id) for h in st.holes]

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _step(since: float | None, now: float) -> int:
        """How far ahead of the tape a live id may plausibly be, `now - since` after the last."""
        elapsed = 0.0 if since is None else min(max(now - since, 0.0), STEP_HORIZON_S)
        return ID_STEP_BASE + int(TRADE_RATE_PER_S * elapsed)

    def _far(self, st: _Trades[R], trade_id: int, now: float) -> bool | None:
        """True: implausibly far below the tape; False: far above it; None: plausible."""
        assert st.last is not None
        if trade_id < st.last - TAPE_RESET_IDS:
            return True
        if trade_id > st.top + self._step(st.last_live, now):
            return False
        return None

    def _take_live(
        self,
        symbol: str,
        st: _Trades[R],
        trade_id: int,
        record: R,
        trade_time: int | None,
        now: float,
        out: list[Action[R]],
    ) -> None:
        if self._accept(symbol, st, trade_id, record, False, trade_time, now, out):
            st.last_live = now
            st.confirmed = True

    def _judge(
        self,
        symbol: str,
        st: _Trades[R],
        s: _Suspect[R],
        trade_id: int,
        record: R,
        trade_time: int | None,
        now: float,
        out: list[Action[R]],
    ) -> None:
        """The first live trade after a suspect decides about it."""
        assert st.last is not None
        if trade_id == s.trade_id:  # the other connection's copy: no verdict yet
            self._dup_live.inc()
            return
        below = self._far(st, trade_id, now)
        if below is None and trade_id > st.last and trade_id not in st.held:
            # The tape goes on where it was: the suspect was an outlier.
            st.suspect = None
            self._quarantine(st, s, f"the next trade ({trade_id}) continued the tape", out)
            self._take_live(symbol, st, trade_id, record, trade_time, now, out)
            return
        if below is s.below and s.trade_id < trade_id <= s.trade_id + self._step(s.since, now):
            # The next trade continues the suspect: it was real.
            st.suspect = None
            self._m.outliers.labels(self.kind, "confirmed").inc()
            if s.below or not st.confirmed:
                self._reset(symbol, st, s, out)
            else:
                self._take_live(symbol, st, s.trade_id, s.record, s.trade_time, s.since, out)
            self._take_live(symbol, st, trade_id, record, trade_time, now, out)
            return
        if below is None:  # plausible but not new: a lagging connection's copy
            self._dup_live.inc()
            return
        # Far from both: the newer one waits for its verdict, the older one is given up.
        self._quarantine(st, s, f"the next trade ({trade_id}) did not continue it", out)
        st.suspect = _Suspect(trade_id, record, trade_time, now, below)

    def _reset(self, symbol: str, st: _Trades[R], s: _Suspect[R], out: list[Action[R]]) -> None:
        """A new tape starts at the suspect: the old one's open holes become gap records and
        what it holds is released first; its pending backfills no longer apply."""
        assert st.last is not None
        if st.holes:
            self._lose(st, st.last + 1, st.top, GapReason.TAPE_RESET)
            self._drain(symbol, st, out)
        self._resets.inc()
        st.held.clear()
        st.holes.clear()
        st.requests.clear()
        st.last = st.top = s.trade_id
        st.last_time = s.trade_time
        st.last_live = s.since
        st.seed = None
        st.reconnected = False
        st.confirmed = True
        out.append(Emit(s.record))

    def _quarantine(self, st: _Trades[R], s: _Suspect[R], why: str, out: list[Action[R]]) -> None:
        self._m.outliers.labels(self.kind, "quarantined").inc()
        where = "below" if s.below else "above"
        out.append(
            Quarantine(
                s.record,
                f"{self.kind} id {s.trade_id} is implausibly far {where} the tape "
                f"(last {st.last}) and {why}",
            )
        )

    def _accept(
        self,
        symbol: str,
        st: _Trades[R],
        trade_id: int,
        record: R,
        backfill: bool,
        trade_time: int | None,
        now: float,
        out: list[Action[R]],
    ) -> bool:
        """Hold a trade that is not a duplicate; returns whether it was taken."""
        assert st.last is not None
        if trade_id <= st.last or trade_id in st.held or self._in_lost(st, trade_id):
            (self._dup_backfill if backfill else self._dup_live).inc()
            return False
        st.held[trade_id] = (record, backfill, trade_time)
        if trade_id > st.top + 1:
            restart = st.top == st.seed
            reason = (
                GapReason.RESTART
                if restart
                else GapReason.RECONNECT
                if st.reconnected
                else GapReason.ID_JUMP
            )
            # After a restart or a reconnect nobody else will fill the hole: request it without
            # grace.
            since = now - self.gap_grace_s if restart or st.reconnected else now
            st.holes.append(_Hole(st.top + 1, trade_id - 1, since, reason))
            st.reconnected = False
        if trade_id > st.top:
            st.top = trade_id
        else:
            self._fill(st, trade_id)
        if len(st.held) > self.max_held:
            self._overflow(symbol, st, out)
        return True

    @staticmethod
    def _in_lost(st: _Trades[R], trade_id: int) -> bool:
        return any(h.lost and h.from_id <= trade_id <= h.to_id for h in st.holes)

    @staticmethod
    def _fill(st: _Trades[R], trade_id: int) -> None:
        """`trade_id` arrived inside a hole: split the hole around it."""
        i = bisect.bisect_right([h.from_id for h in st.holes], trade_id) - 1
        if i < 0 or st.holes[i].to_id < trade_id:
            return
        h = st.holes[i]
        pieces = []
        if h.from_id < trade_id:
            pieces.append(attrs.evolve(h, to_id=trade_id - 1))
        if trade_id < h.to_id:
            pieces.append(attrs.evolve(h, from_id=trade_id + 1))
        st.holes[i : i + 1] = pieces

    def _lose(self, st: _Trades[R], from_id: int, to_id: int, reason: str) -> None:
        """Mark the still-missing ids of from_id..to_id as unrecoverable."""
        if from_id > to_id:
            return
        holes: list[_Hole] = []
        for h in st.holes:
            if h.lost or h.to_id < from_id or h.from_id > to_id:
                holes.append(h)
                continue
            lo, hi = max(h.from_id, from_id), min(h.to_id, to_id)
            if h.from_id < lo:
                holes.append(attrs.evolve(h, to_id=lo - 1))
            holes.append(attrs.evolve(h, from_id=lo, to_id=hi, lost=True, reason=reason))
            for req in st.requests:
                if req.from_id <= hi and lo <= req.to_id:
                    req.lost = True
            if hi < h.to_id:
                holes.append(attrs.evolve(h, from_id=hi + 1))
        st.holes = holes

    def _overflow(self, symbol: str, st: _Trades[R], out: list[Action[R]]) -> None:
        # Holding more would grow memory without bound: give up the oldest hole(s) now. The
        # held trades after it are released; a late backfill for it is then a duplicate.
        while len(st.held) > self.max_held and st.holes:
            front = st.holes[0]
            self._lose(st, front.from_id, front.to_id, GapReason.HOLD_OVERFLOW)
            self._drain(symbol, st, out)

    def _drain(self, symbol: str, st: _Trades[R], out: list[Action[R]]) -> None:
        assert st.last is not None
        held = st.held
        while True:
            nxt = st.last + 1
            item = held.pop(nxt, None)
            if item is not None:
                record, backfill, trade_time = item
                out.append(Emit(record, backfill))
                st.last = nxt
                st.last_time = trade_time
                continue
            if st.holes and st.holes[0].lost and st.holes[0].from_id == nxt:
                h = st.holes.pop(0)
                after = held.get(h.to_id + 1)
                out.append(self._gap(symbol, h.from_id, h.to_id, st.last_time, after, h.reason))
                st.last = h.to_id
                continue
            break
        if not held:
            st.top = st.last
            st.holes.clear()
        self._close_requests(symbol, st, out)

    def _close_requests(self, symbol: str, st: _Trades[R], out: list[Action[R]]) -> None:
        assert st.last is not None
        while st.requests and st.requests[0].to_id <= st.last:
            req = st.requests.pop(0)
            if req.recovered and not req.lost:
                out.append(self._gap(symbol, req.from_id, req.to_id, None, None, req.reason, True))

    def _due(self, symbol: str, st: _Trades[R], now: float, out: list[Action[R]]) -> None:
        for h in st.holes:
            if not h.requested and not h.lost and now - h.since >= self.gap_grace_s:
                h.requested = True
                st.requests.append(_Request(h.from_id, h.to_id, h.reason))
                out.append(RequestBackfill(symbol, h.from_id, h.to_id, self.kind, h.reason))
        st.requests.sort(key=lambda r: r.from_id)

    def _gap(
        self,
        symbol: str,
        from_id: int,
        to_id: int,
        before_time: int | None,
        after: tuple[R, bool, int | None] | None,
        reason: str,
        repaired: bool = False,
    ) -> PublishGap:
        self._m.gaps.labels(self.kind, reason, str(repaired).lower()).inc()
        return PublishGap(
            GapRecord(
                symbol=symbol,
                stream=symbol.lower() + self._stream_suffix,
                kind=self.kind,
                from_id=from_id,
                to_id=to_id,
                from_time=before_time,
                to_time=after[2] if after is not None else None,
                reason=reason,
                repaired=repaired,
                detected_at=self._wall_ms(),
                schema_version=SCHEMA_VERSION,
            )
        )


# -- klines ---------------------------------------------------------------------------------------


@attrs.define
class _Klines:
    recent: OrderedDict[tuple[int, int], None] = attrs.field(factory=OrderedDict)
    # Open times of klines emitted closed -> the event time of that close (None: from REST).
    closed: OrderedDict[int, int | None] = attrs.field(factory=OrderedDict)
    last_closed: int | None = None  # open time of the newest closed kline emitted
    last_open: int | None = None  # newest open time emitted
    reconnected: bool = False


class KlineGate(Generic[R]):
    """Kline overlap de-duplication and missed-closed-kline detection, per stream.

    A kline update is a duplicate when (open_time, event_time) was already emitted for its
    stream (the stream name carries symbol, interval and timezone), and stale when its kline was
    already emitted closed (a lagging connection must not overwrite the final values). Memory is
    bounded to `memory` keys per stream: overlaps last seconds, updates come every 1-2 s.

    A close is only final when it is plausible: its event time is not before the kline's close
    time (Binance sends the final version a few ms after it). A premature "closed" update is
    emitted like any other and the real close still follows. Of two live closes of one kline,
    the earlier event time wins (a corrupt one dated ahead cannot hold back the real one); a
    close recovered over REST is final.
    """

    def __init__(self, *, memory: int = 256, metrics: MetricsFactory | None = None) -> None:
        self.memory = memory
        self._state: dict[str, _Klines] = {}
        self._m = _gap_metrics(metrics)
        self._dup_live = self._m.duplicates.labels(GapKind.KLINES, "live")
        self._dup_backfill = self._m.duplicates.labels(GapKind.KLINES, "backfill")
        self._wall_ms = _wall_ms

    def on_reconnect(self, stream: str | None = None) -> None:
        """The next kline of the stream (all streams if None) checks for missed closed klines."""
        for name, st in self._state.items():
            if stream is None or name == stream:
                st.reconnected = True

    def on_live(
        self,
        stream: str,
        symbol: str,
        interval: str,
        open_time: int,
        event_time: int,
        is_closed: bool,
        record: R,
        *,
        close_time: int | None = None,
    ) -> list[Action[R]]:
        """A live kline update; `close_time` (when known) tells a plausible close apart."""
        st = self._state.get(stream)
        if st is None:
            st = self._state[stream] = _Klines()
        if (open_time, event_time) in st.recent:
            self._dup_live.inc()
            return []
        final = is_closed and (close_time is None or event_time >= close_time)
        if open_time in st.closed:
            closed_at = st.closed[open_time]
            if not final or closed_at is None or event_time >= closed_at:
                self._dup_live.inc()
                return []
            # An earlier close than the one emitted: that one was dated ahead; this one wins.
        out: list[Action[R]] = []
        if st.reconnected:
            st.reconnected = False
            floor = st.last_closed + 1 if st.last_closed is not None else st.last_open
            # Closed klines with open time in [floor, open_time) were due while we were away.
            if floor is not None and floor < open_time:
                out.append(
                    RequestKlines(
                        stream, symbol, interval, floor, open_time - 1, GapReason.RECONNECT
                    )
                )
        self._remember(st, open_time, event_time, final)
        out.append(Emit(record))
        return out

    def on_backfill(self, stream: str, klines: Iterable[tuple[int, R]]) -> list[Action[R]]:
        """Backfilled closed klines: (open_time, record). Already-closed ones are dropped."""
        st = self._state.get(stream)
        if st is None:
            st = self._state[stream] = _Klines()
        out: list[Action[R]] = []
        for open_time, record in klines:
            if open_time in st.closed:
                self._dup_backfill.inc()
                continue
            self._remember(st, open_time, None, True)
            out.append(Emit(record, True))
        return out

    def on_backfill_done(
        self, request: RequestKlines, lost: Sequence[LostRange] = ()
    ) -> list[Action[R]]:
        """Gap records (repaired=false) for the open-time ranges the backfill could not get."""
        out: list[Action[R]] = []
        for r in lost:
            self._m.gaps.labels(GapKind.KLINES, r.reason, "false").inc()
            out.append(
                PublishGap(
                    GapRecord(
                        symbol=request.symbol,
                        stream=request.stream,
                        kind=GapKind.KLINES,
                        from_id=r.from_id,
                        to_id=r.to_id,
                        from_time=r.from_id,
                        to_time=r.to_id,
                        reason=r.reason,
                        repaired=False,
                        detected_at=self._wall_ms(),
                        schema_version=SCHEMA_VERSION,
                    )
                )
            )
        return out

    def _remember(
        self, st: _Klines, open_time: int, event_time: int | None, is_closed: bool
    ) -> None:
        st.recent[(open_time, -1 if event_time is None else event_time)] = None
        if len(st.recent) > self.memory:
            st.recent.popitem(last=False)
        if st.last_open is None or open_time > st.last_open:
            st.last_open = open_time
        if is_closed:
            st.closed[open_time] = event_time
            if len(st.closed) > self.memory:
                st.closed.popitem(last=False)
            if st.last_closed is None or open_time > st.last_closed:
                st.last_closed = open_time


# -- tickers ---------------------------------------------------------------------------------------


class TickerDedup:
    """Tickers are snapshots: keep one only if it is newer than those already kept for its key.

    The key is whatever identifies one ticker series: (stream, symbol) for array streams, or the
    symbol. A copy of a kept event time (the other connection's) is dropped and counted, and so
    is an older one. "Older" is measured against the second-newest event time kept, never the
    newest alone: one snapshot dated ahead (a corrupt frame within the decoder's skew bound)
    must not hold back the real ones after it. Each event time is kept at most once, and each
    kept one is newer than all kept before it but at most one.
    """

    def __init__(self, metrics: MetricsFactory | None = None) -> None:
        # key -> (newest, second-newest) event time kept; -1: none yet.
        self._kept: dict[Hashable, tuple[int, int]] = {}
        self._dups = _gap_metrics(metrics).duplicates.labels("tickers", "live")

    def admit(self, key: Hashable, event_time: int) -> bool:
        newest, floor = self._kept.get(key, (-1, -1))
        if event_time <= floor or event_time == newest:
            self._dups.inc()
            return False
        # Above the newest: it becomes the newest. Between the two: the newest may be dated
        # ahead, and this one is the best evidence of where the series really is.
        self._kept[key] = (event_time, newest) if event_time > newest else (newest, event_time)
        return True
