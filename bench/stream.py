"""Push API benchmark: SSE fan-out from one API process (docs/streaming.md, BENCHMARKS.md).

One `marketd run --components api` process on a private redis-server; this process writes the
tickers (the ticker consumer's own TickerStore.write: hash + tickers:updates entry) and runs the
SSE clients (tests/support/sse.py, raw trio sockets).

1. fan-out: --clients (1,000) clients follow all 15 tickers; each symbol is written once per
   second (Binance's rate), staggered over the second. Latency = client receipt - the moment
   just before the write (same clock, this process). Reports p50/p99/max, events per client
   (min = starved?), dropped clients, the server's RSS and CPU. Then the same again while wrk
   (-c32) polls GET /api/v1/ticker/BTCUSDT for half of the window: the polling figures under
   stream load (and the stream's latency while polled).
2. max delivery: --max-clients (100) clients without conflation (?conflate=0) while the writer
   writes as fast as it can (pipelines of 15 symbols): events/s delivered to all clients.

The clients share the 2 cores with the server, Redis and the writer: receipt times include
this process's scheduling delay, so the latency figures are an upper bound.

    .venv/bin/python bench/stream.py                    # 1,000 clients x 20 s, then 100 x 10 s
    .venv/bin/python bench/stream.py --clients 200 --seconds 10
"""

from __future__ import annotations

import argparse
import json
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
from _common import SYMBOLS, pct, proc_stats  # first: puts the repository on sys.path

from marketd.testing.samples import ticker_record
from marketd.tickers.redis_server import RedisProcess, free_port
from marketd.tickers.store import TickerStore
from tests.support.sse import SSEClient


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
    deadline = time.monotonic() + 90  # a loaded machine starts Python slowly
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


SAMPLE_EVERY = 10  # every 10th client parses events and measures latency; the others count
TICKER_MARK = b"event: ticker\n"


