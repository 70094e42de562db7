"""Order-book benchmark: fake exchange (own process) -> marketd (own process) -> Kafka / Redis.

    .venv/bin/python bench/book.py                 # micro + max + paced (the three below)
    .venv/bin/python bench/book.py --runs micro    # BookKeeper.on_frame in this process
    .venv/bin/python bench/book.py --runs max      # one symbol, diff events as fast as read
    .venv/bin/python bench/book.py --runs paced    # 200 symbols x @depth@100ms, Redis writer
    .venv/bin/python bench/book.py --runs write    # the writer's Redis clients, per book

- `micro`: the depth path inside marketd without the WebSocket and Kafka: `BookKeeper.on_frame`
  (decode, validate, raw_depth record, apply, one board view per batch of 25 frames) over
  events of the fake exchange's own book generator (10-30 level changes each), µs of CPU per
  event; and the memory of books full
  to `book.max_levels` (RSS of this process before and after building them). With PYTHONPATH
  pointing at another tree it measures that tree's code.
- `max`: `marketd fake-exchange --depth-max` (one event per book step, as fast as the client
  reads) and `marketd run` (ingest + api for /metrics, the Kafka mock cluster hosted here like
  bench/ingest.py) on `btcusdt@depth@100ms`: events applied per second
  (marketd_book_updates_applied_total), raw_depth and book_snapshots records acknowledged
  (marketd_kafka_produced_total), depth gaps (records on the gaps topic, resyncs by reason: both
  must be 0), CPU seconds per 1,000 events, RSS.
- `paced`: 200 symbols x `@depth@100ms` at the real cadence (2,000 events/s), Redis (a
  redis-server started here) and the book writer: p99 of marketd_book_update_to_redis_seconds
  (from `BookView.received_at`, stamped by on_frame after the WebSocket receive, to the
  pipelined Redis write acknowledged) over the window, CPU per 1,000 events, RSS.
- `write` (not in the default set): the book writer's two Redis clients in this process against
  a redis-server started here, pipelines of `--batch` books (20 levels per side; ~34, the paced
  run's, by default) as the writer sends them: redis-py's `BookStore.write` in a worker thread
  and `NativeBookWrites` on the trio thread. µs of this process's CPU per book, of
  redis-server's CPU per book, and wall time per pipeline (p50 / p99).

The machine these run on is shared: figures taken while other work runs are loaded-machine
figures and are printed as such.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

# The repository at the END of sys.path: with PYTHONPATH pointing at another tree (an older
# commit), that tree's marketd is the one measured.
sys.path.append(str(Path(__file__).resolve().parent.parent))

DIFF_STREAM = "{}@depth@100ms"
# `python -m` puts its working directory first on sys.path: the daemon and the fake exchange
# run from a neutral one, so that PYTHONPATH (or else the installed tree) decides what runs.
_NEUTRAL_CWD = tempfile.gettempdir()


class Envelope(msgspec.Struct):
    stream: str
    data: msgspec.Raw


# -- micro: on_frame in this process --------------------------------------------------------------


def _frames(symbol: str, n: int, levels: int) -> tuple[dict[str, Any], list[bytes]]:
    """A snapshot of the fake exchange's book and the next `n` diff frames (combined-stream)."""
    from marketd.testing.fake_exchange.book import BookSim, merge_steps
    from marketd.testing.fake_exchange.frames import depth_book_dict, depth_diff_payload
    from marketd.testing.fake_exchange.market import spec_for

    t_us = 1_700_000_000_000_000
    sim = BookSim(spec_for(symbol), 7, start_us=t_us, levels=levels)
    bids, asks = sim.top(5000)
    snapshot = depth_book_dict(sim.last_id, bids, asks)
    out = []
    stream = DIFF_STREAM.format(symbol.lower()).encode()
    for _ in range(n):
        t_us += 100_000
        sim.generate(1, t_us)
        step = sim.history[-1]
        b, a = merge_steps([step])
        data = depth_diff_payload(symbol, step.first_id, step.last_id, b, a, t_us, 1000)
        out.append(b'{"stream":"%s","data":%s}' % (stream, data))
    return snapshot, out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def micro(n: int, books: int, max_levels: int) -> None:
    from marketd.books.board import BookBoard
    from marketd.books.keeper import BookKeeper, BookSettings
    from marketd.books.model import DepthSnapshot, Level, parse_snapshot
    from marketd.books.sync import BookSync
    from marketd.streams import parse_stream

    symbol = "BTCUSDT"
    snapshot, frames = _frames(symbol, n + 1, levels=1000)
    envs = [msgspec.json.decode(f, type=Envelope) for f in frames]
    spec = parse_stream(DIFF_STREAM.format(symbol.lower()))
    board = BookBoard()
    keeper = BookKeeper(
        [spec],
        settings=BookSettings(max_future_ms=10**15),
        board=board,
        clock=lambda: 0.0,
        monotonic=lambda: 0.0,
    )
    recv_ns = 1_700_000_000_000_000_000
    keeper.on_frame(spec, envs[0].data, recv_ns)
    sync = keeper.books[symbol]
    snap = parse_snapshot(snapshot, symbol=symbol, limit=5000)
    keeper._perform(sync, sync.on_snapshot(snap, 0.0), [], 0.0)
    assert sync.in_sync
    changes = (
        sum(
            len(msgspec.json.decode(bytes(e.data))["b"])
            + len(msgspec.json.decode(bytes(e.data))["a"])
            for e in envs[1:]
        )
        / n
    )
    datas = [e.data for e in envs[1:]]
    results = []
    for _ in range(5):  # best of 5 passes over fresh copies of the book: the least disturbed
        k2 = BookKeeper(
            [spec],
            settings=BookSettings(max_future_ms=10**15),
            board=board,
            clock=lambda: 0.0,
            monotonic=lambda: 0.0,
        )
        s2 = k2.books[symbol]
        k2.on_frame(spec, envs[0].data, recv_ns)
        k2._perform(s2, s2.on_snapshot(snap, 0.0), [], 0.0)
        c0 = time.process_time()
        for i, d in enumerate(datas):
            if i % 25 == 0:  # BookIntake's receive batches (~25 frames at max rate)
                k2.end_batch()
                board.take()
                k2.begin_batch()
            k2.on_frame(spec, d, recv_ns)
        k2.end_batch()
        results.append((time.process_time() - c0) / n * 1e6)
        assert s2.in_sync and s2.applied == n + 1
    print(
        f"micro: BookKeeper.on_frame, {n:,} diff events of {changes:.1f} level changes "
        f"(book ~{len(sync.book.bids)} levels/side): "
        f"{min(results):.1f} µs CPU per event best of 5 (all: "
        f"{', '.join(f'{r:.1f}' for r in results)}) -> {1e6 / min(results):,.0f} events/s per core"
    )

    # Memory of full books: `books` books of max_levels per side (8-decimal prices, distinct
    # quantity strings), built through BookSync as the keeper does.
    gc.collect()
    rss0 = _rss_mb()
    syncs = []
    for i in range(books):
        sym = f"S{i:03d}USDT"
        s = BookSync(sym, snapshot_limit=5000, max_levels=max_levels)
        mid = 100_000 + i
        bids = tuple(
            Level(f"{(mid - d) / 100:.8f}", f"{(d * 7919) % 100000 / 1000:.8f}")
            for d in range(1, max_levels + 1)
        )
        asks = tuple(
            Level(f"{(mid + d) / 100:.8f}", f"{(d * 104729) % 100000 / 1000:.8f}")
            for d in range(1, max_levels + 1)
        )
        s.book.load(DepthSnapshot(symbol=sym, last_update_id=1, bids=bids, asks=asks, limit=5000))
        # The parse cache fills as diffs come: count it full (max_levels + 1024 spellings).
        for side in (s.book.bids, s.book.asks):
            for lv in (bids if side.is_bid else asks)[:max_levels]:
                side.set(lv.price, lv.qty)
        syncs.append(s)
        del bids, asks
    gc.collect()
    rss1 = _rss_mb()
    per_book = (rss1 - rss0) / books if books else 0.0
    print(
        f"memory: {books} books x {max_levels} levels per side: RSS {rss0:.1f} -> {rss1:.1f} MB, "
        f"{per_book:.2f} MB per full book ({per_book * 2**20 / (2 * max_levels):.0f} B per level)"
    )


