"""Benchmark of spark/trade_aggregation.py on local[2] (files source): throughput and latency.

1. Throughput: 1,000,000 trades (3 symbols) in JSON-lines files, one --once run -> trades/s
   (after a 100,000-trade warm-up run, so JVM code generation is not counted).
2. Latency: a writer drops a file every 0.5 s at a steady 5,000 trades/s (trade_time = write
   time) while the job runs with a 1 s trigger; latency of a micro-batch = when its outputs were
   written - the oldest trade in it. Prints median / p95 / max.
Targets: >= 50,000 trades/s; micro-batch latency <= 5 s at 5,000 trades/s. The machine is shared
and noisy: treat one run as an order of magnitude. Usage: .venv/bin/python bench/spark_jobs.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

SPARK_DIR = Path(__file__).resolve().parents[1] / "spark"
sys.path.insert(0, str(SPARK_DIR))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from marketd_spark.jobs import trade_aggregation as job  # noqa: E402
from marketd_spark.runner import start  # noqa: E402
from marketd_spark.session import get_session  # noqa: E402

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
LINE = (
    '{{"symbol":"{s}","trade_id":{i},"price":"{p}","quantity":"{q}","trade_time":{t},'
    '"event_time":{t},"is_buyer_maker":{m},"ingested_at":{t},"source":"binance",'
    '"stream":"{sl}@trade","schema_version":1}}'
)


def lines(first_id: int, n: int, t0_ms: int, span_ms: int) -> str:
    out = []
    for k in range(n):
        i = first_id + k
        s = SYMBOLS[i % 3]
        out.append(
            LINE.format(
                s=s,
                sl=s.lower(),
                i=i,
                p=f"{40000 + (i * 7919) % 2000}.{i % 100:02d}",
                q=f"0.{(i * 104729) % 99999999 + 1:08d}",  # never 0: a zero quantity is invalid
                t=t0_ms + (k * span_ms) // max(n, 1),
                m="true" if i % 2 else "false",
            )
        )
    return "\n".join(out) + "\n"


def drop(directory: Path, name: str, text: str) -> None:
    tmp = directory.parent / f".{name}"
    tmp.write_text(text)
    tmp.rename(directory / name)


def throughput(spark, root: Path, total: int, files: int, tag: str = "tp") -> float:
    src = root / f"{tag}-in"
    src.mkdir()
    per = total // files
    t0 = 1_767_225_600_000
    for f in range(files):
        drop(src, f"f{f:04d}.jsonl", lines(f * per, per, t0 + f * 60_000, 60_000))
    args = job.parse_args(
        [
            "--source", "files", "--input", str(src), "--sink", "parquet",
            "--output", str(root / f"{tag}-out"), "--checkpoint", str(root / f"{tag}-ck"), "--once",
            "--max-files-per-trigger", "5",
        ]
    )  # fmt: skip
    values, proc = job.build(spark, args)
    began = time.perf_counter()
    q = start(spark, args, values, proc)
    q.awaitTermination()
    elapsed = time.perf_counter() - began
    assert q.exception() is None, q.exception()
    if tag != "tp":
        return total / elapsed
    print(f"throughput: {total:,} trades in {elapsed:.1f} s = {total / elapsed:,.0f} trades/s "
          f"({proc.stats['windows_emitted']} windows emitted)")  # fmt: skip
    return total / elapsed


def latency(spark, root: Path, rate: int, seconds: float) -> list[float]:
    src = root / "lat-in"
    src.mkdir()
    latencies: list[float] = []
    original = job.reduce_windows

    def spy(t, base_ms):
        reduced = original(t, base_ms)
        if reduced.partials:
            oldest = min(p.acc.first.time_ms for p in reduced.partials)
            spy.last = oldest
        else:
            spy.last = None
        return reduced

    spy.last = None
    job.reduce_windows = spy

    class Timed(job.TradeAggregation):
        def process(self, batch, batch_id, state):
            out = super().process(batch, batch_id, state)
            if spy.last is not None:
                latencies.append(time.time() - spy.last / 1000)
            return out

    args = job.parse_args(
        [
            "--source", "files", "--input", str(src), "--sink", "parquet",
            "--output", str(root / "lat-out"), "--checkpoint", str(root / "lat-ck"),
            "--trigger-seconds", "1",
        ]
    )  # fmt: skip
    values, proc = job.build(spark, args)
    timed = Timed(args, proc.sinks)
    q = start(spark, args, values, timed)
    stop = threading.Event()

    def writer() -> None:
        period, n, seq, next_at = 0.5, rate // 2, 0, time.monotonic()
        while not stop.is_set():
            now_ms = int(time.time() * 1000)
            drop(src, f"f{seq:06d}.jsonl", lines(10_000_000 + seq * n, n, now_ms, 1))
            seq += 1
            next_at += period
            stop.wait(max(0.0, next_at - time.monotonic()))

    time.sleep(3)  # first batch (empty) and JIT warm-up
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    time.sleep(3)
    failed = q.exception()
    q.stop()
    job.reduce_windows = original
    if failed is not None:
        raise RuntimeError(f"the streaming query failed: {failed}")
    steady = latencies[2:] or latencies  # skip the first batches (warm-up)
    p95 = sorted(steady)[int(0.95 * (len(steady) - 1))]
    print(f"latency at {rate:,} trades/s over {seconds:.0f} s: {len(latencies)} batches, "
          f"median {statistics.median(steady):.2f} s, p95 {p95:.2f} s, "
          f"max {max(steady):.2f} s")  # fmt: skip
    return steady


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trades", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rate", type=int, default=5_000)
    p.add_argument("--seconds", type=float, default=40.0)
    a = p.parse_args()
    spark = get_session("bench-spark-jobs", "local[2]")
    with tempfile.TemporaryDirectory(prefix="marketd-bench-") as d:
        throughput(spark, Path(d), 100_000, 2, tag="warmup")  # JIT and code generation
        tp = throughput(spark, Path(d), a.trades, a.files)
        lat = latency(spark, Path(d), a.rate, a.seconds)
    spark.stop()
    print(f"targets: throughput >= 50,000 trades/s: {'met' if tp >= 50_000 else 'MISSED'}; "
          f"p95 latency <= 5 s: "
          f"{'met' if sorted(lat)[int(0.95 * (len(lat) - 1))] <= 5 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
