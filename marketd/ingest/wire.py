"""Binance's wire format: the one-letter keys live here and nowhere else (docs/binance.md §4).

msgspec Structs with strict types mirror each payload: JSON strings for prices, integers for ids and
times, booleans for flags. msgspec rejects a bool where an int is expected, NaN tokens, lone
surrogates and wrong types in C, which is both faster (docs/performance.md §1: ~3x cattrs) and
stricter than coercing converters. Unknown keys are ignored (Binance adds fields).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType


class Envelope(msgspec.Struct):
    """Any frame on a combined connection: an event wrapper, a control reply, or an error."""

    stream: str | UnsetType = UNSET
    data: msgspec.Raw | UnsetType = UNSET
    # Control replies {"result": ..., "id": ...} and errors (flat or nested, docs/binance.md §3).
    result: msgspec.Raw | UnsetType = UNSET
    id: Any = UNSET
    error: msgspec.Raw | UnsetType = UNSET
    code: Any = UNSET
    msg: Any = UNSET
    # Raw-mode (/ws) events are bare payloads; `e` tells them apart from control frames.
    e: Any = UNSET


class Trade(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool
    M: bool | UnsetType = UNSET  # "Ignore"; tolerated when absent


class AggTrade(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    a: int
    p: str
    q: str
    f: int
    l: int  # noqa: E741 - Binance's key
    T: int
    m: bool
    M: bool | UnsetType = UNSET


class KlineBody(msgspec.Struct, frozen=True):
    t: int
    T: int
    s: str
    i: str
    f: int
    L: int
    o: str
    c: str
    h: str
    l: str  # noqa: E741
    v: str
    n: int
    x: bool
    q: str
    V: str
    Q: str
    B: str | UnsetType = UNSET  # "Ignore"; absent on some empty klines (docs/binance.md §4.3)


class Kline(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    k: KlineBody


class Ticker(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    p: str
    P: str
    w: str
    c: str
    Q: str
    b: str
    B: str
    a: str
    A: str
    o: str
    h: str
    l: str  # noqa: E741
    v: str
    q: str
    O: int  # noqa: E741
    C: int
    F: int
    L: int
    n: int
    x: str | UnsetType = UNSET  # previous close; not part of our record


class MiniTicker(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    c: str
    o: str
    h: str
    l: str  # noqa: E741
    v: str
    q: str


class RollingTicker(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    p: str
    P: str
    o: str
    h: str
    l: str  # noqa: E741
    c: str
    w: str
    v: str
    q: str
    O: int  # noqa: E741
    C: int
    F: int
    L: int
    n: int


class BookTicker(msgspec.Struct, frozen=True):
    u: int
    s: str
    b: str
    B: str
    a: str
    A: str


class AvgPrice(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    i: str
    w: str
    T: int


class ReferencePrice(msgspec.Struct, frozen=True):
    e: str
    s: str
    r: str | None
    t: int


class BlockTrade(msgspec.Struct, frozen=True):
    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool


class ErrorBody(msgspec.Struct):
    code: Any = None
    msg: Any = None


# Number of keys each payload carries when every optional key is present; the decoder's
# duplicate-key check compares this with the keys counted in the text.
def field_count(cls: type[msgspec.Struct]) -> int:
    return len(cls.__struct_fields__)
