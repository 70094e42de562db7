"""The live control protocol on a stream connection (docs/binance.md §3).

Receives one client text message and the connection's current subscriptions and `combined`
property; returns the reply (bytes) and what to change. Pure: the WebSocket task applies it.
Errors follow Binance's table: flat `{"code","msg","id"}` or, with `nested`, the 3P-observed
`{"error":{"code","msg"},"id"}` shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from marketd.testing.fake_exchange.streams import MAX_STREAMS, BadStream, Sub, parse

METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_ID_STR = re.compile(r"[A-Za-z0-9]{1,36}")
_ABSENT = object()


@attrs.frozen
class Outcome:
    reply: bytes
    subscribe: tuple[Sub, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    combined: bool | None = None
    ok: bool = True


def _error(code: int, msg: str, req_id: Any, nested: bool) -> Outcome:
    body: dict[str, Any] = (
        {"error": {"code": code, "msg": msg}, "id": req_id}
        if nested
        else {"code": code, "msg": msg, "id": req_id}
    )
    return Outcome(orjson.dumps(body), ok=False)


def _valid_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and bool(_ID_STR.fullmatch(value))


def handle(
    text: str, subscribed: Sequence[str], combined: bool, *, nested: bool = False
) -> Outcome:
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _error(3, f"Invalid JSON: {exc.msg} at line 1 column {exc.pos + 1}", None, nested)
    col = len(text)
    if not isinstance(msg, dict):
        return _error(
            2, f"Invalid request: expected an object at line 1 column {col}", None, nested
        )
    req_id = msg.get("id", _ABSENT)
    if req_id is _ABSENT or not _valid_id(req_id):
        return _error(2, "Invalid request: request ID must be an unsigned integer", None, nested)
    method = msg.get("method")
    if method is None:
        return _error(
            2, f"Invalid request: missing field `method` at line 1 column {col}", req_id, nested
        )
    if method not in METHODS:
        variants = ", ".join(f"`{m}`" for m in METHODS)
        return _error(
            2,
            f"Invalid request: unknown variant `{method}`, expected one of {variants} "
            f"at line 1 column {col}",
            req_id,
            nested,
        )
    params = msg.get("params", [])
    if not isinstance(params, list):
        return _error(2, "Invalid request: params must be an array", req_id, nested)
    ok = orjson.dumps({"result": None, "id": req_id})

    if method == "LIST_SUBSCRIPTIONS":
        return Outcome(orjson.dumps({"result": list(subscribed), "id": req_id}))
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        if not all(isinstance(p, str) for p in params):
            return _error(2, "Invalid request: stream names must be strings", req_id, nested)
        if method == "UNSUBSCRIBE":
            return Outcome(ok, unsubscribe=tuple(params))
        subs: list[Sub] = []
        for name in params:
            try:
                subs.append(parse(name))
            except BadStream:
                return _error(2, f"Invalid request: invalid stream {name}", req_id, nested)
        if len(set(subscribed) | {s.name for s in subs}) > MAX_STREAMS:
            return _error(4, "Too many subscriptions", req_id, nested)
        return Outcome(ok, subscribe=tuple(subs))
    # SET_PROPERTY / GET_PROPERTY: `combined` is the only property (docs/binance.md §3).
    want = 2 if method == "SET_PROPERTY" else 1
    if len(params) > want:
        return _error(2, "Invalid request: too many parameters", req_id, nested)
    if not params or not isinstance(params[0], str):
        return _error(2, "Invalid request: property name must be a string", req_id, nested)
    if params[0] != "combined":
        return _error(0, "Unknown property", req_id, nested)
    if method == "GET_PROPERTY":
        return Outcome(orjson.dumps({"result": combined, "id": req_id}))
    if len(params) < 2 or not isinstance(params[1], bool):
        return _error(1, "Invalid value type: expected Boolean", req_id, nested)
    return Outcome(ok, combined=params[1])
