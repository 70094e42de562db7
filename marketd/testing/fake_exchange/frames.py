"""Binance payload builders and server-side WebSocket framing.

Receives tape rows and statistics; emits payloads with Binance's exact keys and JSON types
(docs/binance.md §4: decimals as 8-decimal strings, ids and times as ints, flags as bools),
wrapped for combined streams, and unmasked server frames. Trade-like frames are built by string
templating, whole chunks at a time, because at `--rate max` this is the server's entire
per-message cost.
"""

from __future__ import annotations

import functools
import struct

import orjson

from marketd.testing.fake_exchange.market import E8, Tape
from marketd.testing.fake_exchange.stats import KlineAcc, RollingWindow

_BOOL = ("false", "true")
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def fmt8(v: int) -> str:
    """Integer x1e-8 -> plain decimal string with 8 decimals (sign kept)."""
    if v < 0:
        return "-" + fmt8(-v)
    return f"{v // E8}.{v % E8:08d}"


def fmt16(v: int) -> str:
    """Integer x1e-16 (price x qty) -> 8-decimal string, truncated."""
    if v < 0:
        return "-" + fmt16(-v)
    return fmt8(v // E8)


def pct3(change: int, base: int) -> str:
    """Percent change with 3 decimals, as Binance's `P`."""
    if base == 0:
        return "0.000"
    milli = abs(change) * 100_000 // base
    sign = "-" if change < 0 and milli else ""
    return f"{sign}{milli // 1000}.{milli % 1000:03d}"


# ---- WebSocket framing (RFC 6455 §5.2; server frames are never masked) ----


def ws_header(n: int, opcode: int = OP_TEXT) -> bytes:
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n)
    return struct.pack("!BBQ", 0x80 | opcode, 127, n)


def ws_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    return ws_header(len(payload), opcode) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return ws_frame(struct.pack("!H", code) + reason.encode()[:123], OP_CLOSE)


# Text-frame headers as latin-1 strings: an ASCII chunk of headers and payloads is then one
# str.join and one encode. Precomputed up to 4 KiB, which covers every trade-like frame.
_HDR: tuple[str, ...] = tuple(ws_header(n).decode("latin-1") for n in range(4096))


def text_frame_str(body: str) -> str:
    """An ASCII text payload framed as a latin-1 string."""
    n = len(body)
    return (_HDR[n] if n < 4096 else ws_header(n).decode("latin-1")) + body


def wrap(stream: str, payload: bytes, combined: bool) -> bytes:
    if not combined:
        return payload
    return b'{"stream":' + orjson.dumps(stream) + b',"data":' + payload + b"}"


# ---- Realtime (tape) streams: templated ----


