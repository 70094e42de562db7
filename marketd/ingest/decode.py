"""Decode, validate, enrich and route one WebSocket frame: bytes in, Kafka-ready records out.

Pure module (no trio, no Kafka). `Decoder.decode(frame, out)` appends `Outgoing` records to `out`:
market data to its topic, rejected input to the dead-letter topic with a reason code. Control
replies and errors are counted and logged, never published. Nothing raises out of `decode` for
any input: the per-frame boundary turns every failure into a typed rejection, which names
the stream (and is keyed by the symbol) whenever the envelope got that far.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import re
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, Final, NamedTuple

import msgspec

from marketd import records as rec
from marketd.errors import StreamNameError
from marketd.ingest import wire
from marketd.ingest.streams import StreamKind, StreamSpec, interval_ms, parse_stream
from marketd.logs import Throttle, get_logger
from marketd.metrics import FastCounter

log = get_logger(__name__)

# Epoch ms of 2017-01-01: Binance opened in July 2017 and its REST API rejects earlier times.
MIN_TIME_MS = 1_483_228_800_000
# How far ahead of the local clock (at receipt) a record's times may be: the default of
# `ingest.max_future_ms`, the bound Binance's own REST API applies to timestamps (README, "DLQ
# reasons"). Beyond it a record is dead-lettered: a bogus future time would otherwise hold the
# de-duplication gates behind it. A kline's close time (up to a month ahead for 1M) is checked
# against its open time instead.
MAX_FUTURE_MS: Final = 10_000
# Ids, counts and times must fit the signed 64-bit integers of the downstream schemas (Spark,
# PostgreSQL bigint); msgspec itself accepts integers of any size.
INT64_MAX: Final = 2**63 - 1
# Label of `marketd_ws_stream_frames_total` for frames of streams this process did not
# subscribe: labels come only from the configuration, never from what upstream sends.
OTHER_STREAM: Final = "other"
# Longest stream name copied into a DLQ record (junk names may be as long as the frame).
_DLQ_STREAM_CHARS = 256


class Reason(enum.StrEnum):
    """Why an input was dead-lettered: the DLQ record's `reason` and the metrics label.

    Documented in the README ("DLQ reasons"); a test keeps the two lists equal.
    """

    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    BAD_DECIMAL = "bad_decimal"
    NEGATIVE_VALUE = "negative_value"
    OUT_OF_RANGE = "out_of_range"
    INCONSISTENT_VALUES = "inconsistent_values"
    EVENT_TYPE_MISMATCH = "event_type_mismatch"
    SYMBOL_MISMATCH = "symbol_mismatch"
    INTERVAL_MISMATCH = "interval_mismatch"
    ABSURD_TIMESTAMP = "absurd_timestamp"
    DUPLICATE_KEY = "duplicate_key"
    TOO_DEEP = "too_deep"
    FRAME_TOO_LARGE = "frame_too_large"
    INVALID_UTF8 = "invalid_utf8"
    UNSUPPORTED_STREAM = "unsupported_stream"
    UNKNOWN_FRAME = "unknown_frame"
    IMPLAUSIBLE_ID = "implausible_id"  # the trade gate's quarantine (continuity.py)
    DELIVERY_FAILED = "delivery_failed"  # Kafka refused the record for good (produce.py)


_UDEC = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_SDEC = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


class Frame(NamedTuple):
    """What the WebSocket source hands over: the frame, when it arrived, from which connection."""

    data: str | bytes
    recv_ns: int  # time.time_ns() at receipt: ingested_at and the receipt->ack latency start
    conn: int


class Outgoing(NamedTuple):
    """One Kafka message to produce."""

    topic: str
    key: bytes | None
    value: bytes
    recv_ns: int
    headers: list[tuple[str, bytes]] | None = None
    # What the continuity gates need, without parsing the value again:
    # ("trade", symbol, trade_id, trade_time) | ("kline", stream, symbol, interval, open_time,
    # event_time, is_closed, close_time) | ("ticker", stream, symbol, event_time); None for
    # other kinds.
    ident: tuple[Any, ...] | None = None


class Reject(Exception):
    """Internal: a frame failed validation. `reason` is the DLQ/metrics code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_SRC = rec.SOURCE
