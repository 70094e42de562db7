"""Run `marketd run` as a subprocess for end-to-end tests, with JSON logs collected."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import trio


class Daemon:
    """`marketd run` in a child process; `events` holds its parsed JSON log lines."""

    def __init__(self, env: Mapping[str, str], args: list[str] | None = None) -> None:
        # Each daemon gets its own Kafka-outage spool unless the test shares one on purpose
        # (a spool left in the working directory would replay into the next test's topics).
        self._own_spool: str | None = None
        if "SPOOL_DIR" not in env:
            self._own_spool = tempfile.mkdtemp(prefix="marketd-spool-")
            env = {**env, "SPOOL_DIR": self._own_spool}
        self.env = {**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", **env}
        self.args = [sys.executable, "-m", "marketd.cli", "run", *(args or [])]
        self.proc: trio.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the daemon; it is killed when `nursery` exits, however the test ends."""
        self.proc = await trio.lowlevel.open_process(
            self.args,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=os.getcwd(),
        )
        nursery.start_soon(self._collect)
        nursery.start_soon(self._reap)

    async def _reap(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.kill()
            if self._own_spool is not None:
                shutil.rmtree(self._own_spool, ignore_errors=True)

    async def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        buf = b""
        async for chunk in self.proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.stderr_lines.append(text)
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(text))

    def find(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                found = self.find(event)
                if found:
                    return found[-1]
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"daemon exited before {event}: {self.tail()}")
                await trio.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.stderr_lines[-n:])
