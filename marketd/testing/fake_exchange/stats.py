"""Derived market statistics from a trade tape: kline windows and OHLCV, rolling 24 h windows.

Receives a `Tape` and times (epoch µs); emits plain accumulators that the frame builders and the
REST handlers format, so a WebSocket kline and a REST kline for the same window are computed by
the same code from the same trades. Pure: no trio, no I/O.
"""

from __future__ import annotations

import calendar
import datetime as dt

from marketd.testing.fake_exchange.market import Tape

US = 1_000_000
KLINE_INTERVALS: tuple[str, ...] = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h",
    "1d", "3d", "1w", "1M",
)  # fmt: skip
_FIXED_S: dict[str, int] = {
    "1s": 1, "1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600,
    "2h": 7200, "4h": 14400, "6h": 21600, "8h": 28800, "12h": 43200, "1d": 86400,
    "3d": 3 * 86400, "1w": 7 * 86400,
}  # fmt: skip
# 1970-01-01 was a Thursday; weekly klines open on Monday 00:00 (docs/binance.md §4.3).
_MONDAY_OFFSET_US = 4 * 86400 * US


def window_start(interval: str, t_us: int, tz_us: int = 0) -> int:
    """Open time (UTC epoch µs) of the kline containing `t_us`; windows align in local time."""
    local = t_us + tz_us
    if interval == "1M":
        d = dt.datetime.fromtimestamp(local // US, dt.UTC)
        return calendar.timegm((d.year, d.month, 1, 0, 0, 0)) * US - tz_us
    length = _FIXED_S[interval] * US
    if interval == "1w":
        return (local - _MONDAY_OFFSET_US) // length * length + _MONDAY_OFFSET_US - tz_us
    # 3d alignment is undocumented (docs/binance.md §9): epoch-aligned here.
    return local // length * length - tz_us


def window_end(interval: str, start_us: int, tz_us: int = 0) -> int:
    """Open time of the next window (the kline's close time is this minus one unit)."""
    if interval == "1M":
        d = dt.datetime.fromtimestamp((start_us + tz_us) // US, dt.UTC)
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0)) * US - tz_us
    return start_us + _FIXED_S[interval] * US


def parse_tz(text: str) -> int:
    """'+08:00', '-5', '8' or '5:45' -> offset in µs (Binance accepts -12:00 to +14:00)."""
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    hours, _, minutes = body.partition(":")
    if not hours.isdigit() or (minutes and not minutes.isdigit()):
        raise ValueError(f"bad timezone {text!r}")
    total_min = sign * (int(hours) * 60 + int(minutes or 0))
    if not -12 * 60 <= total_min <= 14 * 60:
        raise ValueError(f"timezone {text!r} out of range -12:00..+14:00")
    return total_min * 60 * US


class KlineAcc:
    """OHLCV of one window. Empty windows keep the previous close as OHLC and f = L = -1."""

    __slots__ = ("L", "Q", "V", "c", "f", "h", "l", "n", "o", "q", "v")

    def __init__(self, prev_close: int) -> None:
        self.o = self.h = self.l = self.c = prev_close
        self.v = self.q = self.V = self.Q = 0  # q, Q in 1e-16 units (price x qty)
        self.n = 0
        self.f = self.L = -1

    def fold(self, tape: Tape, i0: int, i1: int) -> None:
        """Add trades at tape indices [i0, i1)."""
        if i1 <= i0:
            return
        price, qty, maker = tape.price, tape.qty, tape.maker
        if self.n == 0:
            self.o = self.h = self.l = price[i0]
            self.f = tape.first_id + i0
        h, low, v, q, bv, bq = self.h, self.l, self.v, self.q, self.V, self.Q
        for i in range(i0, i1):
            p = price[i]
            x = qty[i]
            if p > h:
                h = p
            elif p < low:
                low = p
            v += x
            q += p * x
            if not maker[i]:  # buyer is the taker: taker-buy volume
                bv += x
                bq += p * x
        self.h, self.l, self.v, self.q, self.V, self.Q = h, low, v, q, bv, bq
        self.c = price[i1 - 1]
        self.n += i1 - i0
        self.L = tape.first_id + i1 - 1


def kline_for(tape: Tape, start_us: int, end_us: int) -> KlineAcc:
    """The kline of [start_us, end_us) from the retained trades."""
    i0 = tape.first_index_at(start_us)
    i1 = tape.first_index_at(end_us, i0)
    acc = KlineAcc(tape.price_before(i0))
    acc.fold(tape, i0, i1)
    return acc


class RollingWindow:
    """Sums over the trades with time in [now - window, now], advanced incrementally.

    Both edges only move forward, so each trade is added once and removed once. High and low are
    rescanned (in C, over the array slice) only after a trade holding them leaves the window.
    """

    __slots__ = ("_dirty", "h", "hi", "l", "lo", "q", "tape", "v")

    def __init__(self, tape: Tape) -> None:
        self.tape = tape
        self.lo = self.hi = tape.first_id  # trade ids: window is [lo, hi)
        self.v = self.q = 0
        self.h = self.l = 0
        self._dirty = True
        tape.trim_hooks.append(self._on_trim)

    def _on_trim(self, tape: Tape, new_first: int) -> None:
        if self.hi <= new_first:
            self.lo = self.hi = new_first
            self.v = self.q = 0
            self._dirty = True
        elif self.lo < new_first:
            self._remove(self.lo, new_first)
            self.lo = new_first

    def _remove(self, lo_id: int, hi_id: int) -> None:
        tape = self.tape
        base = tape.first_id
        price, qty = tape.price, tape.qty
        for i in range(lo_id - base, hi_id - base):
            p = price[i]
            self.v -= qty[i]
            self.q -= p * qty[i]
            if p in (self.h, self.l):
                self._dirty = True

    def update(self, start_us: int) -> None:
        tape = self.tape
        base = tape.first_id
        end = tape.end_id
        price, qty = tape.price, tape.qty
        if self.hi < end:
            h, low, v, q = self.h, self.l, self.v, self.q
            empty = self.hi == self.lo
            for i in range(self.hi - base, end - base):
                p = price[i]
                x = qty[i]
                if empty:
                    h = low = p
                    empty = False
                elif p > h:
                    h = p
                elif p < low:
                    low = p
                v += x
                q += p * x
            self.h, self.l, self.v, self.q = h, low, v, q
            self.hi = end
        new_lo = base + tape.first_index_at(start_us, self.lo - base)
        if new_lo > self.lo:
            self._remove(self.lo, new_lo)
            self.lo = new_lo
        if self._dirty and self.hi > self.lo:
            a, b = self.lo - base, self.hi - base
            self.h = max(price[a:b])
            self.l = min(price[a:b])
            self._dirty = False

    @property
    def count(self) -> int:
        return self.hi - self.lo
