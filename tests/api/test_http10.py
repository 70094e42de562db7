"""The API closes connections it is asked to close, and idle ones after the keep-alive timeout.

Raw sockets against the real API component (Hypercorn-trio + Quart-Trio, a real redis-server): a
client that sends HTTP/1.0 or `Connection: close`, or that stays idle, must see the server close
the socket (recv returns b""), and the server must release the file descriptor.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from marketd.api.server import KEEP_ALIVE_S, run_api
from marketd.tickers.redis_server import RedisProcess, free_port
from tests.tickers.records import runtime

pytestmark = pytest.mark.redis

# (request line + headers, expected status): every kind of answer the API gives.
ANSWERS = [
    ("GET /healthz", 200),
    ("GET /api/v1/ticker/B", 400),  # a malformed symbol, answered by the app
    ("GET /no/such/path", 404),
    ("POST /healthz", 405),
    ("GET /api/v1/ticker/health", 503),  # an empty Redis: every tracked ticker is missing
]


@asynccontextmanager
async def api(redis_server: RedisProcess) -> AsyncIterator[int]:
    port = free_port()
    rt = runtime(redis_url=redis_server.url, env={"API_PORT": str(port)})
    async with trio.open_nursery() as nursery:
        await nursery.start(run_api, rt)
        yield port
        rt.draining.set()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes its side (recv returns b"")."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_until_closed(stream)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(("request_line", "status"), ANSWERS)
async def test_http10_request_is_answered_and_closed(
    redis_server: RedisProcess, request_line: str, status: int
) -> None:
    with trio.fail_after(15):
        async with api(redis_server) as port:
            response = await exchange(port, f"{request_line} HTTP/1.0\r\n\r\n".encode())
            assert status_of(response) == status


@pytest.mark.parametrize(("request_line", "status"), ANSWERS)
async def test_connection_close_request_is_answered_and_closed(
    redis_server: RedisProcess, request_line: str, status: int
) -> None:
    request = f"{request_line} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    with trio.fail_after(15):
        async with api(redis_server) as port:
            response = await exchange(port, request)
            assert status_of(response) == status
            assert b"\r\nconnection: close\r\n" in response.lower()


async def test_unparseable_request_gets_400_and_is_closed(redis_server: RedisProcess) -> None:
    with trio.fail_after(15):
        async with api(redis_server) as port:
            response = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
            assert status_of(response) == 400


async def test_idle_keep_alive_connections_are_closed_after_the_timeout(
    redis_server: RedisProcess,
) -> None:
    """One connection idle after a keep-alive answer, one that never sent a byte."""
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with trio.fail_after(KEEP_ALIVE_S + 15):
        async with api(redis_server) as port:
            after_answer = await trio.open_tcp_stream("127.0.0.1", port)
            never_spoke = await trio.open_tcp_stream("127.0.0.1", port)
            async with after_answer, never_spoke:
                await after_answer.send_all(request)
                t0 = trio.current_time()
                response = await read_until_closed(after_answer)
                # The answer came at once; the close only after the keep-alive timeout.
                assert status_of(response) == 200 and response.count(b"HTTP/1.1") == 1
                assert trio.current_time() - t0 >= KEEP_ALIVE_S * 0.9
                assert await read_until_closed(never_spoke) == b""


async def test_file_descriptors_are_released(redis_server: RedisProcess) -> None:
    """200 one-shot clients of each kind: the process ends near its baseline fd count."""
    with trio.fail_after(60):
        async with api(redis_server) as port:
            await exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")  # warm up (Redis pool, ...)
            baseline = open_fds()

            async def client(request: bytes) -> None:
                await exchange(port, request)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    request_line, _ = ANSWERS[i % len(ANSWERS)]
                    version = "HTTP/1.0" if i % 2 else "HTTP/1.1\r\nConnection: close"
                    nursery.start_soon(client, f"{request_line} {version}\r\n\r\n".encode())
            # Every client saw the server's EOF; the server closes its socket right after
            # sending it, so the count comes back promptly (the guard bounds the wait).
            while open_fds() > baseline + 5:
                await trio.sleep(0.01)
