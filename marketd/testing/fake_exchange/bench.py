"""Measure the fake exchange itself: server CPU per frame at `--rate max`, and E-to-receipt at
a paced rate. The server runs as its own process (`marketd fake-exchange`); the client here
only drains bytes (max) or parses E (paced), so the figures are the server's.

    .venv/bin/python -m marketd.testing.fake_exchange.bench [--seconds 5] [--paced 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import trio
import trio_websocket

SYMBOLS = "btcusdt,ethusdt,bnbusdt,solusdt,xrpusdt,adausdt,dogeusdt,avaxusdt,dotusdt,linkusdt"


def _cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(rate: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketd.cli", "fake-exchange", "--port", "0", "--rate", rate,
         "--symbols", SYMBOLS, "--seed", "7"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    m = re.search(r"ws=ws://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("fake exchange did not start")
    return proc, int(m.group(1))


def _frames(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fake/stats") as r:
        return int(json.load(r)["ledger"]["frames_total"])


async def _drain(port: int, seconds: float) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    path = "/stream?streams=" + "/".join(f"{s}@trade" for s in SYMBOLS.split(","))
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    total = 0
    with trio.move_on_after(seconds):
        while True:
            total += len(await stream.receive_some(1 << 20))
    await stream.aclose()
    return total


def bench_max(seconds: float) -> None:
    proc, port = _start("max")
    try:
        trio.run(_drain, port, 1.0)  # warm-up
        f0, c0, t0 = _frames(port), _cpu_s(proc.pid), time.monotonic()
        nbytes = trio.run(_drain, port, seconds)
        f1, c1, t1 = _frames(port), _cpu_s(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(10)
    frames = f1 - f0
    print(
        f"rate=max: {frames / (t1 - t0):,.0f} frames/s, {nbytes / (t1 - t0) / 1e6:.1f} MB/s, "
        f"server CPU {(c1 - c0) / (t1 - t0):.0%} of a core, "
        f"{(c1 - c0) / frames * 1e6:.2f} us/frame server CPU"
    )


async def _latency(port: int, seconds: float) -> list[float]:
    url = f"ws://127.0.0.1:{port}/stream?streams=" + "/".join(
        f"{s}@trade" for s in SYMBOLS.split(",")
    )
    lags: list[float] = []
    async with trio_websocket.open_websocket_url(url) as ws:
        with trio.move_on_after(seconds):
            while True:
                msg = await ws.get_message()
                now_ms = time.time() * 1000
                lags.append(now_ms - json.loads(msg)["data"]["E"])
    return lags


def bench_paced(rate: int, seconds: float) -> None:
    proc, port = _start(str(rate))
    try:
        c0, t0 = _cpu_s(proc.pid), time.monotonic()
        lags = sorted(trio.run(_latency, port, seconds))
        c1, t1 = _cpu_s(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(10)
    n = len(lags)
    print(
        f"rate={rate}: received {n / (t1 - t0):,.0f} msgs/s (trio-websocket client), "
        f"receipt - E p50 {lags[n // 2]:.2f} ms p99 {lags[int(n * 0.99)]:.2f} ms, "
        f"server CPU {(c1 - c0) / (t1 - t0):.0%} of a core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--paced", type=int, default=10_000)
    args = parser.parse_args()
    bench_max(args.seconds)
    bench_paced(args.paced, args.seconds)


if __name__ == "__main__":
    main()
