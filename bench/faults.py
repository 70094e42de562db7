"""Fault benchmark: a long trade tape through disconnects, a rotation and a Kafka outage.

The fake exchange (own process, 10 trade streams at --rate) drops the connection every
--disconnect-every frames, sends one serverShutdown (a rotation) and, partway through, the Kafka
mock cluster (own process, `KafkaClusterProcess`) is SIGSTOPped for --outage-s, so `marketd run
--components ingest` (own process, spool in a temp dir) has to spool and replay. A consumer in
the bench reads the tape along (the mock cluster keeps only ~4-5 MB per partition) and checks
every id per symbol against the exchange's ledger. Prints: messages emitted (ledger), delivered,
backfilled, spooled, duplicates and gaps (target 0 and 0), the recovery time after each fault
(from the fault until the tape holds, without a hole, every id the ledger had when the fault
ended), peak RSS of marketd and peak spool size on disk.

    .venv/bin/python bench/faults.py                                   # 1M trades, ~4 min
    .venv/bin/python bench/faults.py --trades 60000 --outage-s 10 --disconnect-every 20000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import confluent_kafka
import msgspec
import psutil
import trio

from marketd.testing.fake_exchange.observer import keep_market_trading
from marketd.testing.kafka_cluster import KafkaClusterProcess
from marketd.testing.samples import BENCH_SYMBOLS
from marketd.verify import TapeEntry, TapeReport, analyze

SYMBOLS = list(BENCH_SYMBOLS)
POLL_S = 0.1
LEDGER_STILL_S = 1.5  # longer than the reconnect delay: a pending reconnect shows up in it


class _Trade(msgspec.Struct):
    symbol: str
    trade_id: int
    backfill: bool = False


_decode = msgspec.json.Decoder(_Trade).decode


@attrs.define
class Fault:
    kind: str
    started: float  # time.time() of the injection (or its detection, for drops)
    ended: float | None = None  # when the cause was gone (reconnected, resumed, old socket closed)
    target: dict[str, int] | None = None  # ledger last ids at `ended`
    caught_up: float | None = None  # tape held every id up to `target`, no hole


class TapeReader(threading.Thread):
    """Reads the trade topic along; per symbol the contiguous frontier; the report at the end."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-faults-{os.getpid()}-{time.time_ns()}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "fetch.queue.backoff.ms": 10,
            }
        )
        self.topic = topic
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.backfilled = 0
        self.frontier: dict[str, int] = {}  # highest id with every id from the first one read
        self._ahead: dict[str, set[int]] = {}  # ids read past a hole (a defect, or not yet)
        self.offset_skips = 0  # records the mock cluster deleted before we read them
        self._next_offset: dict[int, int] = {}
        self.waiting: list[Fault] = []
        self.report: TapeReport | None = None

    def run(self) -> None:
        try:
            self.report = analyze(self._entries(), self.topic)
        finally:
            self.consumer.close()

    def _assign(self) -> bool:
        try:
            md = self.consumer.list_topics(self.topic, timeout=2)
        except confluent_kafka.KafkaException:
            return False
        tmd = md.topics.get(self.topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            return False
        start = confluent_kafka.OFFSET_BEGINNING
        self.consumer.assign(
            [confluent_kafka.TopicPartition(self.topic, p, start) for p in tmd.partitions]
        )
        return True

    def _entries(self) -> Iterator[TapeEntry]:
        while not self._assign():  # the topic appears with marketd's first produce
            if self.stop.wait(0.2):
                return
        while not self.stop.is_set():
            batch = self.consumer.consume(10000, 0.1)
            for msg in batch:
                if msg.error() is not None:
                    continue
                p, offset = msg.partition(), msg.offset()
                expected = self._next_offset.get(p)
                if expected is not None and offset > expected:
                    self.offset_skips += offset - expected
                self._next_offset[p] = offset + 1
                rec = _decode(msg.value())
                self._advance(rec.symbol, rec.trade_id)
                if rec.backfill:
                    self.backfilled += 1
                self.count += 1
                yield TapeEntry(rec.symbol, rec.trade_id, rec.backfill)
            self._check_waiting()

    def _advance(self, symbol: str, trade_id: int) -> None:
        front = self.frontier.get(symbol)
        if front is None:
            self.frontier[symbol] = trade_id
            self._ahead[symbol] = set()
            return
        if trade_id != front + 1:
            if trade_id > front + 1:
                self._ahead[symbol].add(trade_id)
            return  # a duplicate (or a hole before it): the analysis counts it
        ahead = self._ahead[symbol]
        front = trade_id
        while front + 1 in ahead:
            front += 1
            ahead.discard(front)
        self.frontier[symbol] = front

    def _check_waiting(self) -> None:
        with self.lock:
            now = time.time()
            for fault in self.waiting:
                if (
                    fault.caught_up is None
                    and fault.target is not None
                    and self.reached(fault.target)
                ):
                    fault.caught_up = now
            self.waiting = [f for f in self.waiting if f.caught_up is None]

    def reached(self, target: dict[str, int]) -> bool:
        return all(self.frontier.get(s, -1) >= last for s, last in target.items())

    def wait_for(self, fault: Fault) -> None:
        with self.lock:
            self.waiting.append(fault)


class MarketClient(threading.Thread):
    """`keep_market_trading` for the whole run, in its own thread (the bench is threaded)."""

    def __init__(self, ws_url: str) -> None:
        super().__init__(daemon=True)
        self.ws_url = ws_url
        self.connected = threading.Event()

    def run(self) -> None:
        trio.run(self._main)

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_market_trading, self.ws_url, SYMBOLS)
            self.connected.set()


