"""API benchmark: GET /api/v1/ticker/BTCUSDT and /api/v1/tickers, marketd vs baselines.

Servers, each in its own process:
* default: `marketd run --config marketd.toml` as users run it: every component (ingest, tickers,
  api) in one process with its embedded Kafka mock cluster and embedded redis-server, fed by
  `marketd fake-exchange` (all 15 tickers at 1/s plus --trade-rate trades/s), so tickers flow
  while it is measured: the configuration the targets are about;
* marketd: `marketd run --components api` (API only, Quart-Trio on Hypercorn-trio, batched Redis
  reader) on the private redis-server below (15 tickers written once);
* bare: a raw ASGI app on Hypercorn-trio returning pre-encoded bytes (the server's ceiling);
  measured while the default daemon ingests, like every server here (same machine load);
* fastapi: FastAPI on uvicorn (uvloop + httptools) with redis.asyncio, same JSON, for context.
  It runs from a throwaway venv (--fastapi-python, built by --make-fastapi-venv), never the
  project's.
Load: wrk -t1 -c32 -d{--seconds}s --latency (closed loop, 32 connections), then a paced client
at 200 req/s (open loop: latency counted from the scheduled send time, wrk 4 has no -R).
Medians over --reps runs, alternating servers within a rep. Everything shares 2 cores with wrk.

    .venv/bin/python bench/api.py --make-fastapi-venv     # once: /tmp/marketd-bench-fastapi
    .venv/bin/python bench/api.py                         # 3 reps x 10 s
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
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from _common import ROOT, SYMBOLS  # first: puts the repository on sys.path

from marketd.testing.samples import ticker_record
from marketd.tickers.redis_server import RedisProcess, free_port
from marketd.tickers.store import TickerStore

FASTAPI_VENV = Path("/tmp/marketd-bench-fastapi")

BARE_APP = """
import json
BODY = json.dumps({"symbol": "BTCUSDT", "last_price": "100.5", "price_change": "-1.2",
    "price_change_pct": "-0.5", "open": "101.2", "high": "110.0", "low": "90.0",
    "volume": "12345.6", "quote_volume": "1456789012.3", "trades_count": 18051,
    "event_time": 1, "updated_at": 1, "age_ms": 1, "complete": True}).encode()

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})
"""

FASTAPI_APP = """
import os, time
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Response

PRICES = ("last_price", "price_change", "price_change_pct", "open", "high", "low", "volume",
          "quote_volume")
SYMBOLS = os.environ["BENCH_SYMBOLS"].split(",")
app = FastAPI()
r = aioredis.from_url(os.environ["BENCH_REDIS"], decode_responses=True)

def view(symbol, h):
    out = {"symbol": symbol, **{k: h.get(k) for k in PRICES}}
    for k in ("trades_count", "event_time", "updated_at"):
        out[k] = int(h[k]) if k in h else None
    out["age_ms"] = int(time.time() * 1000) - out["event_time"]
    out["complete"] = all(v is not None for v in out.values())
    return out

@app.get("/api/v1/ticker/{symbol}")
async def ticker(symbol: str):
    symbol = symbol.upper()
    h = await r.hgetall(f"ticker:{symbol}")
    if not h:
        raise HTTPException(404)
    return Response(orjson.dumps(view(symbol, h)), media_type="application/json")

@app.get("/api/v1/tickers")
async def tickers():
    async with r.pipeline(transaction=False) as p:
        for s in SYMBOLS:
            p.hgetall(f"ticker:{s}")
        rows = await p.execute()
    out = [view(s, h) for s, h in zip(SYMBOLS, rows) if h]
    body = {"tickers": out, "missing": [s for s, h in zip(SYMBOLS, rows) if not h],
            "count": len(out)}
    return Response(orjson.dumps(body), media_type="application/json")
