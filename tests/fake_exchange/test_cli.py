"""`marketd fake-exchange` as a process: the start-up line, serving, and a clean SIGTERM exit."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import trio
import trio_websocket


async def test_cli_prints_urls_serves_and_stops_on_sigterm() -> None:
    # Popen only forks; every wait on the child below goes through a thread.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "marketd.cli", "fake-exchange", "--port", "0", "--rate", "100",
         "--symbols", "btcusdt,ethusdt", "--seed", "3", "--malformed-ratio", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        with trio.fail_after(20):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        m = re.fullmatch(
            r"fake-exchange listening ws=(ws://127\.0\.0\.1:(\d+)/stream) "
            r"http=(http://127\.0\.0\.1:\d+)\n",
            line,
        )
        assert m, line
        ws_url, http_url = m.group(1), m.group(3)
        async with httpx.AsyncClient(base_url=http_url) as client:
            assert (await client.get("/api/v3/ping")).json() == {}
        async with trio_websocket.open_websocket_url(ws_url + "?streams=btcusdt@trade") as ws:
            with trio.fail_after(10):
                assert '"e":"trade"' in await ws.get_message()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await trio.to_thread.run_sync(proc.wait)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
