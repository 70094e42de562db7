"""Ingest benchmark: fake exchange (own process) -> marketd (own process, embedded Kafka) -> Kafka.

Prints, for `--rate max` and for fixed rates: sustained messages/s delivered to Kafka, loss and
duplicates (trade ids per symbol), p50/p99 frame receipt -> delivery ack (marketd's own
histogram), marketd CPU seconds per 100k messages and peak RSS; and, in the same run, the bare
receive rate of a plain trio-websocket client against the same server (the ceiling).

    .venv/bin/python bench/ingest.py                      # max rate + 10k/s, 20 s each
    .venv/bin/python bench/ingest.py --sets mixed         # only trade + kline_1m + 24h ticker
    .venv/bin/python bench/ingest.py --no-spool           # the path without the Kafka-outage spool
    .venv/bin/python bench/ingest.py --soak 600           # + RSS over 10 minutes at 10k/s
    .venv/bin/python bench/ingest.py --steps              # trio task steps per frame (in-process)

Two stream sets, each measured against its own bare receive rate: `trades` (one trade stream per
symbol) and `mixed` (trade + kline_1m + 24 h ticker per symbol, the set users subscribe). The
fake exchange's trade rate is the load; klines and tickers come on their own schedule (about
one frame per stream per second) and go to their own topics, so msgs/s counts the trades tape
(which is also the one checked id by id), and the bare client counts every frame it receives.

The mock cluster keeps only a few MB per partition: a tape reader that falls behind (a loaded
machine) finds offsets already dropped. Those are counted as `evicted_unread` (they were written,
so they are not lost); `lost` = accepted - read - evicted_unread, and when evicted_unread > 0 the
reader's `id_gaps` (at most that many) are the reader's holes, not marketd's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any

import _spy  # bench/ is sys.path[0] when run as a script
import confluent_kafka
import msgspec
import psutil  # type: ignore[import-untyped]
import trio
import trio_websocket

from marketd.kafka.client import EmbeddedCluster
from marketd.testing.samples import BENCH_SYMBOLS
from marketd.tickers.redis_server import free_port

SYMBOLS = list(BENCH_SYMBOLS)
STREAM_SETS = {
    "trades": [f"{s}@trade" for s in SYMBOLS],
    "mixed": [f"{s}@{kind}" for s in SYMBOLS for kind in ("trade", "kline_1m", "ticker")],
}


def start_exchange(rate: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketd.cli",
            "fake-exchange",
            "--port",
            "0",
            "--rate",
            rate,
            "--symbols",
            ",".join(SYMBOLS),
            "--seed",
            "7",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"ws=(\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"fake exchange did not start: {line!r}")
    return proc, m.group(1)


async def bare_receive_rate(ws_url: str, streams: list[str], seconds: float) -> float:
    url = ws_url + "?streams=" + "/".join(streams)
    n = 0
    async with trio_websocket.open_websocket_url(url) as ws:
        for _ in range(2000):  # warm-up
            await ws.get_message()
        t0 = time.perf_counter()
        with trio.move_on_after(seconds):
            while True:
                await ws.get_message()
                n += 1
        return n / (time.perf_counter() - t0)


class _Trade(msgspec.Struct):
    symbol: str
    trade_id: int


_decode_trade = msgspec.json.Decoder(_Trade).decode


class TapeReader(threading.Thread):
    """Reads raw_trades while marketd runs (the mock cluster keeps only a few MB/partition)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{os.getpid()}-{time.time()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "fetch.queue.backoff.ms": 10,
            }
        )
        self.consumer.subscribe([topic])
        self.ids: dict[str, list[int]] = defaultdict(list)
        self.count = 0
        # Offsets never read: the mock cluster keeps a few MB per partition and drops the oldest
        # records (a new topic starts at offset 0; a reader that falls behind finds holes).
        # Those were written to the log, so they count as delivered, not lost.
        self.next_offset: dict[int, int] = defaultdict(int)
        self.evicted = 0
        self.timeline: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(5000, 0.2):
                value = msg.value()
                if msg.error() or value is None:
                    continue
                partition, offset = msg.partition(), msg.offset()
                if partition is not None and offset is not None:
                    self.evicted += max(0, offset - self.next_offset[partition])
                    self.next_offset[partition] = offset + 1
                rec = _decode_trade(value)
                self.ids[rec.symbol].append(rec.trade_id)
                self.count += 1
            self.timeline.append((time.monotonic(), self.count))
        self.consumer.close()