class TapeTemplates:
    """Per connection and symbol: the constant parts of trade, aggTrade and bookTicker frames."""

    __slots__ = ("agg", "book", "close", "div", "lsym", "trade", "usym")

    def __init__(self, symbol: str, combined: bool, micros: bool) -> None:
        self.usym = symbol
        self.lsym = symbol.lower()
        self.div = 1 if micros else 1000  # tape times are µs
        self.close = "}" if combined else ""

        def pre(kind: str, event: str | None) -> str:
            head = f'{{"stream":"{self.lsym}@{kind}","data":' if combined else ""
            return head + (f'{{"e":"{event}","E":' if event else "{")

        self.trade = pre("trade", "trade")
        self.agg = pre("aggTrade", "aggTrade")
        self.book = pre("bookTicker", None)

    def trades(self, tape: Tape, start_id: int, end_id: int, event_us: int, out: list[str]) -> None:
        """Append framed @trade payloads for ids [start_id, end_id) to `out`."""
        base = tape.first_id
        price, qty, times, maker = tape.price, tape.qty, tape.time_us, tape.maker
        div = self.div
        head = f'{self.trade}{event_us // div},"s":"{self.usym}","t":'
        close = self.close
        hdr = _HDR
        last_p = -1
        p_s = ""
        for tid in range(start_id, end_id):
            i = tid - base
            p = price[i]
            if p != last_p:  # consecutive fills often share a price
                p_s = f"{p // E8}.{p % E8:08d}"
                last_p = p
            x = qty[i]
            body = (
                f'{head}{tid},"p":"{p_s}","q":"{x // E8}.{x % E8:08d}","T":{times[i] // div},'
                f'"m":{_BOOL[maker[i]]},"M":true}}{close}'
            )
            out.append(hdr[len(body)])
            out.append(body)

    def agg_trades(
        self, tape: Tape, start_agg: int, end_agg: int, event_us: int, out: list[str]
    ) -> None:
        base = tape.first_id
        head = f'{self.agg}{event_us // self.div},"s":"{self.usym}","a":'
        for agg_id in range(start_agg, end_agg):
            first, last = tape.agg_range(agg_id)
            i = first - base
            p = tape.price[i]
            total = sum(tape.qty[i : last - base + 1])
            body = (
                f'{head}{agg_id},"p":"{fmt8(p)}","q":"{fmt8(total)}","f":{first},"l":{last},'
                f'"T":{tape.time_us[i] // self.div},"m":{_BOOL[tape.maker[i]]},"M":true}}'
                f"{self.close}"
            )
            out.append(text_frame_str(body))

    def book_tickers(self, tape: Tape, start_agg: int, end_agg: int, out: list[str]) -> None:
        """One best bid/ask update per aggregate trade (the taker moved the top of the book)."""
        base = tape.first_id
        tick = tape.spec.tick_e8
        for agg_id in range(start_agg, end_agg):
            first, _ = tape.agg_range(agg_id)
            i = first - base
            p = tape.price[i]
            # A buyer-maker trade printed on the bid; otherwise on the ask.
            bid = p if tape.maker[i] else max(tick, p - tick)
            size = tape.qty[i]
            body = (
                f'{self.book}"u":{3 * agg_id},'
                f'"s":"{self.usym}","b":"{fmt8(bid)}","B":"{fmt8(size * 3)}",'
                f'"a":"{fmt8(bid + tick)}","A":"{fmt8(size * 2 + tape.spec.lot_e8)}"}}{self.close}'
            )
            out.append(text_frame_str(body))


# ---- Periodic streams: dicts in Binance's key order, encoded by orjson ----


def kline_payload(
    symbol: str,
    interval: str,
    start_us: int,
    end_us: int,
    acc: KlineAcc,
    closed: bool,
    event_us: int,
    div: int,
) -> bytes:
    return orjson.dumps(
        {
            "e": "kline",
            "E": event_us // div,
            "s": symbol,
            "k": {
                "t": start_us // div,
                "T": end_us // div - 1,
                "s": symbol,
                "i": interval,
                "f": acc.f,
                "L": acc.L,
                "o": fmt8(acc.o),
                "c": fmt8(acc.c),
                "h": fmt8(acc.h),
                "l": fmt8(acc.l),
                "v": fmt8(acc.v),
                "n": acc.n,
                "x": closed,
                "q": fmt16(acc.q),
                "V": fmt8(acc.V),
                "Q": fmt16(acc.Q),
                "B": "0",
            },
        }
    )


class TickerFigures:
    """Figures of a rolling window, in the shape the ticker payloads need."""

    __slots__ = ("F", "L", "c", "h", "l", "n", "o", "q", "v", "w", "x")

    def __init__(self, win: RollingWindow) -> None:
        tape = win.tape
        base = tape.first_id
        self.n = win.count
        if self.n:
            self.F, self.L = win.lo, win.hi - 1
            self.o = tape.price[win.lo - base]
            self.c = tape.price[win.hi - 1 - base]
            self.h, self.l, self.v, self.q = win.h, win.l, win.v, win.q
            self.w = win.q // win.v if win.v else self.c
            # `x` is the last price before the window (docs/binance.md §4.4).
            self.x = tape.price_before(win.lo - base) if win.lo > base else self.o
        else:
            last = tape.price[-1] if len(tape.price) else tape.spec.price_e8
            self.F = self.L = -1
            self.o = self.c = self.h = self.l = self.w = self.x = last
            self.v = self.q = 0