async def count_only(client: SSEClient, i: int, run: Run) -> None:
    """Count ticker events in the raw bytes: a client that reads at full speed for almost no
    CPU, so 1,000 of them measure the server rather than this process. Hypercorn writes each
    send as one chunk, so an event's text is never cut by chunk framing; a TCP read may cut it,
    hence the carried tail."""
    tail = client._raw + client._text
    before = tail.count(TICKER_MARK)
    with trio.fail_after(30) as deadline:
        while True:
            data = await client.stream.receive_some(65536)
            if not data:
                raise EOFError("stream ended")
            deadline.deadline = trio.current_time() + 30
            joined = tail + data
            found = joined.count(TICKER_MARK) - before
            run.per_client[i] += found
            run.events += found
            tail = joined[-(len(TICKER_MARK) - 1) :]
            before = tail.count(TICKER_MARK)


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
            if not measure or i % SAMPLE_EVERY:
                await count_only(client, i, run)
                return
            while True:
                event = await client.next(timeout=30)
                run.per_client[i] += 1
                run.events += 1
                if measure and event.event == "ticker":
                    # updated_at: the writer's wall clock (ms) just before the write.
                    run.latencies_ms.append(event.received_ns / 1e6 - event.data["updated_at"])
        except (EOFError, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
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
        written_ms = time.time_ns() // 1_000_000  # updated_at: clients measure from it
        run.written_ns[(symbol, event_time)] = time.time_ns()
        await trio.to_thread.run_sync(
            store.write, [ticker_record(symbol, event_time)], written_ms, 3600, limiter=limiter
        )
        n += 1
    return n


async def write_flat_out(store: TickerStore, seconds: float) -> int:
    start = trio.current_time()
    n = 0
    base_ms = time.time_ns() // 1_000_000
    while trio.current_time() - start < seconds:
        records = [ticker_record(s, base_ms + n) for s in SYMBOLS]
        await trio.to_thread.run_sync(store.write, records, time.time_ns() // 1_000_000, 3600)
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


async def worker(port: int, n: int, path: str, measure: bool) -> None:
    """A client process: n streams; prints "ready", reads until stdin closes, prints a summary."""
    run = Run()
    async with trio.open_nursery() as nursery:
        await connect_all(port, n, path, nursery, run, measure)
        run.events = 0
        run.per_client = [0] * n
        run.latencies_ms.clear()
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()
    print(
        json.dumps(
            {
                "latencies_ms": [round(x, 2) for x in run.latencies_ms],
                "per_client": run.per_client,
                "ended": run.ended,
                "events": run.events,
            }
        ),
        flush=True,
    )


class Workers:
    """`--client-procs` client processes sharing `n` streams between them."""

    def __init__(self, args: argparse.Namespace, port: int, n: int, path: str, measure: bool):
        self.procs: list[subprocess.Popen[str]] = []
        k = max(1, min(args.client_procs, n))
        for i in range(k):
            share = n // k + (1 if i < n % k else 0)
            cmd = [sys.executable, __file__, "--worker", "--port", str(port), "--n", str(share)]
            cmd += ["--path", path] + (["--measure"] if measure else [])
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def wait_ready(self) -> None:
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"client process failed: {line!r}")

    def finish(self) -> Run:
        run = Run()
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
        for proc in self.procs:
            assert proc.stdout is not None
            summary = json.loads(proc.stdout.readline())
            proc.wait(30)
            run.latencies_ms += summary["latencies_ms"]
            run.per_client += summary["per_client"]
            run.ended += summary["ended"]
            run.events += summary["events"]
        return run


async def fanout(
    args: argparse.Namespace, api: subprocess.Popen[bytes], port: int, url: str, polling: bool
) -> None:
    """One fan-out window: the latency of every event to every client; with `polling`, wrk
    polls the ticker endpoint for the second half of it (the polling figures under stream load,
    and the stream's latency while polled)."""
    t0 = time.monotonic()
    workers = Workers(args, port, args.clients, "/api/v1/stream/tickers", True)
    await trio.to_thread.run_sync(workers.wait_ready)
    connect_s = time.monotonic() - t0
    rss0, cpu0 = proc_stats(api.pid)
    print(
        f"fan-out{' with polling' if polling else ''}: {args.clients} clients in "
        f"{len(workers.procs)} processes, connected in {connect_s:.1f} s, API RSS {rss0:.0f} MiB"
    )
    polled: list[str] = []
    poll_s = max(1, int(args.seconds / 2))
    store = TickerStore(url)
    writer = Run()
    try:
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                await trio.sleep(args.seconds / 4)
                polled.append(
                    await trio.to_thread.run_sync(
                        wrk, f"http://127.0.0.1:{port}/api/v1/ticker/BTCUSDT", poll_s
                    )
                )

            if polling:
                nursery.start_soon(poll)
            w0 = time.monotonic()
            writes = await write_paced(store, writer, args.seconds)
            await trio.sleep(1.0)  # the last events arrive
            wall = time.monotonic() - w0
            rss1, cpu1 = proc_stats(api.pid)
    finally:
        store.close()
    run = await trio.to_thread.run_sync(workers.finish)
    lat = run.latencies_ms
    starved = sum(1 for c in run.per_client if c < 0.5 * writes)
    print(
        f"  {writes} writes in {args.seconds:g} s ({writes / args.seconds:.1f}/s), "
        f"{run.events:,} events received ({run.events / wall:,.0f}/s)"
    )
    print(
        f"  Redis write -> client receipt: p50 {pct(lat, 0.5):.1f} ms, "
        f"p99 {pct(lat, 0.99):.1f} ms, max {max(lat, default=float('nan')):.1f} ms "
        f"({len(lat):,} samples, ms clock)"
    )
    print(
        f"  events per client: min {min(run.per_client)}, median "
        f"{statistics.median(run.per_client):.0f}, max {max(run.per_client)} "
        f"(writes {writes}); clients under half: {starved}; ended early: {len(run.ended)}"
    )
    print(f"  API process: RSS {rss1:.0f} MiB, CPU {100 * (cpu1 - cpu0) / wall:.0f}% of one core")
    if polling:
        figures = polled[0] if polled else "-"
        print(f"  polling while streaming (wrk -c32, {poll_s} s): {figures}")


async def max_delivery(
    args: argparse.Namespace, api: subprocess.Popen[bytes], port: int, url: str
) -> None:
    path = "/api/v1/stream/tickers?conflate=0"
    workers = Workers(args, port, args.max_clients, path, False)
    await trio.to_thread.run_sync(workers.wait_ready)
    store = TickerStore(url)
    try:
        _, cpu0 = proc_stats(api.pid)
        t0 = time.monotonic()
        writes = await write_flat_out(store, args.max_seconds)
        await trio.sleep(1.0)
        wall = time.monotonic() - t0
        _, cpu1 = proc_stats(api.pid)
    finally:
        store.close()
    run = await trio.to_thread.run_sync(workers.finish)
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
    p.add_argument("--client-procs", type=int, default=2, help="client processes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        trio.run(worker, args.port, args.n, args.path, args.measure)
        return
    print(f"stream bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, RedisProcess() as redis_server:
        store = TickerStore(redis_server.url)
        now = time.time_ns() // 1_000_000
        store.write([ticker_record(s, now) for s in SYMBOLS], now, 3600)
        store.close()
        api, port = start_api(args, redis_server.url, Path(tmp))
        try:
            trio.run(fanout, args, api, port, redis_server.url, False)
            trio.run(fanout, args, api, port, redis_server.url, True)
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
