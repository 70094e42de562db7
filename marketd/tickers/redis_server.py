"""A private redis-server child process: the `redis.url = "embedded"` default, and the tests' Redis.

Starts `redis-server` on loopback and a free port with no persistence, waits until it answers
PING, and stops it (SIGTERM, then SIGKILL) on exit. `RedisProcess` is synchronous so tests can
stop and restart it around fault injection; `embedded_redis` wraps it for the trio daemon.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from marketd.errors import MissingDependency
from marketd.logs import get_logger

log = get_logger(__name__)

INSTALL_HINT = "install it with: apt-get install redis-server (Debian/Ubuntu) or brew install redis"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """redis-server on 127.0.0.1:<port>, no RDB/AOF, stopped by stop()."""

    def __init__(self, port: int | None = None, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise MissingDependency(f"redis-server not found on PATH; {INSTALL_HINT}")
        self.binary = path
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="marketd-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise MissingDependency(f"redis-server exited at start: {err.strip()[:300]}")
            if self._ping():
                return self
            time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@asynccontextmanager
async def embedded_redis() -> AsyncIterator[str]:
    """Start a private redis-server for the daemon; yields its URL; stops it on exit."""
    server = RedisProcess()
    await trio.to_thread.run_sync(server.start)
    log.info(
        "redis.embedded_started",
        url=server.url,
        persistence="none",
        note="private redis-server child process; data is lost on exit",
    )
    try:
        yield server.url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
        log.info("redis.embedded_stopped", url=server.url)


__all__ = ["INSTALL_HINT", "RedisProcess", "embedded_redis", "free_port"]
