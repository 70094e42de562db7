"""Fault switches and their counters, plus the table of malformed frames.

Receives settings from CLI flags, `FakeExchange.set_faults(...)` and `POST /fake/faults`; the
WebSocket and REST code read them on every chunk/request, so a change applies at once. Every
injected fault is counted in `FaultCounters` (reported by `GET /fake/stats`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

MALFORMED_KINDS: tuple[str, ...] = (
    "bad_json",
    "wrong_types",
    "missing_fields",
    "nan_price",
    "negative_qty",
    "wrong_event_type",
    "absurd_timestamp",
    "non_utf8",
    "oversized",
    "duplicate_keys",
    "deep_nesting",
)
OVERSIZED_BYTES = 2_000_000  # above the 1 MiB default max message size of common clients
DEEP_NESTING = 100_000


@attrs.define
class Faults:
    """Current fault settings. `None` / 0 means off. Frame counts are per connection."""

    drop_after: int | None = None  # abort the TCP connection after N data frames
    drop_repeat: bool = False  # False: only the first connection that reaches N; True: every one
    stall_after: int | None = None  # stop sending after N data frames, keep the socket open
    stall_repeat: bool = False
    stall_for_s: float | None = None  # None: until the switch is cleared
    stall_pings: bool = False  # while stalled, also send no pings and answer none
    malformed_ratio: float = 0.0  # an extra malformed frame before a data frame, this often
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS
    shutdown_after: int | None = None  # send serverShutdown after N frames, then close
    shutdown_close_delay_s: float = 1.0
    max_connection_age_s: float | None = None  # simulated seconds (Binance: 24 h)
    skip_every: int | None = None  # per symbol: after every N trade frames, withhold some ids
    skip_count: int = 1  # how many consecutive ids to withhold (REST still serves them)
    rest_429_until: float = 0.0  # trio time until which REST answers 429 (set via *_for_s)
    rest_503_until: float = 0.0
    nested_errors: bool = False  # control errors as {"error":{code,msg},"id"} (3P shape)
    enforce_msg_limit: bool = True  # 5 incoming messages/s, else disconnect (docs/binance.md §2)
    # Depth: withhold one diff event on the WebSocket after N diff events of a stream (the book
    # and REST go on as if it was sent): once, or after every N with depth_drop_repeat.
    depth_drop_after: int | None = None
    depth_drop_repeat: bool = False
    # Depth: the next /api/v3/depth answer is the book this many steps (events) ago; then off.
    stale_depth_snapshot: int | None = None

    def validate(self) -> None:
        for name in (
            "drop_after",
            "stall_after",
            "shutdown_after",
            "skip_every",
            "depth_drop_after",
            "stale_depth_snapshot",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if not 0.0 <= self.malformed_ratio <= 1.0:
            raise ValueError(f"malformed_ratio must be within 0..1, got {self.malformed_ratio!r}")
        unknown = set(self.malformed_kinds) - set(MALFORMED_KINDS)
        if unknown or not self.malformed_kinds:
            raise ValueError(
                f"malformed_kinds: unknown {sorted(unknown)}; allowed {list(MALFORMED_KINDS)}"
            )
        if self.skip_count < 1:
            raise ValueError("skip_count must be at least 1")

    def per_frame_active(self) -> bool:
        """Whether the sender needs its slow path (a decision per frame)."""
        return self.malformed_ratio > 0 or self.skip_every is not None

    def snapshot(self, now: float) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["malformed_kinds"] = list(self.malformed_kinds)
        out["rest_429_for_s"] = max(0.0, self.rest_429_until - now)
        out["rest_503_for_s"] = max(0.0, self.rest_503_until - now)
        del out["rest_429_until"], out["rest_503_until"]
        return out


_FIELDS = {f.name: f for f in attrs.fields(Faults)}
_INT_OR_NONE = {
    "drop_after",
    "stall_after",
    "shutdown_after",
    "skip_every",
    "depth_drop_after",
    "stale_depth_snapshot",
}
_FLOAT_OR_NONE = {"stall_for_s", "max_connection_age_s"}
_BOOLS = {
    "drop_repeat",
    "stall_repeat",
    "stall_pings",
    "nested_errors",
    "enforce_msg_limit",
    "depth_drop_repeat",
}


def apply_changes(faults: Faults, changes: Mapping[str, Any], now: float) -> Faults:
    """A validated copy of `faults` with `changes` (JSON-like values) applied.

    `rest_429_for_s` / `rest_503_for_s` are durations from `now` (trio time).
    """
    updates: dict[str, Any] = {}
    for key, value in changes.items():
        if key in ("rest_429_for_s", "rest_503_for_s"):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a number of seconds >= 0")
            updates[key.replace("_for_s", "_until")] = now + float(value) if value else 0.0
        elif key in _INT_OR_NONE:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be an integer or null")
            updates[key] = value
        elif key in _FLOAT_OR_NONE or key in ("malformed_ratio", "shutdown_close_delay_s"):
            if value is None and key in _FLOAT_OR_NONE:
                updates[key] = None
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            else:
                updates[key] = float(value)
        elif key in _BOOLS:
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
            updates[key] = value
        elif key == "skip_count":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("skip_count must be an integer")
            updates[key] = value
        elif key == "malformed_kinds":
            kinds = (
                [v.strip() for v in value.split(",") if v.strip()]
                if isinstance(value, str)
                else value
            )
            if not isinstance(kinds, list | tuple) or not all(isinstance(v, str) for v in kinds):
                raise ValueError("malformed_kinds must be a list of names")
            updates[key] = tuple(kinds)
        else:
            raise ValueError(f"unknown fault switch {key!r}; known: {sorted(_FIELDS)}")
    new = attrs.evolve(faults, **updates)
    new.validate()
    return new


class FaultCounters(Counter[str]):
    """How many times each fault was injected (`malformed.<kind>`, `drop`, `stall`, ...)."""


# ---- Malformed frames: each a (kind, builder) taking a realistic trade as the template ----


def _trade(symbol: str, trade_id: int, event_ms: int) -> dict[str, Any]:
    return {
        "e": "trade",
        "E": event_ms,
        "s": symbol,
        "t": trade_id,
        "p": "100.00000000",
        "q": "1.00000000",
        "T": event_ms,
        "m": False,
        "M": True,
    }


def malformed_payload(kind: str, symbol: str, trade_id: int, event_ms: int) -> bytes:
    """The `data` part of a malformed trade frame (or the whole broken text)."""
    t = _trade(symbol, trade_id, event_ms)
    if kind == "bad_json":
        return orjson.dumps(t)[:-7]
    if kind == "wrong_types":
        t["t"], t["p"], t["m"] = str(trade_id), 100.0, "false"
    elif kind == "missing_fields":
        del t["p"], t["t"]
    elif kind == "nan_price":
        t["p"] = "NaN"
    elif kind == "negative_qty":
        t["q"] = "-1.00000000"
    elif kind == "wrong_event_type":
        t["e"] = "aggTrade"
    elif kind == "absurd_timestamp":
        t["E"] = t["T"] = 99_999_999_999_999_999
    elif kind == "non_utf8":
        return orjson.dumps(t).replace(b'"s":"', b'"s":"\xff\xfe', 1)
    elif kind == "oversized":
        t["pad"] = ""
        base = len(orjson.dumps(t))
        t["pad"] = "x" * (OVERSIZED_BYTES - base)
    elif kind == "duplicate_keys":
        return orjson.dumps(t)[:-1] + b',"p":"999999.00000000"}'
    elif kind == "deep_nesting":
        return b"[" * DEEP_NESTING + b"]" * DEEP_NESTING
    return orjson.dumps(t)


class MalformedPicker:
    """Seeded per connection: whether to inject before a frame, and which kind."""

    def __init__(self, seed: int, conn_id: int) -> None:
        self._rng = random.Random(f"{seed}:malformed:{conn_id}")

    def pick(self, faults: Faults) -> str | None:
        if self._rng.random() >= faults.malformed_ratio:
            return None
        return self._rng.choice(faults.malformed_kinds)
