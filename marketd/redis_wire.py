"""RESP on a trio socket: command encoding and one pipelined Redis connection.

Takes commands already encoded as RESP bytes, sends them in one write and returns their replies
(parsed by hiredis; an error reply is returned as `hiredis.ReplyError`, not raised). Shared by the
API's batched reads (api/reader.py) and the book writer (books/store.py). Why not redis-py: its
sync client needs a worker thread per call and packs commands in Python, and redis.asyncio does
not run under trio (docs/performance.md §5, §8). Plain TCP only: TLS and unix-socket stores keep
redis-py. Any failure, timeout or cancellation closes the connection (a half-read connection is
never reused); the next round trip reconnects.
"""

from __future__ import annotations

from typing import Any

import hiredis
import trio

from marketd.errors import StoreUnavailable
from marketd.tickers.store import TcpAddress


def bulk(raw: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def command(*parts: str | bytes | int) -> bytes:
    """One RESP command (an array of bulk strings); str as UTF-8, int as decimal text."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            raw = part.encode()
        elif isinstance(part, int):
            raw = b"%d" % part
        else:
            raw = part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RespConnection:
    """One trio TCP connection to Redis, (re)connected on demand. One task at a time.

    Setup on connect: AUTH, SELECT, CLIENT SETNAME. Each round trip is bounded by the
    address's timeout; every failure becomes StoreUnavailable.
    """

    def __init__(self, address: TcpAddress, client_name: str) -> None:
        self.address = address
        self.client_name = client_name
        self._stream: trio.SocketStream | None = None
        self._reader = hiredis.Reader()

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def roundtrip(self, payload: bytes, replies: int) -> list[Any]:
        """Send `payload` (`replies` commands) and return their replies, in order."""
        try:
            with trio.fail_after(self.address.timeout_s):
                if self._stream is None:
                    await self._connect()
                return await self._exchange(payload, replies)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self.close()
            raise StoreUnavailable(f"redis: {exc}") from exc
        except trio.TooSlowError as exc:
            await self.close()
            raise StoreUnavailable(f"redis did not answer in {self.address.timeout_s:g}s") from exc
        except hiredis.ProtocolError as exc:
            await self.close()
            raise StoreUnavailable(f"redis: unreadable reply: {exc}") from exc
        except BaseException:
            # StoreUnavailable from the setup, or a cancellation mid-exchange: the replies still
            # due would be read as the next command's.
            await self.close()
            raise

    async def _connect(self) -> None:
        a = self.address
        self._stream = await trio.open_tcp_stream(a.host, a.port)
        self._reader = hiredis.Reader()
        setup: list[bytes] = []
        if a.password is not None:
            args = (a.username, a.password) if a.username else (a.password,)
            setup.append(command("AUTH", *args))
        if a.db:
            setup.append(command("SELECT", a.db))
        setup.append(command("CLIENT", "SETNAME", self.client_name))
        for reply in await self._exchange(b"".join(setup), len(setup)):
            if isinstance(reply, hiredis.ReplyError):
                raise StoreUnavailable(f"redis refused the connection setup: {reply}")

    async def _exchange(self, payload: bytes, replies: int) -> list[Any]:
        assert self._stream is not None
        await self._stream.send_all(payload)
        out: list[Any] = []
        while len(out) < replies:
            reply = self._reader.gets()
            if reply is False:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise StoreUnavailable("redis closed the connection")
                self._reader.feed(data)
                continue
            out.append(reply)
        return out

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