class Exchange:
    """`marketd fake-exchange` as a child process, and its admin API."""

    def __init__(self, rate: int, disconnect_every: int) -> None:
        args = [
            sys.executable,
            "-m",
            "marketd.cli",
            "fake-exchange",
            *("--port", "0", "--rate", str(rate), "--seed", "7"),
            *("--symbols", ",".join(SYMBOLS)),
        ]
        if disconnect_every:
            args += ["--drop-after", str(disconnect_every), "--drop-repeat"]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        ws, http = re.search(r"ws=(\S+)", line), re.search(r"http=(\S+)", line)
        if not (ws and http):
            self.proc.kill()
            raise SystemExit(f"fake exchange did not start: {line!r}")
        self.ws_url, self.http_url = ws.group(1), http.group(1)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/fake/stats")
        return result

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ledger_last(stats: dict[str, Any]) -> dict[str, int]:
    return {
        s: v["trade_ids"]["last"] for s, v in stats["ledger"]["symbols"].items() if v["trade_ids"]
    }


def ledger_first(stats: dict[str, Any]) -> dict[str, int]:
    return {
        s: v["trade_ids"]["first"] for s, v in stats["ledger"]["symbols"].items() if v["trade_ids"]
    }


def emitted(stats: dict[str, Any]) -> int:
    first, last = ledger_first(stats), ledger_last(stats)
    return sum(last[s] - first[s] + 1 for s in last)


def dir_bytes(path: Path) -> int:
    total = 0
    if path.is_dir():
        for p in path.iterdir():
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # a segment acked and deleted meanwhile
                continue
    return total