# -- write: the book writer's Redis clients --------------------------------------------------------


def _write_views(update_id: int, batch: int, symbols: int) -> list[Any]:
    from marketd.books.board import BookView
    from marketd.books.store import BookWrite

    out = []
    for k in range(batch):
        mid = 95_000 + (update_id + k) % 50
        bids = tuple((f"{mid - i * 0.01:.8f}", f"{1 + i * 0.137:.8f}") for i in range(20))
        asks = tuple((f"{mid + 1 + i * 0.01:.8f}", f"{2 + i * 0.071:.8f}") for i in range(20))
        view = BookView(
            symbol=f"B{(update_id * batch + k) % symbols:03d}USDT",
            last_update_id=update_id,
            event_time=1_700_000_000_000 + update_id,
            bids=bids,
            asks=asks,
            in_sync=True,
        )
        out.append(BookWrite(view))
    return out


def write_micro(passes: int, batch: int, symbols: int) -> None:
    import psutil  # type: ignore[import-untyped]
    import trio

    from marketd.books import store as book_store
    from marketd.tickers.redis_server import RedisProcess

    native_class = getattr(book_store, "NativeBookWrites", None)  # absent in older trees
    redis_proc = RedisProcess().start()
    server = psutil.Process(redis_proc._proc.pid)  # type: ignore[union-attr]
    try:
        for name in ("redis-py in a thread", "trio-native"):
            if name == "trio-native" and native_class is None:
                continue
            store = book_store.BookStore(redis_proc.url)
            pipelines = [_write_views(1_000 + i, batch, symbols) for i in range(passes)]

            async def run(
                store: Any = store, name: str = name, pipelines: list[Any] = pipelines
            ) -> list[float]:
                limiter = trio.CapacityLimiter(1)
                native = native_class(store.tcp_address()) if name == "trio-native" else None

                async def write(writes: list[Any]) -> None:
                    t = time.time_ns() // 1_000_000
                    if native is not None:
                        await native.write(writes, t, 60, 20)
                    else:
                        await trio.to_thread.run_sync(
                            store.write, writes, t, 60, 20, limiter=limiter
                        )

                await write(_write_views(1, batch, symbols))  # connect, load the script
                walls = []
                for writes in pipelines:
                    t0 = time.perf_counter()
                    await write(writes)
                    walls.append(time.perf_counter() - t0)
                if native is not None:
                    await native.close()
                return walls

            gc.collect()
            s0, c0 = server.cpu_times(), time.process_time()
            walls = sorted(trio.run(run))
            cpu, s1 = time.process_time() - c0, server.cpu_times()
            store.close()
            books = passes * batch
            server_cpu = (s1.user + s1.system) - (s0.user + s0.system)
            _print(
                f"write, {name}: {passes} pipelines of {batch} books, 20 levels per side",
                {
                    "us_cpu_per_book": cpu / books * 1e6,
                    "us_server_cpu_per_book": server_cpu / books * 1e6,
                    "pipeline_p50_ms": walls[len(walls) // 2] * 1000,
                    "pipeline_p99_ms": walls[int(len(walls) * 0.99)] * 1000,
                },
            )
    finally:
        redis_proc.stop()


# -- marketd runs ---------------------------------------------------------------------------------


def _start_exchange(symbols: list[str], *, depth_max: bool, levels: int) -> tuple[Any, str]:
    args = [
        sys.executable,
        "-m",
        "marketd.cli",
        "fake-exchange",
        "--port",
        "0",
        "--symbols",
        ",".join(symbols),
        "--seed",
        "7",
        "--book-levels",
        str(levels),
        "--weight-limit",
        "1000000",
        "--no-msg-limit",
    ]
    if depth_max:
        args.append("--depth-max")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=_NEUTRAL_CWD
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"ws=(\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"fake exchange did not start: {line!r}")
    return proc, m.group(1)


def _metrics(api_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def _sum(text: str, name: str, match: str = "") -> float:
    """Sum of the samples of metric `name` whose labels contain `match`."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if match in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def _buckets(text: str, name: str) -> dict[float, float]:
    """A histogram's cumulative counts by upper bound, summed over its other labels."""
    out: dict[float, float] = {}
    for m in re.finditer(
        rf'^{re.escape(name)}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', text, re.M
    ):
        le = float(m.group(1))
        out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def run_marketd(
    *,
    symbols: list[str],
    depth_max: bool,
    seconds: float,
    redis: bool,
    levels: int,
    env_extra: dict[str, str],
    sync_timeout_s: float = 120.0,
) -> dict[str, Any]:
    import psutil  # type: ignore[import-untyped]
    from ingest import window_quantile  # bench/ingest.py

    from marketd.kafka.client import EmbeddedCluster
    from marketd.tickers.redis_server import RedisProcess, free_port

    exchange, ws_url = _start_exchange(symbols, depth_max=depth_max, levels=levels)
    cluster = EmbeddedCluster()
    redis_proc = RedisProcess().start() if redis else None
    stamp = time.time_ns()
    topics = {
        "raw_depth": f"raw_depth_{stamp}",
        "book_snapshots": f"book_snapshots_{stamp}",
        "gaps": f"raw_gaps_{stamp}",
    }
    api_port = free_port()
    env = {
        **os.environ,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "MARKETD_COMPONENTS": "ingest,api",
        "API_PORT": str(api_port),
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap_servers,
        "BINANCE_WS_URL": ws_url,
        "BINANCE_REST_URL": ws_url.replace("ws://", "http://").removesuffix("/stream"),
        "BINANCE_STREAMS": ",".join(DIFF_STREAM.format(s.lower()) for s in symbols),
        "TOPIC_RAW_DEPTH": topics["raw_depth"],
        "TOPIC_BOOK_SNAPSHOTS": topics["book_snapshots"],
        "TOPIC_GAPS": topics["gaps"],
        "SPOOL_DIR": tempfile.mkdtemp(prefix="marketd-bench-book-spool-"),
        **env_extra,
    }
    if redis_proc is not None:
        env["REDIS_URL"] = redis_proc.url
    else:
        env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketd.cli", "run"],
        env=env,
        cwd=_NEUTRAL_CWD,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + sync_timeout_s
        while True:  # every book in sync (REST snapshots are paced by the weight budget)
            time.sleep(0.5)
            try:
                text = _metrics(api_port)
            except OSError:
                text = ""
            if text and _sum(text, "marketd_book_in_sync") >= len(symbols):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                in_sync = _sum(text, "marketd_book_in_sync") if text else 0
                raise SystemExit(f"books not in sync in time ({in_sync:.0f}/{len(symbols)})")
        time.sleep(2.0)  # warm up in sync
        m0 = _metrics(api_port)
        cpu0 = ps.cpu_times()
        t0 = time.monotonic()
        peak_rss = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            peak_rss = max(peak_rss, ps.memory_info().rss)
        time.sleep(1.1)  # the keeper exports its counters once a second
        m1 = _metrics(api_port)
        cpu1 = ps.cpu_times()
        elapsed = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
        exchange.terminate()
        exchange.wait(10)
        if redis_proc is not None:
            redis_proc.stop()
        cluster.close()

    def delta(name: str, match: str = "") -> float:
        return _sum(m1, name, match) - _sum(m0, name, match)

    applied = delta("marketd_book_updates_applied_total")
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    out: dict[str, Any] = {
        "applied_per_s": applied / elapsed,
        "raw_depth_acked_per_s": delta(
            "marketd_kafka_produced_total", f'topic="{topics["raw_depth"]}"'
        )
        / elapsed,
        "book_snapshots_acked": delta(
            "marketd_kafka_produced_total", f'topic="{topics["book_snapshots"]}"'
        ),
        "gap_records_total": _sum(m1, "marketd_kafka_produced_total", f'topic="{topics["gaps"]}"'),
        "resyncs_total": _sum(m1, "marketd_book_resyncs_total"),
        "duplicates_total": _sum(m1, "marketd_book_duplicate_diffs_total"),
        "rejected_total": _sum(m1, "marketd_book_rejected_total"),
        "cpu_s_per_1k_events": cpu / applied * 1000 if applied else float("nan"),
        "cpu_util": cpu / elapsed,
        "peak_rss_mb": peak_rss / 2**20,
    }
    if redis:
        b0 = _buckets(m0, "marketd_book_update_to_redis_seconds")
        b1 = _buckets(m1, "marketd_book_update_to_redis_seconds")
        out["redis_p50_ms"] = window_quantile(b0, b1, 0.5) * 1000
        out["redis_p99_ms"] = window_quantile(b0, b1, 0.99) * 1000
        out["redis_writes"] = delta("marketd_book_redis_writes_total")
        w0 = _buckets(m0, "marketd_book_redis_write_seconds")
        w1 = _buckets(m1, "marketd_book_redis_write_seconds")
        pipelines = (max(w1.values()) if w1 else 0.0) - (max(w0.values()) if w0 else 0.0)
        out["redis_pipelines_per_s"] = pipelines / elapsed
        out["redis_pipeline_p50_ms"] = window_quantile(w0, w1, 0.5) * 1000
        out["redis_pipeline_p99_ms"] = window_quantile(w0, w1, 0.99) * 1000
    return out


def _print(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}")
    for k, v in result.items():
        print(f"  {k:24} {v:,.3f}" if isinstance(v, float) else f"  {k:24} {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="micro,max,paced", help="of micro,max,paced,write")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--events", type=int, default=20_000, help="micro: diff events")
    parser.add_argument("--books", type=int, default=200, help="micro: full books for memory")
    parser.add_argument("--max-levels", type=int, default=5000)
    parser.add_argument("--symbols", type=int, default=200, help="paced: symbols")
    parser.add_argument("--passes", type=int, default=300, help="write: pipelines per client")
    parser.add_argument("--batch", type=int, default=34, help="write: books per pipeline")
    args = parser.parse_args()
    import trio

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, trio {trio.__version__}; "
        f"load average {os.getloadavg()[0]:.2f} at start. The machine is shared: these are "
        "loaded-machine figures unless it was idle."
    )
    runs = args.runs.split(",")
    if "micro" in runs:
        micro(args.events, args.books, args.max_levels)
    if "write" in runs:
        write_micro(args.passes, args.batch, args.symbols)
    if "max" in runs:
        result = run_marketd(
            symbols=["BTCUSDT"],
            depth_max=True,
            seconds=args.seconds,
            redis=False,
            levels=200,
            env_extra={},
        )
        _print("max rate, 1 symbol btcusdt@depth@100ms, --depth-max (no Redis):", result)
    if "paced" in runs:
        symbols = [f"B{i:03d}USDT" for i in range(args.symbols)]
        result = run_marketd(
            symbols=symbols,
            depth_max=False,
            seconds=args.seconds,
            redis=True,
            levels=200,
            # 100-level snapshots (weight 5) so that 200 books sync in ~25 s at the default
            # snapshot budget (book.snapshot_weight_per_min 2400).
            env_extra={"BOOK_SNAPSHOT_LIMIT": "100"},
            sync_timeout_s=180.0,
        )
        _print(f"paced, {len(symbols)} symbols x @depth@100ms, Redis writer:", result)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
