"""A small Server-Sent Events client on a raw trio socket (tests and bench/stream.py).

Why not httpx: its streaming body is a chain of nested async generators that warn when a test
stops reading mid-stream, and each event costs several generator hops; 1,000 of these clients
in one bench process need to be cheap. HTTP/1.1, chunked or identity body, one request.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import trio


@attrs.define
class Event:
    event: str
    data: Any
    id: str | None
    received_ns: int = 0


class HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class SSEClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.status = 0
        self.headers: dict[str, str] = {}
        self.comments = 0
        self.closed = False
        self._raw = b""  # undecoded bytes from the socket
        self._chunked = False
        self._chunk_left = 0
        self._text = b""  # decoded body not yet split into events
        self._events: list[Event] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10.0,
    ) -> SSEClient:
        """Open the stream; raises HTTPError (with the JSON body) for a non-200 answer."""
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            client = cls(stream)
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Accept: text/event-stream\r\n{extra}\r\n"
            )
            await stream.send_all(request.encode("latin-1"))
            await client._read_head()
        if client.status != 200:
            body = await client._read_error_body()
            await client.aclose()
            raise HTTPError(client.status, body)
        return client

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            return False
        self._raw += data
        return True

    async def _read_head(self) -> None:
        while b"\r\n\r\n" not in self._raw:
            if not await self._fill():
                raise EOFError("connection closed before the response head")
        head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    async def _read_error_body(self) -> bytes:
        with trio.move_on_after(5):
            while not self.closed:
                self._decode()
                length = self.headers.get("content-length")
                if length is not None and len(self._text) >= int(length):
                    break
                if self._chunked and self._chunk_left == -1:
                    break
                await self._fill()
        self._decode()
        return self._text

    def _decode(self) -> None:
        """Move body bytes from _raw to _text (undoing chunked framing)."""
        if not self._chunked:
            self._text += self._raw
            self._raw = b""
            return
        while self._raw and self._chunk_left != -1:
            if self._chunk_left == 0:
                line, sep, rest = self._raw.partition(b"\r\n")
                if not sep:
                    return
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    self._chunk_left = -1  # last chunk
                    return
                self._raw = rest
                self._chunk_left = size + 2  # data + CRLF
            take = self._raw[: self._chunk_left]
            self._raw = self._raw[len(take) :]
            self._chunk_left -= len(take)
            if self._chunk_left == 0:
                self._text += take[:-2]
            elif self._chunk_left == 1:
                self._text += take[:-1]
            else:
                self._text += take

    def _split(self) -> None:
        now = time.time_ns()
        while b"\n\n" in self._text:
            block, _, self._text = self._text.partition(b"\n\n")
            event, data, event_id = "message", [], None
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
            if data:
                self._events.append(Event(event, json.loads("\n".join(data)), event_id, now))

    async def next(self, timeout: float = 10.0) -> Event:
        """The next event (comments are counted, not returned); EOFError when the server ends."""
        with trio.fail_after(timeout):
            while not self._events:
                if self.closed or self._chunk_left == -1:
                    raise EOFError("stream ended")
                if not await self._fill():
                    raise EOFError("stream ended")
                self._decode()
                self._split()
        return self._events.pop(0)

    async def wait_closed(self, timeout: float = 10.0) -> None:
        """Read until the server closes the stream."""
        with trio.fail_after(timeout):
            while not self.closed and self._chunk_left != -1:
                if await self._fill():
                    self._decode()
                    self._split()

    async def aclose(self) -> None:
        self.closed = True
        await self.stream.aclose()