"""


def fill(redis_url: str) -> None:
    store = TickerStore(redis_url)
    now = time.time_ns() // 1_000_000
    records = [
        ticker_record(s, now)
        for s in SYMBOLS
        if s != "MATICUSDT"  # as in production: listed, never delivered
    ]
    store.write(records, now, 3600)  # long TTL: the bench outlives the 60 s default
    store.close()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {url}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"server did not answer: {url}")


def start_servers(
    args: argparse.Namespace, redis_url: str, tmp: Path
) -> dict[str, tuple[subprocess.Popen[bytes], str]]:
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    if not args.no_default:
        servers["default"] = start_default(args, tmp)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # unused by the api component
    }
    proc = subprocess.Popen(
        [*shlex.split(args.marketd), "run", "--components", "api"], env=env, cwd=tmp
    )
    servers["marketd"] = (proc, f"http://127.0.0.1:{port}")

    (tmp / "bare_app.py").write_text(textwrap.dedent(BARE_APP))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            "-b",
            f"127.0.0.1:{port}",
            "bare_app:app",
        ],
        cwd=tmp,
        stderr=subprocess.DEVNULL,
    )
    servers["bare"] = (proc, f"http://127.0.0.1:{port}")

    if Path(args.fastapi_python).exists():
        (tmp / "fastapi_app.py").write_text(textwrap.dedent(FASTAPI_APP))
        port = free_port()
        proc = subprocess.Popen(
            [
                args.fastapi_python,
                "-m",
                "uvicorn",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "fastapi_app:app",
            ],
            cwd=tmp,
            env={**os.environ, "BENCH_REDIS": redis_url, "BENCH_SYMBOLS": ",".join(SYMBOLS)},
        )
        servers["fastapi"] = (proc, f"http://127.0.0.1:{port}")
    for proc, base in servers.values():
        wait_http(f"{base}/api/v1/ticker/BTCUSDT", proc)
    return servers


def start_default(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The default daemon (marketd.toml: all components, embedded Kafka and Redis) fed by the
    fake exchange; returns once it serves BTCUSDT (tickers are flowing)."""
    exchange = subprocess.Popen(
        [
            *shlex.split(args.marketd),
            "fake-exchange",
            "--port",
            "0",
            "--rate",
            str(args.trade_rate),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert exchange.stdout is not None
    line = exchange.stdout.readline()
    ws = re.search(r"ws=(\S+)", line)
    http = re.search(r"http=(\S+)", line)
    if not (ws and http):
        raise SystemExit(f"fake exchange did not start: {line!r}")
    EXTRA_PROCS.append(exchange)
    port = free_port()
    env = {
        **os.environ,
        "BINANCE_WS_URL": ws.group(1),
        "BINANCE_REST_URL": http.group(1),
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "SPOOL_DIR": str(tmp / "spool"),
    }
    proc = subprocess.Popen(
        [*shlex.split(args.marketd), "run", "--config", str(ROOT / "marketd.toml")],
        env=env,
        cwd=tmp,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"default daemon exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/api/v1/ticker/BTCUSDT", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("default daemon did not serve BTCUSDT in 90 s")
        time.sleep(0.2)
    return proc, base


EXTRA_PROCS: list[subprocess.Popen[str]] = []


def wrk(url: str, seconds: float) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) from wrk -t1 -c32 --latency; non-2xx answers abort the bench."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"errors from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    return rps, lat("50"), lat("99")


async def paced(url: str, rate: float, seconds: float) -> tuple[float, float, float]:
    """Open loop: one request every 1/rate s on a pool of keep-alive connections."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=5) as client:
        for _ in range(20):  # warm the pool
            await client.get(url)

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                response = await client.get(url)
            except httpx.TransportError:
                # A pooled connection the server closed as idle (keep-alive timeout) just as it
                # was reused: counted as an error of this run, not a crash of the benchmark.
                errors += 1
                return
            if response.status_code != 200:
                errors += 1
            latencies.append((trio.current_time() - scheduled) * 1000)

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            n = int(rate * seconds)
            for i in range(n):
                at = start + i / rate
                await trio.sleep_until(at)
                nursery.start_soon(one, at)
    if errors:
        raise SystemExit(f"{errors} errors from {url}")
    ordered = sorted(latencies)
    return (
        len(ordered) / seconds,
        ordered[len(ordered) // 2],
        ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--paced-rate", type=float, default=200.0)
    p.add_argument("--marketd", default=f"{sys.executable} -m marketd.cli")
    p.add_argument(
        "--trade-rate", type=int, default=100, help="fake exchange trades/s (default daemon)"
    )
    p.add_argument("--no-default", action="store_true", help="skip the default daemon")
    p.add_argument("--fastapi-python", default=str(FASTAPI_VENV / "bin" / "python"))
    p.add_argument(
        "--make-fastapi-venv",
        action="store_true",
        help=f"create {FASTAPI_VENV} with fastapi, uvicorn[standard], redis, hiredis; then exit",
    )
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/api.py needs wrk: apt-get install wrk (scripts/bootstrap --dev does)")
    if args.make_fastapi_venv:
        subprocess.run([sys.executable, "-m", "venv", str(FASTAPI_VENV)], check=True)
        pip = [str(FASTAPI_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run(
            [*pip, "fastapi", "uvicorn[standard]", "redis", "hiredis", "orjson"], check=True
        )
        return

    with tempfile.TemporaryDirectory() as tmp_dir, RedisProcess() as redis_server:
        fill(redis_server.url)
        servers = start_servers(args, redis_server.url, Path(tmp_dir))
        try:
            routes = {"one": "/api/v1/ticker/BTCUSDT", "all": "/api/v1/tickers"}
            table: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
            for _ in range(args.reps):
                for name, (_proc, base) in servers.items():
                    for route, path in routes.items():
                        if name == "bare" and route == "all":
                            continue
                        table.setdefault((name, route), []).append(wrk(base + path, args.seconds))
            paced_table = {
                name: trio.run(paced, base + routes["one"], args.paced_rate, args.seconds)
                for name, (_proc, base) in servers.items()
            }
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for extra in EXTRA_PROCS:
                extra.terminate()
            every: list[subprocess.Popen[Any]] = [p for p, _ in servers.values()]
            for child in (*every, *EXTRA_PROCS):
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    print(f"API bench: {os.cpu_count()} CPUs, wrk -t1 -c32 -d{args.seconds:g}s, {args.reps} reps")
    print(f"{'server':<9}{'route':<26}{'req/s (min-max)':>24}{'p50 ms':>9}{'p99 ms':>9}")
    for (name, route), runs in table.items():
        rps = [r[0] for r in runs]
        print(
            f"{name:<9}{routes[route]:<26}"
            f"{statistics.median(rps):>9,.0f} ({min(rps):,.0f}-{max(rps):,.0f})".rjust(24)
            + f"{statistics.median(r[1] for r in runs):>9.1f}"
            + f"{statistics.median(r[2] for r in runs):>9.1f}"
        )
    bare = statistics.median(r[0] for r in table[("bare", "one")])
    for name in ("default", "marketd"):
        if (name, "one") in table:
            ours = statistics.median(r[0] for r in table[(name, "one")])
            print(f"{name} / bare Hypercorn-trio (one ticker): {ours / bare:.0%}")
    print(f"paced {args.paced_rate:g} req/s, {routes['one']} (latency from the scheduled send):")
    for name, (rate, p50, p99) in paced_table.items():
        print(f"  {name:<9} {rate:>6,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")


if __name__ == "__main__":
    main()
