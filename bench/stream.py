"""Push API benchmark: SSE fan-out from one API process (docs/streaming.md, BENCHMARKS.md).

One `marketd run --components api` process on a private redis-server; this process writes the
tickers (the ticker consumer's own TickerStore.write: hash + tickers:updates entry) and runs the
SSE clients (tests/support/sse.py, raw trio sockets).

1. fan-out: --clients (1,000) clients follow all 15 tickers; each symbol is written once per
   second (Binance's rate), staggered over the second. Latency = client receipt - the moment
   just before the write (same clock, this process). Reports p50/p99/max, events per client
   (min = starved?), dropped clients, the server's RSS and CPU. While the streams run, wrk
   (-c32) polls GET /api/v1/ticker/BTCUSDT: the polling figures under stream load.
2. max delivery: --max-clients (100) clients without conflation (?conflate=0) while the writer
   writes as fast as it can (pipelines of 15 symbols): events/s delivered to all clients.

The clients share the 2 cores with the server, Redis and the writer: receipt times include
this process's scheduling delay, so the latency figures are an upper bound.

    .venv/bin/python bench/stream.py                    # 1,000 clients x 20 s, then 100 x 10 s
    .venv/bin/python bench/stream.py --clients 200 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marketd.testing.samples import ticker_record  # noqa: E402
from marketd.tickers.redis_server import RedisProcess, free_port  # noqa: E402
from marketd.tickers.store import TickerStore  # noqa: E402
from tests.support.sse import SSEClient  # noqa: E402

SYMBOLS = [
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "DOTUSDT", "MATICUSDT", "LINKUSDT", "LTCUSDT", "UNIUSDT", "ATOMUSDT", "SHIBUSDT",
]  # fmt: skip


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds user+system) of a process, from /proc."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kib / 1024, (int(fields[11]) + int(fields[12])) / ticks


def start_api(
    args: argparse.Namespace, redis_url: str, tmp: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "TICKER_SYMBOLS": ",".join(SYMBOLS),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # unused by the api component
    }
    proc = subprocess.Popen(
        [*shlex.split(args.marketd), "run", "--components", "api"], env=env, cwd=tmp
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"API exited with {proc.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc, port
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit("API did not answer") from None
            time.sleep(0.1)


class Run:
    def __init__(self) -> None:
        self.written_ns: dict[tuple[str, int], int] = {}
        self.latencies_ms: list[float] = []
        self.per_client: list[int] = []
        self.ended: list[str] = []
        self.events = 0


async def connect_all(
    port: int, n: int, path: str, nursery: trio.Nursery, run: Run, measure: bool
) -> None:
    """Open n streams (50 at a time), each read by its own task until cancelled."""
    ready = 0

    async def one(i: int, task_status: trio.TaskStatus[None]) -> None:
        nonlocal ready
        client = await SSEClient.connect("127.0.0.1", port, path, timeout=60)
        first = await client.next(timeout=60)
        while first.event == "status":  # Redis slow under load: the snapshot follows
            first = await client.next(timeout=60)
        assert first.event == "snapshot", first
        ready += 1
        task_status.started()
        try:
            while True:
                event = await client.next(timeout=30)
                run.per_client[i] += 1
                run.events += 1
                if measure and event.event == "ticker":
                    key = (event.data["symbol"], event.data["event_time"])
                    sent = run.written_ns.get(key)
                    if sent is not None:
                        run.latencies_ms.append((event.received_ns - sent) / 1e6)
        except (EOFError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            run.ended.append(type(exc).__name__)
        finally:
            await client.aclose()

    run.per_client = [0] * n
    for start in range(0, n, 50):
        async with trio.open_nursery() as batch:
            for i in range(start, min(n, start + 50)):
                batch.start_soon(nursery.start, one, i)


async def write_paced(store: TickerStore, run: Run, seconds: float) -> int:
    """Each symbol once per second, staggered: one write every 1/15 s."""
    limiter = trio.CapacityLimiter(1)
    start = trio.current_time()
    n = 0
    base_ms = time.time_ns() // 1_000_000
    while trio.current_time() - start < seconds:
        await trio.sleep_until(start + n / len(SYMBOLS))
        symbol = SYMBOLS[n % len(SYMBOLS)]
        event_time = base_ms + n  # unique and increasing per symbol
        run.written_ns[(symbol, event_time)] = time.time_ns()
        await trio.to_thread.run_sync(
            store.write, [ticker_record(symbol, event_time)], event_time, 3600, limiter=limiter
        )
        n += 1
    return n


async def write_flat_out(store: TickerStore, seconds: float) -> int:
    start = trio.current_time()
    n = 0
    base_ms = time.time_ns() // 1_000_000
    while trio.current_time() - start < seconds:
        records = [ticker_record(s, base_ms + n) for s in SYMBOLS]
        await trio.to_thread.run_sync(store.write, records, base_ms, 3600)
        n += 1
    return n * len(SYMBOLS)


def wrk(url: str, seconds: int) -> str:
    if shutil.which("wrk") is None:
        return "wrk not installed"
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (
        f"{float(rps.group(1)) if rps else 0:,.0f} req/s, p50 {p50.group(1) if p50 else '?'}, "
        f"p99 {p99.group(1) if p99 else '?'}" + (f", {non2xx.group(1)} non-2xx" if non2xx else "")
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def fanout(
    args: argparse.Namespace, api: subprocess.Popen[bytes], port: int, url: str
) -> None:
    run = Run()
    store = TickerStore(url)
    try:
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            await connect_all(port, args.clients, "/api/v1/stream/tickers", nursery, run, True)
            connect_s = time.monotonic() - t0
            rss0, cpu0 = proc_stats(api.pid)
            print(
                f"fan-out: {args.clients} clients connected in {connect_s:.1f} s, "
                f"RSS {rss0:.0f} MiB"
            )
            polled: list[str] = []
            poll_s = max(1, int(args.seconds / 2))

            async def poll() -> None:
                await trio.sleep(args.seconds / 4)
                polled.append(
                    await trio.to_thread.run_sync(
                        wrk, f"http://127.0.0.1:{port}/api/v1/ticker/BTCUSDT", poll_s
                    )
                )

            nursery.start_soon(poll)
            w0 = time.monotonic()
            writes = await write_paced(store, run, args.seconds)
            await trio.sleep(1.0)  # the last events arrive
            wall = time.monotonic() - w0
            rss1, cpu1 = proc_stats(api.pid)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    expected = writes  # every client follows every symbol: one event per write
    lat = run.latencies_ms
    starved = sum(1 for c in run.per_client if c < 0.5 * expected)
    print(
        f"  {writes} writes in {args.seconds:g} s ({writes / args.seconds:.1f}/s), "
        f"{run.events:,} events received ({run.events / wall:,.0f}/s)"
    )
    print(
        f"  Redis write -> client receipt: p50 {pct(lat, 0.5):.1f} ms, "
        f"p99 {pct(lat, 0.99):.1f} ms, "
        f"max {max(lat, default=float('nan')):.1f} ms ({len(lat):,} samples)"
    )
    print(
        f"  events per client: min {min(run.per_client)}, median "
        f"{statistics.median(run.per_client):.0f}, max {max(run.per_client)} "
        f"(writes {expected}); clients under half: {starved}; ended early: {len(run.ended)}"
    )
    print(f"  API process: RSS {rss1:.0f} MiB, CPU {100 * (cpu1 - cpu0) / wall:.0f}% of one core")
    figures = polled[0] if polled else "-"
    print(f"  polling while streaming (wrk -c32, {poll_s} s): {figures}")


async def max_delivery(
    args: argparse.Namespace, api: subprocess.Popen[bytes], port: int, url: str
) -> None:
    run = Run()
    store = TickerStore(url)
    try:
        async with trio.open_nursery() as nursery:
            await connect_all(
                port, args.max_clients, "/api/v1/stream/tickers?conflate=0", nursery, run, False
            )
            run.events = 0
            run.per_client = [0] * args.max_clients
            _, cpu0 = proc_stats(api.pid)
            t0 = time.monotonic()
            writes = await write_flat_out(store, args.max_seconds)
            await trio.sleep(1.0)
            wall = time.monotonic() - t0
            _, cpu1 = proc_stats(api.pid)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    print(
        f"max delivery: {args.max_clients} clients, no conflation: {writes:,} updates written "
        f"({writes / args.max_seconds:,.0f}/s), {run.events:,} events delivered = "
        f"{run.events / wall:,.0f} events/s; per client min {min(run.per_client):,}; "
        f"ended early: {len(run.ended)}; API CPU {100 * (cpu1 - cpu0) / wall:.0f}%"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-clients", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--marketd", default=f"{sys.executable} -m marketd.cli")
    args = p.parse_args()
    print(f"stream bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, RedisProcess() as redis_server:
        store = TickerStore(redis_server.url)
        now = time.time_ns() // 1_000_000
        store.write([ticker_record(s, now) for s in SYMBOLS], now, 3600)
        store.close()
        api, port = start_api(args, redis_server.url, Path(tmp))
        try:
            trio.run(fanout, args, api, port, redis_server.url)
            trio.run(max_delivery, args, api, port, redis_server.url)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            for line in metrics.splitlines():
                if line.startswith(("marketd_stream_dropped", "marketd_stream_conflated_total")):
                    print(" ", line)
        finally:
            api.terminate()
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                api.kill()


if __name__ == "__main__":
    main()