def latency_buckets(api_port: int) -> dict[float, float]:
    """marketd's receipt -> ack histogram (cumulative counts by upper bound) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for m in re.finditer(
        r'^marketd_kafka_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
    ):
        out[float(m.group(1))] = float(m.group(2))
    return out


def produced(api_port: int, topic: str) -> float:
    """Records of `topic` Kafka acknowledged so far, marketd's own counter from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(
        rf'^marketd_kafka_produced_total\{{topic="{re.escape(topic)}"\}} (\S+)$', text, re.M
    )
    return float(m.group(1)) if m else 0.0


def wait_for_api(api_port: int, proc: subprocess.Popen[str], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            latency_buckets(api_port)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"marketd did not start (exit code {proc.poll()})") from None
            time.sleep(0.2)


def window_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q of what was observed between two scrapes:
    the steady state, without the connection set-up of the first second."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    return next(b for b, c in zip(bounds, counts, strict=True) if c >= rank)


def run_marketd(
    ws_url: str,
    streams: list[str],
    seconds: float,
    extra_env: dict[str, str],
    spy: bool = False,
) -> dict[str, Any]:
    # The mock cluster lives in this process, so the tape can be read to its end after marketd
    # exits; marketd reaches it over loopback like any broker.
    cluster = EmbeddedCluster()
    topic = f"raw_trades_{time.time_ns()}"
    api_port = free_port()  # the API only serves /metrics here (steady-state latency)
    env = {
        **os.environ,
        "LOG_FORMAT": "json",
        "MARKETD_COMPONENTS": "ingest,api",
        "API_PORT": str(api_port),
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
        "BINANCE_WS_URL": ws_url,
        "BINANCE_REST_URL": ws_url.replace("ws://", "http://").removesuffix("/stream"),
        "BINANCE_STREAMS": ",".join(streams),
        "TOPIC_RAW_TRADES": topic,
        # The Kafka-outage spool is armed (not embedded Kafka), as in production; its own dir.
        "SPOOL_DIR": tempfile.mkdtemp(prefix="marketd-bench-spool-"),
        **extra_env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketd.cli", "run"], env=env, stderr=subprocess.PIPE, text=True
    )
    events: list[dict[str, Any]] = []

    def collect() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("{"):
                events.append(json.loads(line))

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    reader = TapeReader(cluster.bootstrap_servers, topic)
    reader.start()
    ps = psutil.Process(proc.pid)
    peak_rss = 0
    rss_samples: list[tuple[float, int]] = []
    wait_for_api(api_port, proc)  # a loaded machine may take many seconds to start marketd
    time.sleep(2.0)  # connect + warm up
    buckets0 = latency_buckets(api_port)
    cpu0 = ps.cpu_times()
    n0, t0 = reader.count, time.monotonic()
    acked0 = produced(api_port, topic)
    sampling = _spy.start(proc.pid, max(1.0, seconds - 1.0)) if spy else None
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        rss = ps.memory_info().rss
        peak_rss = max(peak_rss, rss)
        rss_samples.append((time.monotonic() - t0, rss))
    cpu1 = ps.cpu_times()
    n1, t1 = reader.count, time.monotonic()
    acked1 = produced(api_port, topic)
    buckets1 = latency_buckets(api_port)
    shares: dict[str, float] = {}
    if sampling is not None:
        sampling[0].wait(30)
        shares = _spy.split(sampling[1])
    proc.terminate()
    proc.wait(60)
    collector.join(5)
    stopped = next(e for e in reversed(events) if e.get("event") == "ingest.stopped")
    accepted, delivered, failed = map(int, stopped[topic].split("/"))
    deadline = time.monotonic() + 60
    while reader.count < delivered and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # anything read beyond `delivered` would be a duplicate
    reader.stop.set()
    reader.join(10)
    cluster.close()
    dups = gaps = 0
    for ids in reader.ids.values():
        s = sorted(ids)
        dups += len(s) - len(set(s))
        u = sorted(set(s))
        gaps += sum(b - a - 1 for a, b in itertools.pairwise(u) if b - a > 1)
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    msgs = n1 - n0
    acked = acked1 - acked0
    return {
        # Acknowledged by Kafka in the window, marketd's own count (the tape reader may lag).
        "msgs_per_s": (acked1 - acked0) / (t1 - t0),
        "read_per_s": msgs / (t1 - t0),
        "accepted": accepted,
        "delivered": delivered,
        "failed": failed,
        "in_kafka": reader.count,
        "lost": accepted - reader.count - reader.evicted,
        "evicted_unread": reader.evicted,
        "duplicates": dups,
        "id_gaps": gaps,
        "p50_ms": stopped.get("ack_latency_p50_ms"),
        "p99_ms": stopped.get("ack_latency_p99_ms"),
        "steady_p50_ms": window_quantile(buckets0, buckets1, 0.5) * 1000,
        "steady_p99_ms": window_quantile(buckets0, buckets1, 0.99) * 1000,
        "cpu_s_per_100k": cpu / acked * 100_000 if acked else float("nan"),
        "peak_rss_mb": peak_rss / 2**20,
        "rss_first_mb": rss_samples[len(rss_samples) // 10][1] / 2**20 if rss_samples else 0,
        "rss_last_mb": rss_samples[-1][1] / 2**20 if rss_samples else 0,
        # CPU per message by part of the path (py-spy, --spy): microseconds.
        **{f"us/msg {part}": share * cpu / acked * 1e6 for part, share in shares.items() if acked},
    }


class StepCounter(trio.abc.Instrument):
    """Counts task steps (per task function) and scheduler I/O waits: what each frame costs the
    scheduler, independent of how loaded the machine is (docs/performance.md §7)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = defaultdict(int)
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1

    def reset(self) -> None:
        self.steps.clear()
        self.io_waits = 0


def _frames_received(metrics: Any) -> int:
    counter = metrics.fast_counter("ws_frames_received", "", "conn")
    return sum(counter.values.values())


async def _count_marketd_steps(
    ws_url: str, streams: list[str], seconds: float, spool: bool, bootstrap: str
) -> dict[str, Any]:
    # Imported here: with PYTHONPATH pointing at another tree, this measures that tree's code.
    from marketd.config import load_config
    from marketd.ingest.pipeline import run_ingest
    from marketd.metrics import MetricsFactory
    from marketd.runtime import Runtime

    env = {
        "BINANCE_WS_URL": ws_url,
        "BINANCE_REST_URL": ws_url.replace("ws://", "http://").removesuffix("/stream"),
        "BINANCE_STREAMS": ",".join(streams),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_RAW_TRADES": f"raw_trades_{time.time_ns()}",
        "SPOOL_ENABLED": "true" if spool else "false",
        "SPOOL_DIR": tempfile.mkdtemp(prefix="marketd-steps-spool-"),
        "LOG_LEVEL": "WARNING",
    }
    cfg = load_config(None, environ=env, dotenv=None).config
    metrics = MetricsFactory()
    rt = Runtime(cfg, metrics, bootstrap, None)
    counter = StepCounter()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_ingest, rt)
        await trio.sleep(3.0)  # connect, read the tail, warm up
        trio.lowlevel.add_instrument(counter)
        frames0, t0 = _frames_received(metrics), time.perf_counter()
        await trio.sleep(seconds)
        frames = _frames_received(metrics) - frames0
        elapsed = time.perf_counter() - t0
        trio.lowlevel.remove_instrument(counter)
        rt.draining.set()
    total = sum(counter.steps.values())
    top = sorted(counter.steps.items(), key=lambda kv: -kv[1])[:8]
    return {
        "frames": frames,
        "frames_per_s": frames / elapsed,
        "steps_per_frame": total / frames if frames else float("nan"),
        "io_waits_per_frame": counter.io_waits / frames if frames else float("nan"),
        "by_task": {name: round(n / frames, 3) for name, n in top} if frames else {},
    }


async def _count_bare_steps(ws_url: str, streams: list[str], seconds: float) -> dict[str, Any]:
    counter = StepCounter()
    url = ws_url + "?streams=" + "/".join(streams)
    n = 0
    async with trio_websocket.open_websocket_url(url) as ws:
        for _ in range(2000):
            await ws.get_message()
        trio.lowlevel.add_instrument(counter)
        with trio.move_on_after(seconds):
            while True:
                await ws.get_message()
                n += 1
        trio.lowlevel.remove_instrument(counter)
    return {
        "frames": n,
        "steps_per_frame": sum(counter.steps.values()) / n,
        "io_waits_per_frame": counter.io_waits / n,
    }


def count_steps(sets: list[str], rates: list[str], seconds: float, spool: bool) -> None:
    """Task steps per frame, marketd's ingest run in this process (same code as the daemon's
    component) against the fake exchange, the mock cluster also in this process (its threads
    are not trio tasks); the bare trio-websocket loop alongside as the reference."""
    for set_name, rate in itertools.product(sets, rates):
        streams = STREAM_SETS[set_name]
        proc, ws_url = start_exchange(rate)
        cluster = EmbeddedCluster()
        try:
            bare = trio.run(_count_bare_steps, ws_url, streams, min(seconds, 5.0))
            ours = trio.run(
                _count_marketd_steps, ws_url, streams, seconds, spool, cluster.bootstrap_servers
            )
        finally:
            cluster.close()
            proc.terminate()
            proc.wait(10)
        print(
            f"\n{set_name} rate={rate} spool={'armed' if spool else 'off'}: "
            f"marketd {ours['steps_per_frame']:.3f} task steps/frame, "
            f"{ours['io_waits_per_frame']:.3f} I/O waits/frame "
            f"({ours['frames']:,} frames, {ours['frames_per_s']:,.0f}/s); "
            f"bare trio-websocket {bare['steps_per_frame']:.3f} steps/frame, "
            f"{bare['io_waits_per_frame']:.3f} I/O waits/frame"
        )
        print(f"  by task (steps/frame): {ours['by_task']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rates", default="max,10000")
    parser.add_argument("--sets", default="trades,mixed", help=f"of {','.join(STREAM_SETS)}")
    parser.add_argument(
        "--no-spool",
        action="store_true",
        help="SPOOL_ENABLED=false: the path of embedded Kafka (the decode stage produces itself)",
    )
    parser.add_argument("--soak", type=float, default=0, help="seconds at 10k/s for RSS growth")
    parser.add_argument(
        "--spy",
        action="store_true",
        help="sample marketd with py-spy in the window: CPU per message by part of the path",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="count trio task steps per frame instead (in-process, load-independent)",
    )
    args = parser.parse_args()
    if args.steps:
        count_steps(
            args.sets.split(","), args.rates.split(","), min(args.seconds, 10.0), not args.no_spool
        )
        return
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, trio {trio.__version__}, "
        f"confluent-kafka {confluent_kafka.version()[0]}, "
        f"librdkafka {confluent_kafka.libversion()[0]}"
    )
    extra_env = {"SPOOL_ENABLED": "false"} if args.no_spool else {}
    for set_name, rate in itertools.product(args.sets.split(","), args.rates.split(",")):
        streams = STREAM_SETS[set_name]
        proc, ws_url = start_exchange(rate)
        try:
            bare = trio.run(bare_receive_rate, ws_url, streams, min(args.seconds, 10.0))
            result = run_marketd(ws_url, streams, args.seconds, extra_env, spy=args.spy)
        finally:
            proc.terminate()
            proc.wait(10)
        ratio = result["msgs_per_s"] / bare if rate == "max" else float("nan")
        print(
            f"\n{set_name} ({len(streams)} streams), rate={rate}: "
            f"bare trio-websocket receive {bare:,.0f} msgs/s"
        )
        for k, v in result.items():
            print(f"  {k:16} {v:,.3f}" if isinstance(v, float) else f"  {k:16} {v}")
        if rate == "max":
            print(f"  vs bare          {ratio:.1%}")
    if args.soak:
        proc, ws_url = start_exchange("10000")
        try:
            result = run_marketd(ws_url, STREAM_SETS["trades"], args.soak, {})
        finally:
            proc.terminate()
            proc.wait(10)
        growth = (result["rss_last_mb"] - result["rss_first_mb"]) / result["rss_first_mb"]
        print(
            f"\nsoak {args.soak:.0f}s at 10k/s: RSS {result['rss_first_mb']:.1f} MB -> "
            f"{result['rss_last_mb']:.1f} MB ({growth:+.1%}), peak {result['peak_rss_mb']:.1f} MB, "
            f"lost {result['lost']}, duplicates {result['duplicates']}"
        )


if __name__ == "__main__":
    main()