def ticker_payload(
    symbol: str, fig: TickerFigures, tape: Tape, open_us: int, event_us: int, div: int
) -> bytes:
    tick = tape.spec.tick_e8
    last_qty = tape.qty[fig.L - tape.first_id] if fig.n else 0
    change = fig.c - fig.o
    return orjson.dumps(
        {
            "e": "24hrTicker",
            "E": event_us // div,
            "s": symbol,
            "p": fmt8(change),
            "P": pct3(change, fig.o),
            "w": fmt8(fig.w),
            "x": fmt8(fig.x),
            "c": fmt8(fig.c),
            "Q": fmt8(last_qty),
            "b": fmt8(max(tick, fig.c - tick)),
            "B": fmt8(tape.spec.lot_e8 * 40),
            "a": fmt8(fig.c + tick),
            "A": fmt8(tape.spec.lot_e8 * 25),
            "o": fmt8(fig.o),
            "h": fmt8(fig.h),
            "l": fmt8(fig.l),
            "v": fmt8(fig.v),
            "q": fmt16(fig.q),
            "O": open_us // div,
            "C": event_us // div,
            "F": fig.F,
            "L": fig.L,
            "n": fig.n,
        }
    )


def mini_ticker_dict(symbol: str, fig: TickerFigures, event_us: int, div: int) -> dict[str, object]:
    return {
        "e": "24hrMiniTicker",
        "E": event_us // div,
        "s": symbol,
        "c": fmt8(fig.c),
        "o": fmt8(fig.o),
        "h": fmt8(fig.h),
        "l": fmt8(fig.l),
        "v": fmt8(fig.v),
        "q": fmt16(fig.q),
    }


def rolling_ticker_payload(
    symbol: str, window: str, fig: TickerFigures, open_us: int, event_us: int, div: int
) -> bytes:
    change = fig.c - fig.o
    return orjson.dumps(
        {
            "e": f"{window}Ticker",
            "E": event_us // div,
            "s": symbol,
            "p": fmt8(change),
            "P": pct3(change, fig.o),
            "o": fmt8(fig.o),
            "h": fmt8(fig.h),
            "l": fmt8(fig.l),
            "c": fmt8(fig.c),
            "w": fmt8(fig.w),
            "v": fmt8(fig.v),
            "q": fmt16(fig.q),
            "O": open_us // div,
            "C": event_us // div,
            "F": fig.F,
            "L": fig.L,
            "n": fig.n,
        }
    )


def avg_price_payload(
    symbol: str, fig: TickerFigures, tape: Tape, event_us: int, div: int
) -> bytes:
    last_time = tape.time_us[-1] if len(tape.time_us) else event_us
    return orjson.dumps(
        {
            "e": "avgPrice",
            "E": event_us // div,
            "s": symbol,
            "i": "5m",
            "w": fmt8(fig.w),
            "T": last_time // div,
        }
    )


# ---- Depth: diff events, partial books, REST snapshots (levels as (price_e8, qty_e8)) ----


_price8 = functools.lru_cache(maxsize=1 << 16)(fmt8)  # book prices repeat near the mid


def _levels(levels: list[tuple[int, int]]) -> list[list[str]]:
    return [[_price8(p), fmt8(q)] for p, q in levels]


def depth_diff_payload(
    symbol: str,
    first_id: int,
    last_id: int,
    bids: list[tuple[int, int]],
    asks: list[tuple[int, int]],
    event_us: int,
    div: int,
) -> bytes:
    """A `<symbol>@depth[@100ms]` event (docs/books.md): quantity "0" removes a level."""
    return orjson.dumps(
        {
            "e": "depthUpdate",
            "E": event_us // div,
            "s": symbol,
            "U": first_id,
            "u": last_id,
            "b": _levels(bids),
            "a": _levels(asks),
        }
    )


def depth_book_dict(
    last_id: int, bids: list[tuple[int, int]], asks: list[tuple[int, int]]
) -> dict[str, object]:
    """A partial-book payload (no e/E/s) and the REST /api/v3/depth body: the same shape."""
    return {"lastUpdateId": last_id, "bids": _levels(bids), "asks": _levels(asks)}


def server_shutdown_frame(event_us: int, div: int, combined: bool) -> bytes:
    payload = orjson.dumps({"e": "serverShutdown", "E": event_us // div})
    return ws_frame(wrap("!serverShutdown", payload, combined))