class Daemon:
    """`marketd run --components ingest` with JSON logs collected."""

    def __init__(self, env: dict[str, str], sets: list[str]) -> None:
        args = [sys.executable, "-m", "marketd.cli", "run"]
        for item in sets:
            args += ["--set", item]
        self.proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        self.ps = psutil.Process(self.proc.pid)

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.other.append(line.rstrip())

    def find(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def stop(self, timeout_s: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._collector.join(5)
        return code


def run(args: argparse.Namespace) -> dict[str, Any]:
    spool_dir = Path(args.spool_dir or tempfile.mkdtemp(prefix="marketd-bench-spool-"))
    topic = f"raw_trades_{time.time_ns()}"
    cluster = KafkaClusterProcess()
    exchange = Exchange(args.rate, args.disconnect_every)
    if args.market_keeps_trading:
        market = MarketClient(exchange.ws_url)
        market.start()
        market.connected.wait(10)
    env = {
        **os.environ,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "MARKETD_COMPONENTS": "ingest",
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
        "BINANCE_WS_URL": exchange.ws_url,
        "BINANCE_REST_URL": exchange.http_url,
        "BINANCE_STREAMS": ",".join(f"{s}@trade" for s in SYMBOLS),
        "TOPIC_RAW_TRADES": topic,
        "TOPIC_GAPS": f"{topic}_gaps",
        "SPOOL_DIR": str(spool_dir),
        "RECONNECT_MAX_DELAY_SECONDS": str(args.reconnect_max_delay_s),
    }
    sets = [f"spool.outage_after_s={args.outage_after_s}", *args.set]
    reader = TapeReader(cluster.bootstrap_servers, topic)
    reader.start()
    daemon = Daemon(env, sets)
    faults: list[Fault] = []
    peak_rss = peak_spool = 0
    outage: Fault | None = None
    rotation: Fault | None = None
    # The open drop: its fault, connections.total and the ledger when it came.
    open_drop: tuple[Fault, int, dict[str, int]] | None = None
    drops_seen = 0
    t0 = time.time()
    next_progress = t0 + args.progress_s
    try:
        while True:
            time.sleep(POLL_S)
            now = time.time()
            stats = exchange.stats()
            n = emitted(stats)
            last = ledger_last(stats)
            peak_rss = max(peak_rss, daemon.ps.memory_info().rss)
            peak_spool = max(peak_spool, dir_bytes(spool_dir))
            if daemon.proc.poll() is not None:
                raise SystemExit(f"marketd exited early with {daemon.proc.returncode}")
            conns = stats["connections"]
            drops = stats["faults_injected"].get("drop", 0)
            if drops > drops_seen:
                drops_seen = drops
                faults.append(Fault("disconnect", now))
                open_drop = (faults[-1], conns["total"], last)
            elif open_drop is not None:
                fault, total_then, at_drop = open_drop
                if conns["total"] > total_then and all(last[s] > at_drop.get(s, -1) for s in last):
                    # A new connection delivers: the ledger has what marketd must now hold.
                    fault.ended, fault.target = now, last
                    reader.wait_for(fault)
                    open_drop = None
            if rotation is None and n >= args.rotation_at * args.trades:
                rotation = Fault("rotation (serverShutdown)", now)
                faults.append(rotation)
                exchange.call("POST", "/fake/server-shutdown", {"close_after_s": 1.0})
            elif rotation is not None and rotation.ended is None and now >= rotation.started + 1.0:
                rotation.ended, rotation.target = now, last  # the old socket is closed by now
                reader.wait_for(rotation)
            if outage is None and args.outage_s > 0 and n >= args.outage_at * args.trades:
                outage = Fault(f"kafka outage {args.outage_s:g} s", now)
                faults.append(outage)
                cluster.pause()
            elif (
                outage is not None
                and outage.ended is None
                and now >= outage.started + args.outage_s
            ):
                cluster.resume()
                outage.ended, outage.target = time.time(), last
                reader.wait_for(outage)
            if now >= next_progress:
                next_progress = now + args.progress_s
                print(
                    f"  t+{now - t0:5.0f} s  emitted {n:>10,}  on tape {reader.count:>10,}  "
                    f"connections {conns['open']}/{conns['total']}  "
                    f"spool {dir_bytes(spool_dir) / 2**20:6.1f} MB"
                    + ("  [Kafka paused]" if cluster.paused else ""),
                    flush=True,
                )
            faults_done = (
                open_drop is None
                and (outage is None or outage.ended is not None)
                and (rotation is None or rotation.ended is not None)
            )
            if n >= args.trades and faults_done:
                break
            if now - t0 > args.max_seconds:
                print(f"giving up after {args.max_seconds:g} s with {n} emitted", file=sys.stderr)
                break
        if cluster.paused:
            cluster.resume()
        # Freeze the exchange (every connection stalls) so the ledger is final, then wait until
        # the tape holds all of it before stopping marketd.
        exchange.call(
            "POST",
            "/fake/faults",
            {"stall_after": 1, "stall_repeat": True, "drop_after": None},
        )
        before = exchange.stats()["ledger"]
        while True:
            time.sleep(LEDGER_STILL_S)
            stats = exchange.stats()
            if stats["ledger"] == before:
                break
            before = stats["ledger"]
        final = Fault("end of run", time.time(), time.time(), ledger_last(stats))
        reader.wait_for(final)
        deadline = time.time() + args.catch_up_s
        while final.caught_up is None and time.time() < deadline:
            time.sleep(POLL_S)
            peak_rss = max(peak_rss, daemon.ps.memory_info().rss)
            peak_spool = max(peak_spool, dir_bytes(spool_dir))
        code = daemon.stop()
        time.sleep(1.0)  # anything read after this would be a duplicate: give it time to arrive
    finally:
        reader.stop.set()
        reader.join(30)
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        exchange.close()
        cluster.close()
    assert reader.report is not None
    return {
        "stats": stats,
        "report": reader.report,
        "reader": reader,
        "daemon": daemon,
        "exit_code": code,
        "topic": topic,
        "faults": faults,
        "final": final,
        "peak_rss": peak_rss,
        "peak_spool": peak_spool,
        "spool_left": dir_bytes(spool_dir),
        "seconds": time.time() - t0,
        "t0": t0,
    }


def render(args: argparse.Namespace, r: dict[str, Any]) -> None:
    stats, report, reader, daemon = r["stats"], r["report"], r["reader"], r["daemon"]
    first, last = ledger_first(stats), ledger_last(stats)
    ledger_ids = emitted(stats)
    frames = sum(v["frames"].get("trade", 0) for v in stats["ledger"]["symbols"].values())
    unique = report.records - sum(s.duplicates for s in report.symbols.values())
    gaps = sum(len(s.gaps) for s in report.symbols.values())
    missing_inside = sum(s.missing for s in report.symbols.values())
    dups = sum(s.duplicates for s in report.symbols.values())
    edges: list[str] = []
    for sym in sorted(last):
        s = report.symbols.get(sym)
        if s is None:
            edges.append(f"{sym}: nothing on the tape")
        elif (s.first_id, s.last_id) != (first[sym], last[sym]):
            edges.append(
                f"{sym}: tape {s.first_id}..{s.last_id} vs ledger {first[sym]}..{last[sym]}"
            )
    replayed = sum(int(e.get("replayed", 0)) for e in daemon.find("spool.recovered"))
    stopped = daemon.find("ingest.stopped")
    summary = stopped[-1].get(r["topic"], "?") if stopped else "marketd logged no ingest.stopped"
    print(
        f"{args.trades:,} trades over {len(SYMBOLS)} symbols at {args.rate:,} msgs/s; "
        f"disconnect every {args.disconnect_every:,} frames, one rotation at "
        f"{args.rotation_at:.0%}, Kafka outage {args.outage_s:g} s at {args.outage_at:.0%} "
        f"(spool.outage_after_s={args.outage_after_s:g}); {r['seconds']:.0f} s wall"
    )
    rows = [
        ("messages emitted (ledger ids)", f"{ledger_ids:,}  (trade frames sent {frames:,})"),
        ("delivered (unique ids on tape)", f"{unique:,}  (records read {report.records:,})"),
        ("marketd accepted/delivered/failed", summary),
        ("backfilled (REST)", f"{reader.backfilled:,}"),
        (
            "spooled (replayed)",
            f"{replayed:,}  in {len(daemon.find('spool.outage'))} outage(s), "
            f"{len(daemon.find('spool.recovered'))} recovered",
        ),
        ("duplicates", f"{dups:,}"),
        ("gaps", f"{gaps:,}  ({missing_inside:,} ids missing between ids read)"),
        ("tape range = ledger range", "yes" if not edges else "NO: " + "; ".join(edges[:5])),
        ("not read (mock retention)", f"{reader.offset_skips:,}"),
        ("peak RSS marketd", f"{r['peak_rss'] / 2**20:.1f} MB"),
        (
            "peak spool on disk",
            f"{r['peak_spool'] / 2**20:.1f} MB (left at exit {r['spool_left']:,} B)",
        ),
        ("marketd exit code", str(r["exit_code"])),
    ]
    for k, v in rows:
        print(f"  {k:34} {v}")
    print("  recovery (fault -> tape holds every id the ledger had when the fault ended):")
    t0 = r["t0"]
    for f in [*r["faults"], r["final"]]:
        if f.kind == "end of run":
            took = "caught up" if f.caught_up is not None else "NOT caught up"
            detail = (
                f"{took} {f.caught_up - f.started:.2f} s after the freeze" if f.caught_up else took
            )
            print(f"    {'end of run':28} {detail}")
            continue
        at = f"t+{f.started - t0:6.1f} s"
        if f.caught_up is None:
            print(f"    {f.kind:28} {at}  never caught up")
            continue
        cause = f"{f.ended - f.started:.2f} s" if f.ended else "?"
        after = f"{f.caught_up - f.ended:.2f} s" if f.ended else "?"
        overlap = any(
            o.kind.startswith("kafka outage")
            and o is not f
            and o.ended is not None
            and o.started <= f.started <= o.ended
            for o in r["faults"]
        )
        print(
            f"    {f.kind:28} {at}  recovery {f.caught_up - f.started:6.2f} s "
            f"(fault lasted {cause}, caught up {after} after)"
            + ("  [during the Kafka outage]" if overlap else "")
        )
    for name in ("ws.disconnected", "ws.rotated", "backfill.lost", "spool.lost_at_shutdown"):
        if daemon.find(name):
            print(f"  marketd logged {name} x{len(daemon.find(name))}")
    errors = [e for e in daemon.events if e.get("level") in ("ERROR", "CRITICAL")]
    for e in errors[:10]:
        print(f"  marketd ERROR {json.dumps(e)[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades to emit in all")
    parser.add_argument("--rate", type=int, default=5000, help="trades/s over the 10 symbols")
    parser.add_argument("--disconnect-every", type=int, default=100_000, metavar="FRAMES")
    parser.add_argument("--rotation-at", type=float, default=0.25, metavar="FRACTION")
    parser.add_argument("--outage-s", type=float, default=30.0, help="Kafka paused this long")
    parser.add_argument("--outage-at", type=float, default=0.5, metavar="FRACTION")
    parser.add_argument("--outage-after-s", type=float, default=2.0, help="spool.outage_after_s")
    parser.add_argument(
        "--reconnect-max-delay-s",
        type=float,
        default=2.0,
        help="RECONNECT_MAX_DELAY_SECONDS for marketd (a drop every 20 s never lets the "
        "default backoff reset: binance.healthy_after_s is 60)",
    )
    parser.add_argument(
        "--no-market",
        dest="market_keeps_trading",
        action="store_false",
        help="no avgPrice subscriber: the exchange then trades nothing while marketd is away",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--spool-dir", help="default: a new temp dir")
    parser.add_argument("--catch-up-s", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--progress-s", type=float, default=10.0, help="progress line interval")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"confluent-kafka {confluent_kafka.__version__}, "
        f"librdkafka {confluent_kafka.libversion()[0]}"
    )
    result = run(args)
    print()
    render(args, result)


if __name__ == "__main__":
    main()
