"""`marketd fake-exchange` as a subprocess for end-to-end tests (its own process, like Binance)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import attrs


@attrs.frozen
class Exchange:
    ws_url: str
    http_url: str
    proc: subprocess.Popen[str]


@contextmanager
def fake_exchange(*args: str) -> Iterator[Exchange]:
    """Start the fake exchange on a free port with `args`; stop it on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketd.cli", "fake-exchange", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ws = re.search(r"ws=(\S+)", line)
        http = re.search(r"http=(\S+)", line)
        assert ws and http, f"fake exchange did not start: {line!r}"
        yield Exchange(ws.group(1), http.group(1), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
