"""Small client helpers for the fake-exchange tests: trio-websocket readers and a raw client.

The raw client (socket + wsproto) exists for what trio-websocket hides: whether and when the
server pings, and what happens when a client never answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Request,
)

from marketd.testing.fake_exchange import FakeExchange


def ws_url(ex: FakeExchange, path: str) -> str:
    return f"ws://127.0.0.1:{ex.port}{path}"


def http_url(ex: FakeExchange) -> str:
    return f"http://127.0.0.1:{ex.port}"


async def collect(
    ws: trio_websocket.WebSocketConnection,
    until: Callable[[list[Any]], bool],
    timeout: float = 5.0,
) -> list[Any]:
    """Decoded messages until `until(messages)` holds (fails the test after `timeout`)."""
    out: list[Any] = []
    with trio.fail_after(timeout):
        while not until(out):
            out.append(json.loads(await ws.get_message()))
    return out


def data_of(messages: list[Any], stream: str) -> list[Any]:
    return [m["data"] for m in messages if isinstance(m, dict) and m.get("stream") == stream]


class RawClient:
    """A WebSocket client that answers pings only when told to."""

    def __init__(self, stream: trio.SocketStream, conn: WSConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.pings: list[bytes] = []
        self.messages: list[str | bytes] = []
        self.closed: CloseConnection | None = None
        self.eof = False
        self.answer_pings = True

    @classmethod
    async def connect(cls, port: int, target: str) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(host="127.0.0.1", target=target)))
        client = cls(stream, conn)
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                assert data, "server closed during the handshake"
                conn.receive_data(data)
                events = list(conn.events())
                if any(isinstance(e, AcceptConnection) for e in events):
                    await client._handle(events)
                    return client

    async def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Ping):
                self.pings.append(bytes(event.payload))
                if self.answer_pings:
                    await self.stream.send_all(self.conn.send(event.response()))
            elif isinstance(event, Message):
                self.messages.append(event.data)
            elif isinstance(event, CloseConnection):
                self.closed = event

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not until():
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    self.eof = True
                    return
                self.conn.receive_data(data)
                await self._handle(list(self.conn.events()))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


def masked_text_frame(text: str) -> bytes:
    """A client text frame (clients must mask, RFC 6455 §5.3)."""
    payload = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + body
