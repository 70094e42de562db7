"""anomaly_detection on real Spark: hand-built spikes, jumps and whales, checked independently."""

from __future__ import annotations

import math
import statistics
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.spark.conftest import Feed, run_once, trade

pytestmark = [pytest.mark.spark, pytest.mark.redis]

M = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BASELINE, MIN_BASELINE = 10, 5
VOLUME_Z, PRICE_Z, VOL_RATIO = 3.0, 4.0, 5.0


def _trades() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tid = iter(range(1, 1_000_000))
    price = Decimal("100.00")
    for k in range(22):
        if k == 15:
            price = (price * Decimal("1.08")).quantize(Decimal("0.01"))  # the price jump
        qty = Decimal(1) + Decimal((k * 7) % 5) / 10
        if k == 12:
            qty = Decimal(10)  # the volume spike
        for j in range(4):
            p = price + Decimal(j % 2) * Decimal("0.05") + Decimal(k % 3) * Decimal("0.01")
            out.append(trade(next(tid), T0 + k * M + j * 9_000, str(p), str(qty), symbol="VOLUSDT"))
    for k in range(16):
        for j in range(10):
            qty = "1.2" if j == 0 else "1.0"
            out.append(trade(next(tid), T0 + k * M + j * 5_000, "10.00", qty, symbol="WHALEUSDT"))
        if k == 12:
            out.append(trade(777_777, T0 + k * M + 30_500, "10.00", "500", symbol="WHALEUSDT"))
    for k in range(8):
        out.append(trade(next(tid), T0 + k * M, "50.00", "1", symbol="ABSUSDT"))
        qty = "120" if k == 3 else "2"  # quote 6000 > the absolute 5000
        out.append(trade(888_000 + k, T0 + k * M + 1_000, "50.00", qty, symbol="ABSUSDT"))
    return out


def _window_level_expected(
    trades: list[dict[str, Any]], close_before: int
) -> set[tuple[str, str, int]]:
    """The documented window rules, restated: z-scores over the previous BASELINE windows."""
    found = set()
    for symbol in {t["symbol"] for t in trades}:
        mine = sorted(
            (t for t in trades if t["symbol"] == symbol),
            key=lambda t: (t["trade_time"], t["trade_id"]),
        )
        starts = sorted({t["trade_time"] // M * M for t in mine})
        starts = [s for s in starts if s + M <= close_before]
        history: list[tuple[float, float | None, float | None]] = []
        last_close: float | None = None
        prev_start: int | None = None
        for s in starts:
            if prev_start is not None:
                history += [(0.0, None, None)] * min((s - prev_start) // M - 1, BASELINE)
            base = history[-BASELINE:]
            w = [t for t in mine if s <= t["trade_time"] < s + M]
            vol = sum(Decimal(t["quantity"]) for t in w)
            quote = sum(Decimal(t["price"]) * Decimal(t["quantity"]) for t in w)
            prices = [Decimal(t["price"]) for t in w]
            close = float(w[-1]["price"])
            ret = math.log(close / last_close) if last_close else None
            rr = float((max(prices) - min(prices)) / (quote / vol))
            if len(base) >= MIN_BASELINE:
                vols = [b[0] for b in base]
                if statistics.pstdev(vols) > 0:
                    z = (float(vol) - statistics.fmean(vols)) / statistics.pstdev(vols)
                    if z >= VOLUME_Z:
                        found.add((symbol, "volume_spike", s))
                rets = [b[1] for b in base if b[1] is not None]
                if (
                    ret is not None
                    and len(rets) >= MIN_BASELINE
                    and statistics.pstdev(rets) > 0
                    and abs(ret - statistics.fmean(rets)) / statistics.pstdev(rets) >= PRICE_Z
                ):
                    found.add((symbol, "price_jump", s))
                rrs = [b[2] for b in base if b[2] is not None]
                if (
                    len(rrs) >= MIN_BASELINE
                    and statistics.fmean(rrs) > 0
                    and rr / statistics.fmean(rrs) >= VOL_RATIO
                ):
                    found.add((symbol, "volatility_change", s))
            history.append((float(vol), ret, rr))
            last_close, prev_start = close, s
    return found


def test_spikes_jumps_and_whales(spark: Any, feed: Feed, tmp_path: Path, redis_server: Any) -> None:
    from marketd_spark.jobs import anomaly_detection as job

    trades = _trades()
    cut1, cut2 = T0 + 9 * M + 20_000, T0 + 14 * M
    feed.add([t for t in trades if t["trade_time"] < cut1])
    feed.add([t for t in trades if cut1 <= t["trade_time"] < cut2])
    argv = [
        "--source", "files", "--input", str(feed.dir), "--max-files-per-trigger", "1",
        "--checkpoint", str(tmp_path / "ck"), "--watermark-seconds", "5",
        "--sink", "parquet", "--output", str(tmp_path / "out"),
        "--sink", "redis", "--redis-url", redis_server.url,
        "--baseline-windows", str(BASELINE), "--min-baseline-windows", str(MIN_BASELINE),
        "--volume-z", str(VOLUME_Z), "--price-z", str(PRICE_Z),
        "--volatility-ratio", str(VOL_RATIO), "--whale-percentile", "99",
        "--whale-min-trades", "50", "--whale-quote-abs-symbol", "ABSUSDT=5000",
    ]  # fmt: skip
    run_once(spark, job, argv)
    feed.add([t for t in trades if t["trade_time"] >= cut2])  # after a restart: same baselines
    run_once(spark, job, argv)

    rows = [r.asDict() for r in spark.read.parquet(str(tmp_path / "out")).collect()]
    close_before = max(t["trade_time"] for t in trades) - 5_000
    expected = _window_level_expected(trades, close_before)
    assert ("VOLUSDT", "volume_spike", T0 + 12 * M) in expected
    assert ("VOLUSDT", "price_jump", T0 + 15 * M) in expected
    got = {(r["symbol"], r["type"], r["window_start"]) for r in rows if r["type"] != "whale_trade"}
    assert got == expected

    whales = {r["trade_id"]: r for r in rows if r["type"] == "whale_trade"}
    assert set(whales) == {777_777, 888_003}
    w = whales[777_777]
    # Baseline quote values: 90% at 10.0, 10% at 12.0 -> the 99th percentile is 12.0, reported
    # as its histogram bin's upper edge (bins are 10^(1/100) wide).
    assert 12.0 <= w["threshold"] <= 12.0 * 10 ** (1 / 100)
    assert w["observed"] == 5000.0 and w["score"] == pytest.approx(5000.0 / w["threshold"])
    assert (w["window_start"], w["window_end"]) == (T0 + 12 * M, T0 + 13 * M)
    a = whales[888_003]
    assert (a["threshold"], a["baseline"], a["observed"]) == (5000.0, 5000.0, 6000.0)
    spike = next(r for r in rows if r["type"] == "volume_spike" and r["symbol"] == "VOLUSDT")
    assert spike["observed"] == 40.0 and spike["score"] >= VOLUME_Z and spike["detected_at"] > 0

    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        members = client.zrange("analytics:anomalies:WHALEUSDT", 0, -1)
    finally:
        client.close()
    assert any('"trade_id":777777' in m for m in members)
