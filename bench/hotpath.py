"""Hot-path benchmark: exchange frame (event time E) -> marketd -> readable in Redis.

Three measurements, printed as a table:

* latency at 1,000 tickers/s (15 symbols): a paced WebSocket server in this process stamps E at
  send time; `marketd run` (ingest + tickers + api, embedded Kafka = librdkafka's mock cluster,
  Redis = a private redis-server started here) carries them to Redis; an independent reader
  process polls the 15 hashes every ~0.5 ms and reports, per new value it sees, `seen - E` (what
  a client observes; includes up to one poll interval) and `updated_at - E` (the consumer's own
  write time, integer ms). The consumer's event_time->stored histogram is read from /metrics
  (bucket upper bounds, i.e. coarse).
* the same path at max rate (the server sends as fast as marketd reads): stored tickers/s.
* the consumer alone: a topic pre-filled with N tickers is drained into Redis in this process
  (run_tickers), timed from the first to the last consumed message.

Why a paced server and not `marketd fake-exchange`: the fake exchange sends one ticker per symbol
per second, as Binance does (its --rate paces trades), so it cannot produce 1,000 tickers/s with
real-time event times. The machine is shared and noisy: run once, read the spread.

    .venv/bin/python bench/hotpath.py                  # 1000/s for 15 s, max for 10 s, drain
    .venv/bin/python bench/hotpath.py --seconds 30 --drain 60000
    .venv/bin/python bench/hotpath.py --marketd "/path/python -m marketd.cli"   # another build
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import msgspec
import trio
from _common import SYMBOLS, pct  # first: puts the repository on sys.path
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from marketd.testing.samples import ticker_record
from marketd.tickers.redis_server import RedisProcess, free_port

# The reader's poll interval: it bounds the "seen" error and costs CPU on a 2-core box.
READER_INTERVAL_S = 0.001


# -- the paced exchange ---------------------------------------------------------------------


def ticker_frame(symbol: str, event_ms: int, n: int) -> str:
    price = f"{100 + (n % 1000) / 100:.2f}"
    data = {
        "e": "24hrTicker", "E": event_ms, "s": symbol, "p": "-1.25000000", "P": "-0.011",
        "w": "100.10000000", "x": "100.00000000", "c": price, "Q": "0.00100000",
        "b": price, "B": "1.20000000", "a": price, "A": "0.50000000", "o": "101.25000000",
        "h": "110.00000000", "l": "90.00000000", "v": "12345.60000000",
        "q": "1456789012.30000000", "O": event_ms - 86_400_000, "C": event_ms, "F": 1,
        "L": n + 1, "n": n + 1,
    }  # fmt: skip
    return json.dumps({"stream": f"{symbol.lower()}@ticker", "data": data})


class Exchange:
    """Sends tickers round-robin over the 15 symbols, E = wall clock at send time."""

    def __init__(self) -> None:
        self.rate: float | None = 0.0  # tickers/s; None = as fast as the client reads; 0 = idle
        self.sent = 0
        self.changed = trio.Event()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self.changed.set()

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                if self.rate == 0:
                    self.changed = trio.Event()
                    await self.changed.wait()
                    continue
                rate = self.rate
                start = trio.current_time()
                n0 = self.sent
                while self.rate == rate:
                    symbol = SYMBOLS[self.sent % len(SYMBOLS)]
                    await ws.send_message(
                        ticker_frame(symbol, time.time_ns() // 1_000_000, self.sent)
                    )
                    self.sent += 1
                    if rate is not None:
                        # Absolute schedule: a late wake-up sends the backlog, rate stays exact.
                        await trio.sleep_until(start + (self.sent - n0) / rate)
        except ConnectionClosed:
            return


# -- the independent reader (its own process) -----------------------------------------------


def reader_main(url: str, seconds: float, interval_s: float) -> None:
    import redis

    client = redis.Redis.from_url(url)
    last: dict[str, int] = {}
    seen_lat: list[float] = []
    stored_lat: list[float] = []
    deadline = time.monotonic() + seconds
    keys = [f"ticker:{s}" for s in SYMBOLS]
    while time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "event_time", "updated_at")
        replies = pipe.execute()
        now_ms = time.time_ns() / 1e6
        for key, (event_time, updated_at) in zip(keys, replies, strict=True):
            if event_time is None:
                continue
            e = int(event_time)
            if last.get(key) != e:
                if key in last:  # the first value seen may be old
                    seen_lat.append(now_ms - e)
                    stored_lat.append(int(updated_at) - e)
                last[key] = e
        time.sleep(interval_s)
    client.close()
    print(json.dumps({"seen": seen_lat, "stored": stored_lat}))


def start_reader(url: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "reader", url, str(seconds), str(READER_INTERVAL_S)],
        stdout=subprocess.PIPE,
        text=True,
    )


# -- /metrics parsing ----------------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def bucket_quantiles(text: str, name: str, qs: tuple[float, ...]) -> list[float]:
    buckets = [
        (float("inf") if le == "+Inf" else float(le), float(v))
        for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
    ]
    total = buckets[-1][1] if buckets else 0
    out = []
    for q in qs:
        out.append(next((le for le, c in buckets if total and c >= q * total), float("nan")))
    return out


def phase_quantiles(before: str, after: str, name: str) -> tuple[float, float]:
    """p50/p99 (ms, bucket upper bounds) of a histogram over the phase between two scrapes."""
    pattern = rf'^{name}_bucket{{(?:[^}}]*,)?le="([^"]+)"}} (\S+)$'
    prior: dict[str, float] = {}
    for le, v in re.findall(pattern, before, re.M):
        prior[le] = prior.get(le, 0.0) + float(v)
    now: dict[str, float] = {}
    for le, v in re.findall(pattern, after, re.M):
        now[le] = now.get(le, 0.0) + float(v)
    delta = "\n".join(
        f'{name}_bucket{{le="{le}"}} {v - prior.get(le, 0.0)}' for le, v in now.items()
    )
    p50, p99 = bucket_quantiles(delta, name, (0.5, 0.99))
    return p50 * 1000, p99 * 1000


# -- the full path -----------------------------------------------------------------------------


async def full_path(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    exchange = Exchange()
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    results: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(base_url=api, timeout=5) as client,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(
            lambda **kw: serve_websocket(exchange.handler, "127.0.0.1", 0, ssl_context=None, **kw)
        )
        env = {
            **os.environ,
            "BINANCE_WS_URL": f"ws://127.0.0.1:{server.port}/stream",
            "BINANCE_STREAMS": ",".join(f"{s.lower()}@ticker" for s in SYMBOLS),
            "KAFKA_BOOTSTRAP_SERVERS": "embedded",
            "REDIS_URL": redis_url,
            "API_PORT": str(api_port),
            "LOG_LEVEL": "WARNING",
        }
        daemon = await trio.lowlevel.open_process(
            [*shlex.split(args.marketd), "run"], env=env, stdin=subprocess.DEVNULL
        )
        try:
            # Wait for the consumer to be assigned and the ingest connected: first value in Redis.
            exchange.set_rate(50)
            with trio.fail_after(60):
                while True:
                    try:
                        r = await client.get("/api/v1/ticker/BTCUSDT")
                        if r.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if daemon.returncode is not None:
                        raise SystemExit(f"marketd exited with {daemon.returncode}")
                    await trio.sleep(0.2)
            for label, rate in (("1000/s", 1000.0), ("max", None)):
                seconds = args.seconds if rate else args.max_seconds
                exchange.set_rate(rate)
                await trio.sleep(1.0)  # settle
                before = await scrape(client)
                sent0 = exchange.sent
                reader = start_reader(redis_url, seconds)
                t0 = time.perf_counter()
                out, _ = await trio.to_thread.run_sync(reader.communicate)
                elapsed = time.perf_counter() - t0
                after = await scrape(client)
                exchange.set_rate(0)
                lat = json.loads(out)
                hist = {
                    key: phase_quantiles(before, after, f"marketd_{key}_seconds")
                    for key in (
                        "tickers_event_to_stored",
                        "tickers_ingested_to_stored",
                        "kafka_delivery_latency",
                        "tickers_redis_write",
                    )
                }
                consumed = counter(after, "marketd_tickers_consumed_total") - counter(
                    before, "marketd_tickers_consumed_total"
                )
                stored = counter(after, "marketd_tickers_stored_total") - counter(
                    before, "marketd_tickers_stored_total"
                )
                produced = counter(after, "marketd_kafka_produced_total") - counter(
                    before, "marketd_kafka_produced_total"
                )
                results[label] = {
                    "produced_per_s": produced / elapsed,
                    "lag_end": counter(after, "marketd_tickers_consumer_lag"),
                    "sent_per_s": (exchange.sent - sent0) / elapsed,
                    "consumed_per_s": consumed / elapsed,
                    "stored_per_s": stored / elapsed,
                    "seen": lat["seen"],
                    "stored_lat": lat["stored"],
                    "hist": hist,
                }
                await trio.sleep(2.0)  # let the backlog drain before the next phase
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    await daemon.wait()
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
            results["exit_code"] = daemon.returncode
            nursery.cancel_scope.cancel()
    return results


# -- the consumer alone ---------------------------------------------------------------------


async def drain(n: int, redis_url: str) -> dict[str, float]:
    import confluent_kafka

    from marketd.config import Value, load_config
    from marketd.kafka.client import EmbeddedCluster
    from marketd.metrics import MetricsFactory
    from marketd.runtime import Runtime
    from marketd.tickers.consume import run_tickers
    from marketd.tickers.state import running_state

    topic = f"bench-tickers-{os.getpid()}-{time.monotonic_ns()}"
    encode = msgspec.json.Encoder().encode
    with EmbeddedCluster() as cluster:
        producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "linger.ms": 5,
                "compression.type": "lz4",
            }
        )
        now = time.time_ns() // 1_000_000
        for i in range(n):
            symbol = SYMBOLS[i % len(SYMBOLS)]
            t = now + i // len(SYMBOLS)  # every record is newer than the last of its symbol
            record = ticker_record(symbol, t, trades_count=i + 1)
            while True:
                try:
                    producer.produce(topic, encode(record), symbol.encode())
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(30)
        cfg = load_config(
            environ={"KAFKA_TICKER_TOPIC": topic, "TICKER_CONSUMER_GROUP": topic},
            dotenv=None,
            overrides={"kafka.consumer": Value({"fetch.wait.max.ms": "1"}, "bench")},
        ).config
        rt = Runtime(cfg, MetricsFactory(), cluster.bootstrap_servers, redis_url)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_tickers, rt)
            # Started is not connected: the consumer reports started at once and sets up its
            # Kafka client and metrics when its dependencies answer (marketd/health.py).
            with trio.fail_after(60):
                while (state := running_state(rt)) is None or state.metrics is None:  # noqa: ASYNC110 - state of the consumer, no event
                    await trio.sleep(0.01)
            consumed = state.metrics.consumed
            with trio.fail_after(120):
                # Polling the counter is the measurement (0.5 ms resolution), not a wait.
                while sum(consumed.values.values()) == 0:  # noqa: ASYNC110
                    await trio.sleep(0.0005)
                first = time.perf_counter()
                start_count = sum(consumed.values.values())
                while True:
                    c = sum(consumed.values.values())
                    lag = state.consumer_lag
                    if c >= n or (c > start_count and lag == 0 and c > 0.9 * n):
                        break
                    await trio.sleep(0.0005)
            elapsed = time.perf_counter() - first
            total = sum(consumed.values.values())
            stored = sum(state.metrics.stored.values.values())
            rt.draining.set()
    return {
        "records": float(total),
        "per_s": (total - start_count) / elapsed,
        "stored": float(stored),
        "seconds": elapsed,
    }


# -- main ---------------------------------------------------------------------------------------


def show(label: str, r: dict[str, Any]) -> None:
    seen, st = r["seen"], r["stored_lat"]
    print(
        f"  {label:>7}: exchange sent {r['sent_per_s']:,.0f}/s, into Kafka"
        f" {r['produced_per_s']:,.0f}/s, consumed {r['consumed_per_s']:,.0f}/s,"
        f" hashes written {r['stored_per_s']:,.0f}/s, consumer lag at end {r['lag_end']:,.0f}"
    )
    print(
        f"           reader seen-E ms    p50 {pct(seen, 0.5):6.2f}  p99 {pct(seen, 0.99):6.2f}"
        f"  max {max(seen, default=float('nan')):7.2f}  (n={len(seen)})"
    )
    print(
        f"           updated_at-E ms     p50 {pct(st, 0.5):6.2f}  p99 {pct(st, 0.99):6.2f}"
        f"  max {max(st, default=float('nan')):7.2f}  (integer ms)"
    )
    labels = {
        "tickers_event_to_stored": "E -> stored (consumer)",
        "tickers_ingested_to_stored": "WS receipt -> stored",
        "kafka_delivery_latency": "WS receipt -> Kafka ack",
        "tickers_redis_write": "Redis write (pipeline)",
    }
    for key, (p50, p99) in r["hist"].items():
        print(
            f"           {labels[key]:<24} p50 <= {p50:g} ms  p99 <= {p99:g} ms (histogram bounds)"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reader":
        reader_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="length of the 1,000/s phase")
    p.add_argument("--max-seconds", type=float, default=10.0, help="length of the max phase")
    p.add_argument("--drain", type=int, default=25_000, help="records for the consumer-only run")
    p.add_argument("--drain-reps", type=int, default=3)
    p.add_argument("--marketd", default=f"{sys.executable} -m marketd.cli", help="command prefix")
    p.add_argument("--skip-full", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as _tmp, RedisProcess() as redis_server:
        print(f"hot path bench: {os.cpu_count()} CPUs, redis {redis_server.url}")
        if not args.skip_full:
            full = trio.run(full_path, args, redis_server.url)
            print(
                "full path: paced WS -> marketd run (ingest+tickers+api, embedded Kafka) -> Redis"
            )
            for label in ("1000/s", "max"):
                show(label, full[label])
            print(f"  marketd exit code after SIGTERM: {full['exit_code']}")
        if not args.drain_reps:
            return
        runs = [trio.run(drain, args.drain, redis_server.url) for _ in range(args.drain_reps)]
        rates = [r["per_s"] for r in runs]
        print(
            f"consumer alone: {args.drain:,} pre-filled tickers drained into Redis, "
            f"{args.drain_reps} reps: median {statistics.median(rates):,.0f}/s "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f}); "
            f"records consumed {runs[-1]['records']:,.0f}, hashes written {runs[-1]['stored']:,.0f}"
        )


if __name__ == "__main__":
    main()
