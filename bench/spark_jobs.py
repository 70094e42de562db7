"""Benchmark of spark/trade_aggregation.py on local[2]: files vs the Python Kafka source, latency.

1. Throughput, files: 1,000,000 trades (3 symbols) in JSON-lines files, one --once run -> trades/s
   (after a 100,000-trade warm-up run, so JVM code generation is not counted).
2. Throughput, Kafka: the same 1,000,000 trades produced into librdkafka's mock cluster (its own
   process) first, all present at once, then one --once run with --kafka-reader python. The mock
   keeps only ~5 MB per partition and auto-creates 4 partitions per topic, so the trades are
   spread over --kafka-topics topics (20 x 4 partitions: ~12,500 trades, ~3.4 MB each); the job
   subscribes to all of them. The run checks that every trade was accepted exactly once.
3. Micro-batch latency (files): a writer drops a file every 0.5 s at 5,000 trades/s while the job
   runs with a 1 s trigger; latency of a micro-batch = outputs written - its oldest trade.
4. Whole pipeline (--pipeline-seconds > 0): fake exchange at 5,000 trades/s -> `marketd run`
   (ingest) -> Kafka mock cluster -> trade aggregation (Python source, 1 s trigger, watermark
   --pipeline-watermark-s) -> PostgreSQL. Latency of a 1-minute window = when its row first
   shows in PostgreSQL (polled every 0.1 s) - the window's end; the exchange stamps trades with
   its send time, so this is "last trade of the window sent -> window queryable".
Targets: >= 50,000 trades/s; p95 <= 5 s. The machine is shared and noisy: treat one run as an
order of magnitude. Usage: .venv/bin/python bench/spark_jobs.py [--pipeline-seconds 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPARK_DIR = Path(__file__).resolve().parents[1] / "spark"
sys.path.insert(0, str(SPARK_DIR))
sys.path.insert(0, str(SPARK_DIR.parent))
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
    print(f"throughput, files: {total:,} trades in {elapsed:.1f} s = "
          f"{total / elapsed:,.0f} trades/s "
          f"({proc.stats['windows_emitted']} windows emitted)")  # fmt: skip
    return total / elapsed


def produce(bootstrap: str, topics: list[str], total: int, t0_ms: int) -> None:
    import confluent_kafka

    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
         "queue.buffering.max.messages": 500_000}
    )  # fmt: skip
    chunk = 50_000
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        # The files run's layout: each 50,000 trades span one minute (same windows, same work).
        text = lines(first, n, t0_ms + (first // chunk) * 60_000, 60_000)
        for k, line in enumerate(text.splitlines()):
            topic = topics[(first + k) % len(topics)]
            while True:
                try:
                    producer.produce(topic, line.encode(), key=SYMBOLS[(first + k) % 3].encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(120) == 0, "trades still queued after 120 s"


def in_kafka(bootstrap: str, topics: list[str]) -> int:
    import confluent_kafka

    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "bench"})
    try:
        n = 0
        for t in topics:
            parts = consumer.list_topics(t, timeout=10).topics[t].partitions
            for p in parts:
                low, high = consumer.get_watermark_offsets(
                    confluent_kafka.TopicPartition(t, p), timeout=10, cached=False
                )
                n += high - low
        return n
    finally:
        consumer.close()


def kafka_throughput(
    spark, root: Path, bootstrap: str, total: int, n_topics: int, tag: str = "ktp"
) -> float:
    topics = [f"bench-{tag}-{i:02d}" for i in range(n_topics)]
    produce(bootstrap, topics, total, 1_767_225_600_000)
    present = in_kafka(bootstrap, topics)
    if present != total:
        raise SystemExit(
            f"only {present:,} of {total:,} trades are in Kafka (the mock keeps ~5 MB per "
            f"partition): use more --kafka-topics"
        )
    os.environ["TOPIC_RAW_TRADES"] = ",".join(topics)
    args = job.parse_args(
        [
            "--source", "kafka", "--kafka-reader", "python", "--kafka-bootstrap-servers",
            bootstrap, "--sink", "parquet", "--output", str(root / f"{tag}-out"),
            "--checkpoint", str(root / f"{tag}-ck"), "--once",
            "--max-offsets-per-trigger", str(max(total // 4, 1)),
        ]
    )  # fmt: skip
    values, proc = job.build(spark, args)
    began = time.perf_counter()
    q = start(spark, args, values, proc)
    q.awaitTermination()
    elapsed = time.perf_counter() - began
    assert q.exception() is None, q.exception()
    assert proc.stats["accepted"] == total, proc.stats  # every trade once, none lost or repeated
    if tag == "ktp":
        print(f"throughput, Kafka (Python source, {n_topics} topics x 4 partitions): {total:,} "
              f"trades in {elapsed:.1f} s = {total / elapsed:,.0f} trades/s "
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


def pipeline(bootstrap: str, rate: int, seconds: float, watermark_s: float) -> list[float]:
    """Fake exchange -> marketd -> Kafka -> trade aggregation (subprocess) -> PostgreSQL."""
    import psycopg

    sys.path.insert(0, str(SPARK_DIR.parent))
    from tests.support.exchange import fake_exchange
    from tests.support.postgres import PostgresProcess

    symbols = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT",
               "DOTUSDT", "LTCUSDT", "LINKUSDT"]  # fmt: skip
    topic = f"bench-pipeline-{int(time.time())}"
    pg = PostgresProcess().start()
    procs: list[subprocess.Popen[bytes]] = []
    seen: dict[tuple[str, int], float] = {}
    try:
        with fake_exchange("--symbols", ",".join(symbols), "--rate", str(rate)) as fx, \
                tempfile.TemporaryDirectory(prefix="marketd-bench-pipe-") as d:  # fmt: skip
            env = {**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING",
                   "BINANCE_WS_URL": fx.ws_url, "BINANCE_REST_URL": fx.http_url,
                   "BINANCE_STREAMS": ",".join(f"{s.lower()}@trade" for s in symbols),
                   "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TOPIC_RAW_TRADES": topic,
                   "MARKETD_COMPONENTS": "ingest", "SPOOL_DIR": f"{d}/spool"}  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-m", "marketd.cli", "run"], env=env,
                                          stderr=subprocess.DEVNULL))  # fmt: skip
            jenv = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
                    "TOPIC_RAW_TRADES": topic, "LOG_LEVEL": "WARNING"}  # fmt: skip
            procs.append(subprocess.Popen(
                [sys.executable, str(SPARK_DIR / "trade_aggregation.py"), "--source", "kafka",
                 "--kafka-reader", "python", "--kafka-bootstrap-servers", bootstrap,
                 "--watermark-seconds", str(watermark_s), "--trigger-seconds", "1",
                 "--intervals", "1m", "--sink", "postgres", "--dsn", pg.dsn(),
                 "--checkpoint", f"{d}/ck"], env=jenv,
                stderr=open(f"{d}/job.log", "w"),  # noqa: SIM115 - lives as long as the job
            ))  # fmt: skip
            began = time.time()
            while time.time() - began < seconds:
                time.sleep(0.1)
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{p.args[:3]} exited with {p.returncode}")
                try:
                    with psycopg.connect(pg.dsn(), connect_timeout=5) as conn:
                        rows = conn.execute(
                            "SELECT symbol, window_end FROM trade_aggregates WHERE interval='1m'"
                        ).fetchall()
                except psycopg.Error:
                    continue  # the job creates the table when it starts
                now = time.time()
                for sym, end in rows:
                    seen.setdefault((sym, end), now)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.close()
    # The first windows ever written include the job's start-up (JVM, first batch): skip the
    # windows that ended before the job had written anything.
    first_seen = min(seen.values(), default=0.0)
    lat = sorted(t - end / 1000 for (_, end), t in seen.items() if end / 1000 > first_seen)
    if not lat:
        print("pipeline: no 1-minute window closed after start-up; run longer")
        return []
    p95 = lat[int(0.95 * (len(lat) - 1))]
    print(f"pipeline latency at {rate:,} trades/s ({len(symbols)} symbols, watermark "
          f"{watermark_s:g} s): {len(lat)} windows, median {statistics.median(lat):.2f} s, "
          f"p95 {p95:.2f} s, max {max(lat):.2f} s")  # fmt: skip
    return lat


def main() -> None:
    from marketd.testing.kafka_cluster import KafkaClusterProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trades", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--kafka-topics", type=int, default=20)
    p.add_argument("--rate", type=int, default=5_000)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--pipeline-seconds", type=float, default=240.0, help="0 skips the pipeline")
    p.add_argument("--pipeline-watermark-s", type=float, default=1.0)
    a = p.parse_args()
    spark = get_session("bench-spark-jobs", "local[2]")
    with tempfile.TemporaryDirectory(prefix="marketd-bench-") as d, KafkaClusterProcess() as kc:
        throughput(spark, Path(d), 100_000, 2, tag="warmup")  # JIT and code generation
        kafka_throughput(spark, Path(d), kc.bootstrap_servers, 100_000, 2, tag="kwarmup")
        tp = throughput(spark, Path(d), a.trades, a.files)
        ktp = kafka_throughput(spark, Path(d), kc.bootstrap_servers, a.trades, a.kafka_topics)
        lat = latency(spark, Path(d), a.rate, a.seconds)
        spark.stop()
        pipe = (
            pipeline(kc.bootstrap_servers, a.rate, a.pipeline_seconds, a.pipeline_watermark_s)
            if a.pipeline_seconds > 0
            else []
        )
    p95 = sorted(lat)[int(0.95 * (len(lat) - 1))]
    print(f"targets: throughput >= 50,000 trades/s: files {'met' if tp >= 50_000 else 'MISSED'}, "
          f"Kafka {'met' if ktp >= 50_000 else 'MISSED'}; micro-batch p95 <= 5 s: "
          f"{'met' if p95 <= 5 else 'MISSED'}")  # fmt: skip
    if pipe:
        pp95 = pipe[int(0.95 * (len(pipe) - 1))]
        print(f"pipeline p95 <= 5 s: {'met' if pp95 <= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
