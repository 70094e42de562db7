"""HTTP/1.1 on the shared port: REST, admin endpoints, and the WebSocket upgrade.

Receives accepted TCP streams; parses requests with h11 and routes by path: `/api/...` to the
REST API, `/fake/...` to the admin API, and upgrade requests on `/stream`, `/ws`, `/ws/<names>`
to a `WsConnection`, which then owns the socket. Keep-alive is honoured; protocol errors get a
400 and the connection is closed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

import h11
import orjson
import trio

from marketd.logs import get_logger
from marketd.testing.fake_exchange.rest import Response
from marketd.testing.fake_exchange.state import ExchangeState
from marketd.testing.fake_exchange.streams import MAX_STREAMS, BadStream, parse, parse_target
from marketd.testing.fake_exchange.ws import WsConnection

log = get_logger(__name__)

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
MAX_BODY = 1 << 20

Router = Callable[[str, str, Mapping[str, str], Mapping[str, str], bytes], Awaitable[Response]]


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())  # RFC 6455 requires SHA-1 here


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> h11.Event | type:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)  # b"" marks EOF


async def _send_response(stream: trio.SocketStream, conn: h11.Connection, resp: Response) -> None:
    headers = [
        ("Content-Type", "application/json;charset=UTF-8"),
        ("Content-Length", str(len(resp.body))),
        *resp.headers,
    ]
    data = conn.send(h11.Response(status_code=resp.status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=resp.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def _error(status: int, msg: str) -> Response:
    return Response(status, orjson.dumps({"code": -1, "msg": msg}))


async def serve_http(
    stream: trio.SocketStream, state: ExchangeState, router: Router, conn_ids: Callable[[], int]
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    while True:
        try:
            event = await _next_event(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send_response(stream, conn, _error(400, f"bad request: {exc}"))
            return
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        target = event.target.decode("latin-1")
        if headers.get("upgrade", "").lower() == "websocket":
            await _upgrade(stream, conn, event, headers, target, state, conn_ids())
            return
        body = b""
        while True:
            part = await _next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY:
                    await _send_response(stream, conn, _error(413, "body too large"))
                    return
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return
        url = urlsplit(target)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        resp = await router(event.method.decode(), url.path, params, headers, body)
        await _send_response(stream, conn, resp)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _upgrade(
    stream: trio.SocketStream,
    conn: h11.Connection,
    request: h11.Request,
    headers: Mapping[str, str],
    target: str,
    state: ExchangeState,
    conn_id: int,
) -> None:
    key = headers.get("sec-websocket-key", "")
    if request.method != b"GET" or not key or headers.get("sec-websocket-version") != "13":
        await _send_response(stream, conn, _error(400, "bad WebSocket handshake"))
        return
    try:
        tgt = parse_target(target)
        subs = [parse(name) for name in tgt.streams]
    except BadStream as exc:
        await _send_response(stream, conn, _error(400, f"Invalid request: invalid stream {exc}"))
        return
    if len(subs) > MAX_STREAMS:
        await _send_response(stream, conn, _error(400, "Too many subscriptions"))
        return
    reply = conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", _accept_key(key.encode()).decode()),
            ],
        )
    )
    await stream.send_all(reply or b"")
    trailing, _closed = conn.trailing_data
    log.debug("ws.open", conn=conn_id, target=target, streams=len(subs))
    await WsConnection(state, stream, bytes(trailing), tgt, subs, conn_id).run()