_SV = rec.SCHEMA_VERSION


class _Route(NamedTuple):
    """Everything the decoder needs for one stream name, resolved once and cached."""

    spec: StreamSpec
    decoder: msgspec.json.Decoder[Any]
    topic: str
    build: Callable[[StreamSpec, str, Any, int], Any]
    label: str
    all_market: bool
    ident: Callable[[Any], tuple[Any, ...]] | None


class Topics(NamedTuple):
    trades: str
    klines: str
    tickers: str
    dlq: str
    routes: dict[str, str]

    def for_kind(self, kind: StreamKind) -> str:
        if kind is StreamKind.TRADE:
            return self.trades
        if kind is StreamKind.KLINE:
            return self.klines
        if kind is StreamKind.TICKER:
            return self.tickers
        return self.routes[kind.value]


_ENVELOPE = msgspec.json.Decoder(wire.Envelope)
_DECODERS: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}
_ENCODE = msgspec.json.Encoder().encode


def _decoder(cls: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    dec = _DECODERS.get(cls)
    if dec is None:
        dec = _DECODERS[cls] = msgspec.json.Decoder(cls)
    return dec


_PAYLOAD: dict[StreamKind, type[msgspec.Struct]] = {
    StreamKind.TRADE: wire.Trade,
    StreamKind.AGG_TRADE: wire.AggTrade,
    StreamKind.KLINE: wire.Kline,
    StreamKind.TICKER: wire.Ticker,
    StreamKind.MINI_TICKER: wire.MiniTicker,
    StreamKind.ROLLING_TICKER: wire.RollingTicker,
    StreamKind.BOOK_TICKER: wire.BookTicker,
    StreamKind.AVG_PRICE: wire.AvgPrice,
    StreamKind.REFERENCE_PRICE: wire.ReferencePrice,
    StreamKind.BLOCK_TRADE: wire.BlockTrade,
}
# Keys per payload when all optional keys are present (+ nested objects' keys).
_KEYS: dict[type[msgspec.Struct], int] = {cls: wire.field_count(cls) for cls in _PAYLOAD.values()}
_KEYS[wire.Kline] += wire.field_count(wire.KlineBody)


def _present_keys(payload: Any) -> int:
    """Keys the decoded payload had in the text: all fields minus the optional ones absent."""
    cls = type(payload)
    n = _KEYS[cls]
    if cls is wire.Trade or cls is wire.AggTrade:
        return n - (payload.M is msgspec.UNSET)
    if cls is wire.Kline:
        return n - (payload.k.B is msgspec.UNSET)
    if cls is wire.Ticker:
        return n - (payload.x is msgspec.UNSET)
    return n


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Reject(Reason.DUPLICATE_KEY, f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _udec(value: str, name: str) -> str:
    if _UDEC.fullmatch(value) is None:
        if _SDEC.fullmatch(value) is not None:
            raise Reject(Reason.NEGATIVE_VALUE, f"{name}={value!r} is negative")
        raise Reject(Reason.BAD_DECIMAL, f"{name}={value!r} is not a finite decimal")
    return value


def _sdec(value: str, name: str) -> str:
    if _SDEC.fullmatch(value) is None:
        raise Reject(Reason.BAD_DECIMAL, f"{name}={value!r} is not a finite decimal")
    return value


class Decoder:
    """Turns frames into records. One per process, shared by the connections' tasks (trio
    thread only: not thread-safe)."""

    def __init__(
        self,
        topics: Topics,
        *,
        max_frame_bytes: int = 1_048_576,
        dlq_max_raw_bytes: int = 8192,
        time_unit: str = "MILLISECOND",
        records_total: FastCounter | None = None,
        rejected_total: FastCounter | None = None,
        control_total: FastCounter | None = None,
        frames_by_stream: FastCounter | None = None,
        streams: Iterable[str] = (),
        max_future_ms: int = MAX_FUTURE_MS,
        wall_ms: Callable[[], int] | None = None,
        log_interval_s: float = 60.0,
    ) -> None:
        """`streams`: the configured stream names, the only labels `frames_by_stream` gets
        (frames of any other stream count as OTHER_STREAM). `max_future_ms`: how far ahead of
        the receipt time a record's times may be (further: absurd_timestamp)."""
        self.topics = topics
        self.max_frame_bytes = max_frame_bytes
        self.dlq_max_raw_bytes = dlq_max_raw_bytes
        # Microsecond streams are normalised to ms (API-NOTES §1, timeUnit=MICROSECOND).
        self.time_div = 1000 if time_unit == "MICROSECOND" else 1
        self.records_total = records_total or FastCounter("records", "", "kind")
        self.rejected_total = rejected_total or FastCounter("rejected", "", "reason")
        self.control_total = control_total or FastCounter("control", "", "kind")
        self.frames_by_stream = frames_by_stream or FastCounter("frames", "", "stream")
        self._labels = frozenset(streams)
        self.max_future_ms = max_future_ms
        # What the frame being decoded is known to be, for its DLQ record should it fail.
        self._stream: str | None = None
        self._key_symbol: str | None = None
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._routes: dict[str, _Route] = {}
        self._throttle = Throttle(log_interval_s)

    # -- entry point ------------------------------------------------------------------------------

    def decode(self, frame: Frame, out: list[Outgoing]) -> None:
        """Append the records of one frame (or its DLQ record) to `out`. Never raises."""
        self._stream = self._key_symbol = None
        try:
            self._decode(frame, out)
        except Reject as r:
            self._reject(frame, r.reason, r.detail, out)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._reject(frame, _msgspec_reason(exc), str(exc), out)
        except RecursionError:
            self._reject(frame, Reason.TOO_DEEP, "JSON nesting too deep", out)
        except ValueError as exc:  # the slow duplicate-key parse disagreeing with msgspec
            self._reject(frame, Reason.BAD_JSON, str(exc), out)

    # -- the steps --------------------------------------------------------------------------------

    def _decode(self, frame: Frame, out: list[Outgoing]) -> None:
        data = frame.data
        if isinstance(data, bytes):
            if len(data) > self.max_frame_bytes:
                raise Reject(Reason.FRAME_TOO_LARGE, f"{len(data)} bytes > {self.max_frame_bytes}")
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject(
                    Reason.INVALID_UTF8, f"binary frame is not UTF-8: {exc.reason}"
                ) from None
        elif len(data) * 4 > self.max_frame_bytes and len(data.encode()) > self.max_frame_bytes:
            # len(str) <= UTF-8 length <= 4 * len(str): encode only when it may be too large.
            raise Reject(
                Reason.FRAME_TOO_LARGE, f"{len(data.encode())} bytes > {self.max_frame_bytes}"
            )
        try:
            env = _ENVELOPE.decode(data)
        except msgspec.ValidationError:
            raise Reject(Reason.NOT_AN_OBJECT, "frame is not a JSON object") from None
        except msgspec.DecodeError as exc:
            raise Reject(Reason.BAD_JSON, str(exc)) from None

        if env.stream is msgspec.UNSET:
            self._unwrapped(env, frame)
            return
        stream = self._stream = env.stream
        # Only configured names become labels: junk names from upstream must not create series.
        self.frames_by_stream.inc(stream if stream in self._labels else OTHER_STREAM)
        if env.data is msgspec.UNSET:
            raise Reject(Reason.MISSING_FIELD, "combined-stream frame without 'data'")
        if stream == "!serverShutdown":
            self._control("server_shutdown", frame, "server announced shutdown")
            return
        route = self._routes.get(stream) or self._route(stream)
        self._key_symbol = route.spec.symbol
        self._payload(route, stream, env.data, data, 2, frame, out)

    def _unwrapped(self, env: wire.Envelope, frame: Frame) -> None:
        # Control replies: {"result": ..., "id": ...}; errors flat {"code","msg"} or nested
        # {"error": {...}}, with id possibly null or absent (API-NOTES §3). marketd only opens
        # combined-stream connections (README, "Record contract"), where every market event comes
        # in a {"stream", "data"} envelope: a bare event is not trusted to say what it is.
        if env.result is not msgspec.UNSET and env.id is not msgspec.UNSET:
            self._control("result", frame, f"id={env.id!r}")
            return
        if env.error is not msgspec.UNSET or (
            env.code is not msgspec.UNSET and env.msg is not msgspec.UNSET
        ):
            detail = self._error_detail(env)
            self._control("error", frame, detail, level="warning")
            return
        if env.e == "serverShutdown":
            self._control("server_shutdown", frame, "server announced shutdown")
            return
        if isinstance(env.e, str):
            raise Reject(
                Reason.UNKNOWN_FRAME,
                f"bare {env.e[:40]!r} event without the stream/data envelope on a combined-stream "
                "connection",
            )
        raise Reject(Reason.UNKNOWN_FRAME, "neither a stream event nor a control reply")

    def _route(self, stream: str) -> _Route:
        try:
            spec = parse_stream(stream)
        except StreamNameError as exc:
            raise Reject(Reason.UNSUPPORTED_STREAM, str(exc)) from None
        cls = _PAYLOAD.get(spec.kind)
        if cls is None:  # a kind the tape does not decode (depth: the order books' own path)
            raise Reject(
                Reason.UNSUPPORTED_STREAM, f"{spec.kind.value} streams are not decoded here"
            )
        builders = {
            StreamKind.TRADE: self._trade,
            StreamKind.KLINE: self._kline,
            StreamKind.TICKER: self._ticker,
        }
        route = _Route(
            spec,
            _decoder(_ArrayOf(cls) if spec.all_market else cls),
            self.topics.for_kind(spec.kind),
            builders.get(spec.kind, functools.partial(self._build_routed, spec.kind)),
            str(spec.kind.value),
            spec.all_market,
            _IDENT.get(spec.kind),
        )
        if len(self._routes) < 100_000:  # bounded: garbage stream names must not grow memory
            self._routes[stream] = route
        return route

    @staticmethod
    def _check_duplicates(text: str, expected_keys: int) -> None:
        """Reject JSON objects with a key twice (JSON parsers silently keep the last one).

        Fast path: without backslashes or whitespace, every `":` in the text ends a key, so the
        count equals the number of keys in the text; equal to the number of keys the decoded
        payload has means no duplicate and no unknown key. Anything else (extra fields,
        pretty-printing, escapes, arrays) takes the exact slow path, which parses once more with a
        duplicate-detecting hook.
        """
        if (
            expected_keys >= 0
            and text.count('":') == expected_keys
            and "\\" not in text
            and " " not in text
            and "\n" not in text
            and "\t" not in text
            and "\r" not in text
        ):
            return
        json.loads(text, object_pairs_hook=_pairs_hook)

    # -- payloads ---------------------------------------------------------------------------------

    def _payload(
        self,
        route: _Route,
        stream: str,
        raw: msgspec.Raw,
        text: str,
        wrapper_keys: int,
        frame: Frame,
        out: list[Outgoing],
    ) -> None:
        now_ms = frame.recv_ns // 1_000_000
        if route.all_market:
            items = route.decoder.decode(raw)
            self._check_duplicates(text, -1)
            staged = [route.build(route.spec, stream, item, now_ms) for item in items]
            for record in staged:
                out.append(
                    Outgoing(route.topic, record.symbol.encode(), _ENCODE(record), frame.recv_ns)
                )
            self.records_total.inc(route.label, len(staged))
            return
        payload = route.decoder.decode(raw)
        self._check_duplicates(text, wrapper_keys + _present_keys(payload))
        record = route.build(route.spec, stream, payload, now_ms)
        ident = route.ident(record) if route.ident is not None else None
        out.append(
            Outgoing(
                route.topic, record.symbol.encode(), _ENCODE(record), frame.recv_ns, None, ident
            )
        )
        self.records_total.inc(route.label)

    def _time(self, value: int, name: str, now_ms: int) -> int:
        ms = value // self.time_div if self.time_div != 1 else value
        if ms < MIN_TIME_MS or ms > now_ms + self.max_future_ms:
            raise Reject(
                Reason.ABSURD_TIMESTAMP,
                f"{name}={value} is outside 2017..now+{self.max_future_ms}ms (now={now_ms})",
            )
        return ms

    def _symbol(self, spec: StreamSpec, s: str) -> str:
        symbol = s.upper()
        if spec.symbol is not None and symbol != spec.symbol:
            raise Reject(
                Reason.SYMBOL_MISMATCH, f"payload symbol {s!r} on stream for {spec.symbol}"
            )
        if not symbol:
            raise Reject(Reason.MISSING_FIELD, "empty symbol")
        return symbol

    def _event(self, e: str, expected: str) -> None:
        if e != expected:
            raise Reject(Reason.EVENT_TYPE_MISMATCH, f"event type {e!r} on a {expected} stream")

    def _trade(self, spec: StreamSpec, stream: str, p: Any, now_ms: int) -> Any:
        if p.e != "trade":
            self._event(p.e, "trade")
        return rec.TradeRecord(
            self._symbol(spec, p.s),
            _id(p.t, "t"),
            _udec(p.p, "p"),
            _udec(p.q, "q"),
            self._time(p.T, "T", now_ms),
            self._time(p.E, "E", now_ms),
            p.m,
            now_ms,
            _SRC,
            stream,
            _SV,
        )

    def _kline(self, spec: StreamSpec, stream: str, p: Any, now_ms: int) -> Any:
        self._event(p.e, "kline")
        k = p.k
        if k.i != spec.interval:
            raise Reject(Reason.INTERVAL_MISMATCH, f"kline interval {k.i!r} on {stream}")
        symbol = self._symbol(spec, p.s)
        if k.s.upper() != symbol:
            raise Reject(Reason.SYMBOL_MISMATCH, f"kline symbol {k.s!r} in event for {p.s!r}")
        open_ms = self._time(k.t, "k.t", now_ms)
        close_ms = k.T // self.time_div
        if not open_ms < close_ms <= open_ms + interval_ms(k.i):
            raise Reject(Reason.ABSURD_TIMESTAMP, f"kline close {k.T} not within its interval")
        o, h, lo, c = _udec(k.o, "o"), _udec(k.h, "h"), _udec(k.l, "l"), _udec(k.c, "c")
        _check_range(o, h, lo, c)
        # -1/-1: a kline without trades (README, "Record contract").
        first, last = _opt_id(k.f, "f"), _opt_id(k.L, "L")
        if first > last:
            raise Reject(
                Reason.INCONSISTENT_VALUES, f"kline first trade id f={first} > last L={last}"
            )
        return rec.KlineRecord(
            symbol,
            k.i,
            open_ms,
            close_ms,
            o,
            h,
            lo,
            c,
            _udec(k.v, "v"),
            _udec(k.q, "q"),
            _count(k.n),
            _udec(k.V, "V"),
            _udec(k.Q, "Q"),
            first,
            last,
            k.x,
            self._time(p.E, "E", now_ms),
            now_ms,
            _SRC,
            stream,
            _SV,
        )

    def _ticker(self, spec: StreamSpec, stream: str, p: Any, now_ms: int) -> Any:
        self._event(p.e, "24hrTicker")
        return rec.TickerRecord(
            self._symbol(spec, p.s),
            _udec(p.c, "c"),
            _udec(p.Q, "Q"),
            _sdec(p.p, "p"),
            _sdec(p.P, "P"),
            _udec(p.w, "w"),
            _udec(p.o, "o"),
            _udec(p.h, "h"),
            _udec(p.l, "l"),
            _udec(p.v, "v"),
            _udec(p.q, "q"),
            _udec(p.b, "b"),
            _udec(p.B, "B"),
            _udec(p.a, "a"),
            _udec(p.A, "A"),
            self._time(p.O, "O", now_ms),
            self._time(p.C, "C", now_ms),
            _opt_id(p.F, "F"),
            _opt_id(p.L, "L"),
            _count(p.n),
            self._time(p.E, "E", now_ms),
            now_ms,
            _SRC,
            stream,
            _SV,
        )

    def _build_routed(
        self, kind: StreamKind, spec: StreamSpec, stream: str, p: Any, now_ms: int
    ) -> Any:
        sv = rec.SCHEMA_VERSION
        src = rec.SOURCE
        if kind is StreamKind.AGG_TRADE:
            self._event(p.e, "aggTrade")
            first, last = _id(p.f, "f"), _id(p.l, "l")
            if first > last:
                raise Reject(
                    Reason.INCONSISTENT_VALUES, f"aggTrade first trade id f={first} > last l={last}"
                )
            return rec.AggTradeRecord(
                self._symbol(spec, p.s),
                _id(p.a, "a"),
                _udec(p.p, "p"),
                _udec(p.q, "q"),
                first,
                last,
                self._time(p.T, "T", now_ms),
                self._time(p.E, "E", now_ms),
                p.m,
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.MINI_TICKER:
            self._event(p.e, "24hrMiniTicker")
            return rec.MiniTickerRecord(
                self._symbol(spec, p.s),
                _udec(p.c, "c"),
                _udec(p.o, "o"),
                _udec(p.h, "h"),
                _udec(p.l, "l"),
                _udec(p.v, "v"),
                _udec(p.q, "q"),
                self._time(p.E, "E", now_ms),
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.ROLLING_TICKER:
            self._event(p.e, f"{spec.window}Ticker")
            return rec.RollingTickerRecord(
                self._symbol(spec, p.s),
                spec.window or "",
                _udec(p.c, "c"),
                _sdec(p.p, "p"),
                _sdec(p.P, "P"),
                _udec(p.w, "w"),
                _udec(p.o, "o"),
                _udec(p.h, "h"),
                _udec(p.l, "l"),
                _udec(p.v, "v"),
                _udec(p.q, "q"),
                self._time(p.O, "O", now_ms),
                self._time(p.C, "C", now_ms),
                _opt_id(p.F, "F"),
                _opt_id(p.L, "L"),
                _count(p.n),
                self._time(p.E, "E", now_ms),
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.BOOK_TICKER:
            return rec.BookTickerRecord(
                self._symbol(spec, p.s),
                _id(p.u, "u"),
                _udec(p.b, "b"),
                _udec(p.B, "B"),
                _udec(p.a, "a"),
                _udec(p.A, "A"),
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.AVG_PRICE:
            self._event(p.e, "avgPrice")
            return rec.AvgPriceRecord(
                self._symbol(spec, p.s),
                p.i,
                _udec(p.w, "w"),
                self._time(p.T, "T", now_ms),
                self._time(p.E, "E", now_ms),
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.REFERENCE_PRICE:
            self._event(p.e, "referencePrice")
            return rec.ReferencePriceRecord(
                self._symbol(spec, p.s),
                None if p.r is None else _udec(p.r, "r"),
                self._time(p.t, "t", now_ms),
                now_ms,
                src,
                stream,
                sv,
            )
        if kind is StreamKind.BLOCK_TRADE:
            self._event(p.e, "blockTrade")
            return rec.BlockTradeRecord(
                self._symbol(spec, p.s),
                _id(p.t, "t"),
                _udec(p.p, "p"),
                _udec(p.q, "q"),
                self._time(p.T, "T", now_ms),
                self._time(p.E, "E", now_ms),
                p.m,
                now_ms,
                src,
                stream,
                sv,
            )
        raise Reject(Reason.UNSUPPORTED_STREAM, f"no decoder for {kind}")  # pragma: no cover

    # -- rejections and control frames ------------------------------------------------------------

    def _reject(self, frame: Frame, reason: Reason, detail: str, out: list[Outgoing]) -> None:
        self.rejected_total.inc(reason)
        received_at = frame.recv_ns // 1_000_000
        stream = self._stream[:_DLQ_STREAM_CHARS] if self._stream is not None else None
        record = dlq_record(frame.data, reason, detail, stream, received_at, self.dlq_max_raw_bytes)
        # Keyed like the market data of its symbol (same partition), when the stream names one.
        key = self._key_symbol.encode() if self._key_symbol else None
        out.append(Outgoing(self.topics.dlq, key, _ENCODE(record), frame.recv_ns))
        suppressed = self._throttle.should_log(f"reject:{reason}", frame.recv_ns / 1e9)
        if suppressed is not None:
            log.warning(
                "decode.rejected",
                reason=reason,
                detail=detail[:200],
                stream=stream,
                sample=_sample(frame.data),
                suppressed_since_last=suppressed,
            )

    def _control(self, kind: str, frame: Frame, detail: str, level: str = "debug") -> None:
        self.control_total.inc(kind)
        suppressed = self._throttle.should_log(f"control:{kind}", frame.recv_ns / 1e9)
        if suppressed is None:
            return
        fields = {
            "kind": kind,
            "detail": detail[:300],
            "conn": frame.conn,
            "suppressed_since_last": suppressed,
        }
        if level == "warning":
            log.warning("ws.control_error", **fields)
        elif kind == "server_shutdown":
            log.info("ws.server_shutdown", **fields)
        else:
            log.debug("ws.control", **fields)

    @staticmethod
    def _error_detail(env: wire.Envelope) -> str:
        if env.error is not msgspec.UNSET:
            try:
                body = msgspec.json.decode(env.error, type=wire.ErrorBody)
                return f"code={body.code!r} msg={body.msg!r} id={env.id!r}"
            except (msgspec.DecodeError, msgspec.ValidationError):
                return f"error={bytes(env.error)[:200]!r} id={env.id!r}"
        return f"code={env.code!r} msg={env.msg!r} id={env.id!r}"


_IDENT: dict[StreamKind, Callable[[Any], tuple[Any, ...]]] = {
    StreamKind.TRADE: lambda r: ("trade", r.symbol, r.trade_id, r.trade_time),
    StreamKind.KLINE: lambda r: (
        "kline",
        r.stream,
        r.symbol,
        r.interval,
        r.open_time,
        r.event_time,
        r.is_closed,
        r.close_time,
    ),
    StreamKind.TICKER: lambda r: ("ticker", r.stream, r.symbol, r.event_time),
}

_ARRAY_TYPES: dict[type[msgspec.Struct], Any] = {}


def _ArrayOf(cls: type[msgspec.Struct]) -> Any:
    tp = _ARRAY_TYPES.get(cls)
    if tp is None:
        tp = _ARRAY_TYPES[cls] = list[cls]  # type: ignore[valid-type]
    return tp


def _id(value: int, name: str) -> int:
    """An id, count or sequence number: 0..2^63-1."""
    if value < 0:
        raise Reject(Reason.NEGATIVE_VALUE, f"{name}={value} is negative")
    if value > INT64_MAX:
        raise Reject(Reason.OUT_OF_RANGE, f"{name}={value} does not fit a signed 64-bit integer")
    return value


def _opt_id(value: int, name: str) -> int:
    """A trade id that is -1 when there is none (klines and tickers without trades)."""
    return value if value == -1 else _id(value, name)


def _count(value: int) -> int:
    return _id(value, "n")


def _check_range(open_: str, high: str, low: str, close: str) -> None:
    """High and low must bound open and close (exact decimals; the formats are checked)."""
    hi, lo = Decimal(high), Decimal(low)
    if not (lo <= hi and lo <= Decimal(open_) <= hi and lo <= Decimal(close) <= hi):
        raise Reject(
            Reason.INCONSISTENT_VALUES,
            f"high={high} and low={low} do not bound open={open_} and close={close}",
        )


def _msgspec_reason(exc: Exception) -> Reason:
    text = str(exc)
    if "missing required field" in text:
        return Reason.MISSING_FIELD
    if isinstance(exc, msgspec.ValidationError):  # a subclass of DecodeError
        return Reason.WRONG_TYPE
    return Reason.BAD_JSON


def _sample(data: str | bytes, limit: int = 160) -> str:
    if isinstance(data, bytes):
        return repr(data[:limit])
    return data[:limit]


def dlq_record(
    data: str | bytes,
    reason: str,
    detail: str,
    stream: str | None,
    received_at: int,
    max_raw_bytes: int,
) -> rec.DlqRecord:
    """A DLQ record: the frame as text (truncated at a character boundary), or base64 if binary."""
    raw_bytes = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    size = len(raw_bytes)
    cut = raw_bytes[:max_raw_bytes]
    try:
        text: str | None = cut.decode("utf-8")
        b64 = None
    except UnicodeDecodeError as exc:
        if exc.start >= len(cut) - 3 and exc.reason == "unexpected end of data":
            text, b64 = cut[: exc.start].decode("utf-8"), None  # cut inside a character
        else:
            text, b64 = None, base64.b64encode(cut).decode("ascii")
    return rec.DlqRecord(
        reason, detail[:1000], stream, text, b64, size, received_at, rec.SCHEMA_VERSION
    )
