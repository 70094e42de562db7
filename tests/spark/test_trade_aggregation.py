"""trade_aggregation end to end on real Spark: files source -> Parquet, PostgreSQL and Redis."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.spark import reference
from tests.spark.conftest import Feed, run_once, trade

pytestmark = [pytest.mark.spark, pytest.mark.postgres, pytest.mark.redis]

M = 60_000
INTERVALS = {"1m": M, "5m": 5 * M, "15m": 15 * M}
T0 = 1_767_225_540_000  # 2025-12-31T23:59:00Z: the first windows straddle a date partition


def _batches() -> list[list[dict[str, Any]]]:
    rnd = random.Random(7)
    tid = iter(range(1000, 100_000))

    def some(symbol: str, t: int, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            price = (
                f"{rnd.randint(99_000, 101_000) / 100:.2f}"
                if symbol == "BTCUSDT"
                else (f"{rnd.randint(1, 99_999_999) / 10**8:.8f}")
            )
            qty = f"{rnd.randint(1, 5_000_000) / 10**6:.6f}"
            out.append(trade(next(tid), t, price, qty, symbol=symbol, maker=rnd.random() < 0.5))
        return out

    b1: list[dict[str, Any]] = []
    for sym in ("BTCUSDT", "SHIBUSDT"):
        for t in range(T0, T0 + 170_000, 7_000):
            b1 += some(sym, t + rnd.randint(0, 999), 2)
        # Same trade time: open/close are decided by the trade id.
        b1 += some(sym, T0 + 5_000, 3)
    rnd.shuffle(b1)  # out of order within the batch
    b2 = some("BTCUSDT", T0 + 175_000, 3) + some("BTCUSDT", T0 + 195_000, 2)
    b2 += some("SHIBUSDT", T0 + 179_000, 2)  # within the watermark: window 2 still open
    # Late: minute 1 ended before the watermark (T0+185 s) -> dropped for 1m, kept for 5m/15m.
    b3 = some("BTCUSDT", T0 + 61_000, 2) + some("BTCUSDT", T0 + 200_000, 4)
    b3 += some("SHIBUSDT", T0 + 119_000, 1)
    return [b1, b2, b3]


def _rows_from_parquet(spark: Any, path: Path) -> list[dict[str, Any]]:
    df = spark.read.parquet(str(path))
    assert set(df.columns) >= set(reference._bar(("X", "1m", 0), M, [trade(1, 0, "1", "1")]))
    return [r.asDict() for r in df.collect()]


def _key(r: dict[str, Any]) -> tuple[str, str, int]:
    return (r["symbol"], r["interval"], r["window_start"])


def test_windows_late_data_restart_and_replay(
    spark: Any, feed: Feed, tmp_path: Path, postgres_dsn: str, redis_server: Any
) -> None:
    from marketd_spark.jobs import trade_aggregation as job

    batches = _batches()
    bad = [
        "not json",
        json.dumps(trade(1, T0, "1e5", "1")),  # exponent: not an exact decimal string
        {**trade(2, T0 + 1000, "100.00", "1"), "ingested_at": T0 - 60_000},  # from the future
    ]
    feed.add(batches[0] + bad)
    feed.add(batches[1])
    feed.add(batches[2])
    out = tmp_path / "out"
    argv = [
        "--source", "files", "--input", str(feed.dir), "--max-files-per-trigger", "1",
        "--checkpoint", str(tmp_path / "ck"), "--watermark-seconds", "10",
        "--sink", "parquet", "--output", str(out), "--sink", "postgres", "--dsn", postgres_dsn,
        "--sink", "redis", "--redis-url", redis_server.url,
    ]  # fmt: skip

    first = run_once(spark, job, argv)
    expected, late = reference.aggregate(batches, INTERVALS, 10_000)
    assert first.stats["rejected"] == {"invalid": 2, "future": 1}
    assert {tuple(k.split("|")): n for k, n in first.stats["late"].items()} == late
    assert late[("BTCUSDT", "1m")] == 2 and ("BTCUSDT", "5m") not in late

    rows = _rows_from_parquet(spark, out)
    assert sorted(map(_key, rows)) == sorted(expected)
    for r in rows:
        want = expected[_key(r)]
        assert {k: r[k] for k in want} == want, _key(r)

    # A crash after the last batch's outputs but before Spark committed it: drop the commit so
    # the restart replays that batch, then feed one more batch that closes every window.
    commits = sorted((tmp_path / "ck" / "spark" / "commits").glob("[0-9]*"))
    commits[-1].unlink()
    commits[-1].with_name(f".{commits[-1].name}.crc").unlink(missing_ok=True)
    b4 = [trade(900_001, T0 + 20 * M, "100.00", "1"), trade(900_002, T0 + 20 * M, "1.0", "2",
                                                            symbol="SHIBUSDT")]  # fmt: skip
    feed.add(b4)
    second = run_once(spark, job, argv)
    expected, late = reference.aggregate([*batches, b4], INTERVALS, 10_000)
    assert {tuple(k.split("|")): n for k, n in second.stats["late"].items()} == late

    rows = _rows_from_parquet(spark, out)
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "a window appears twice in the Parquet output"
    assert sorted(keys) == sorted(expected)
    for r in rows:
        want = expected[_key(r)]
        assert {k: r[k] for k in want} == want, _key(r)
    dates = {str(r["date"]) for r in rows}
    assert dates == {"2025-12-31", "2026-01-01"}

    with psycopg.connect(postgres_dsn) as conn:
        cur = conn.execute(
            "SELECT symbol, interval, window_start, window_end, open, high, low, close, volume,"
            " quote_volume, vwap, trades_count, taker_buy_volume, taker_sell_volume"
            " FROM trade_aggregates"
        )
        names = [d.name for d in cur.description or []]
        pg = {(r[0], r[1], r[2]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}
    assert pg == expected

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for (sym, label), start in {
            (k[0], k[1]): max(s for (s2, l2, s) in expected if (s2, l2) == (k[0], k[1]))
            for k in expected
        }.items():
            h = client.hgetall(f"analytics:agg:{sym}:{label}")
            assert int(h["window_start"]) == start
            assert Decimal(h["vwap"]) == expected[(sym, label, start)]["vwap"]
    finally:
        client.close()
