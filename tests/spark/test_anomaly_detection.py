"""anomaly_detection: every anomaly type checked against tests/spark/reference.py's restatement.

The pure tests feed the detector closed windows built here from trades; the Spark tests run the
job (files source, two runs with a restart between) and compare every row with the reference.
"""

from __future__ import annotations

import random
import statistics
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.spark import reference
from tests.spark.conftest import SPARK_DIR, Feed, run_once, trade

assert SPARK_DIR  # puts spark/ on sys.path
from marketd_spark.anomalies import Detector, Rules, percentile_bin, trim_count, trimmed_z  # noqa: E402
from marketd_spark.windows import Tick, WindowAcc  # noqa: E402

M = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BASELINE, MIN_BASELINE = 10, 5
VOLUME_Z, PRICE_Z, VOL_RATIO = 3.0, 4.0, 5.0
WHALE_MINUTE, SPIKE_MINUTE = 25, 35


def _steady(
    whale_minute: int = WHALE_MINUTE, spike_minute: int | None = SPIKE_MINUTE
) -> list[dict[str, Any]]:
    """The issue's plain case: 45 minutes of one symbol, 50 trades a minute worth 2-3 quote each,
    one ~50,000 quote trade in whale_minute, and 20x the usual trades in spike_minute."""
    rng = random.Random(7)
    out: list[dict[str, Any]] = []
    tid = 1
    for k in range(45):
        n = 1_000 if k == spike_minute else 50
        for j in range(n):
            price = Decimal("100.00") + Decimal(rng.randint(-2, 2)) / 100
            qty = Decimal(rng.randint(200, 300)) / 10_000
            t = T0 + k * M + j * (M // n)
            out.append(trade(tid, t, str(price), str(qty), symbol="STEADYUSDT"))
            tid += 1
        if k == whale_minute:
            out.append(trade(999_999, T0 + k * M + 30_001, "100.00", "500", symbol="STEADYUSDT"))
    return out


def _windows(trades: list[dict[str, Any]], window_ms: int) -> list[tuple[str, int, WindowAcc]]:
    """Closed windows, as the Spark reducer hands them to the detector (all trades, top 20)."""
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in trades:
        by_key.setdefault((t["symbol"], t["trade_time"] // window_ms * window_ms), []).append(t)
    out = []
    for (symbol, start), ts in sorted(by_key.items()):
        ts.sort(key=lambda t: (t["trade_time"], t["trade_id"]))
        ticks = [Tick(t["trade_time"], t["trade_id"], Decimal(t["price"])) for t in ts]
        quotes = [(Decimal(t["price"]) * Decimal(t["quantity"]), t) for t in ts]
        hist: dict[int, int] = {}
        for q, _t in quotes:
            b = reference.quote_bin(q)
            hist[b] = hist.get(b, 0) + 1
        top = sorted(quotes, key=lambda p: (-p[0], p[1]["trade_id"]))[:20]
        acc = WindowAcc(
            count=len(ts),
            first=ticks[0],
            last=ticks[-1],
            high=max(k.price for k in ticks),
            low=min(k.price for k in ticks),
            volume=sum((Decimal(t["quantity"]) for t in ts), Decimal(0)),
            quote_volume=sum((q for q, _t in quotes), Decimal(0)),
            taker_buy_volume=Decimal(0),
            taker_sell_volume=Decimal(0),
            top=[(q, t["trade_id"], t["trade_time"]) for q, t in top],
            hist=hist,
        )
        out.append((symbol, start, acc))
    return out


def _detect(trades: list[dict[str, Any]], rules: Rules) -> list[dict[str, Any]]:
    detector = Detector(rules)
    rows: list[dict[str, Any]] = []
    for symbol, start, acc in _windows(trades, rules.window_ms):
        rows += detector.evaluate(symbol, start, acc, now_ms=1)
        # A restart between any two windows continues from the saved baselines.
        again = Detector(rules)
        again.load(detector.to_json())
        detector = again
    return rows


def _key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return (r["symbol"], r["type"], r["window_start"], r["trade_id"] or -1)


def _assert_rows_match(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert sorted(map(_key, got)) == sorted(map(_key, expected))
    want = {_key(r): r for r in expected}
    for r in got:
        e = want[_key(r)]
        assert r["window_end"] == e["window_end"]
        for col in ("observed", "baseline", "score", "threshold"):
            assert r[col] == pytest.approx(e[col], rel=1e-9), (_key(r), col)


def test_whale_in_minute_25_of_a_steady_series_is_reported() -> None:
    trades = _steady(spike_minute=None)
    rows = _detect(trades, Rules())
    whales = [r for r in rows if r["type"] == "whale_trade"]
    assert [(w["trade_id"], w["window_start"]) for w in whales] == [
        (999_999, T0 + WHALE_MINUTE * M)
    ]
    # 25 baseline windows of 50 trades: the 99.9th percentile is a 2-3 quote trade.
    assert 2.0 < whales[0]["threshold"] < 3.1 and whales[0]["observed"] == 50_000.0
    _assert_rows_match(rows, reference.anomalies(trades, close_before=T0 + 45 * M))


def test_volume_spike_ten_minutes_after_an_outlier_is_reported() -> None:
    trades = _steady()
    rows = _detect(trades, Rules())
    spikes = {r["window_start"] for r in rows if r["type"] == "volume_spike"}
    assert {T0 + WHALE_MINUTE * M, T0 + SPIKE_MINUTE * M} <= spikes
    _assert_rows_match(rows, reference.anomalies(trades, close_before=T0 + 45 * M))


def test_a_whale_early_in_the_series_waits_for_enough_baseline_trades() -> None:
    # Minute 15: 750 baseline trades < --whale-min-trades 1000, no absolute threshold.
    rows = _detect(_steady(whale_minute=15, spike_minute=None), Rules())
    assert [r for r in rows if r["type"] == "whale_trade"] == []
    rows = _detect(_steady(whale_minute=15, spike_minute=None), Rules(whale_min_trades=700))
    assert [r["trade_id"] for r in rows if r["type"] == "whale_trade"] == [999_999]


def test_trimmed_z_leaves_out_the_extreme_tenth_at_each_end() -> None:
    base = [10.0, 11.0, 9.0, 10.0, 10.5, 9.5, 10.0, 10.2, 9.8, 1000.0]  # k = 1
    assert trim_count(10) == 1 and trim_count(30) == 3 and trim_count(4) == 1
    assert trim_count(2) == 0 and trim_count(3) == 0
    mean, z = trimmed_z(20.0, base) or (0.0, 0.0)
    core = [9.5, 9.8, 10.0, 10.0, 10.0, 10.2, 10.5, 11.0]
    assert mean == pytest.approx(sum(core) / 8)
    # Normal data without 10% at each tail has 0.6616 of sigma (truncated at +-1.2816 sigma).
    sigma = statistics.pstdev(core) / 0.6616
    assert z == pytest.approx((20.0 - mean) / sigma, rel=1e-4) and z > 10
    assert trimmed_z(5.0, [2.0] * 9 + [3.0]) is None  # what is left is flat: no verdict


def test_percentile_bin_is_the_nearest_rank() -> None:
    hist = {100: 990, 107: 9, 300: 1}  # 1000 trades
    assert percentile_bin(hist, 99.0) == 100  # rank 990
    assert percentile_bin(hist, 99.9) == 107  # rank 999, not float-rounded past it
    assert percentile_bin(hist, 99.95) == 300


def _mixed() -> list[dict[str, Any]]:
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
            if k == 18 and j == 1:
                p = price * Decimal("1.03")  # the volatility change: a wide minute, same close
            out.append(trade(next(tid), T0 + k * M + j * 9_000, str(p), str(qty), symbol="VOLUSDT"))
    for k in range(16):
        for j in range(10):
            size = "1.2" if j == 0 else "1.0"
            out.append(trade(next(tid), T0 + k * M + j * 5_000, "10.00", size, symbol="WHALEUSDT"))
        if k == 12:
            out.append(trade(777_777, T0 + k * M + 30_500, "10.00", "500", symbol="WHALEUSDT"))
    for k in range(8):
        out.append(trade(next(tid), T0 + k * M, "50.00", "1", symbol="ABSUSDT"))
        size = "120" if k == 3 else "2"  # quote 6000 > the absolute 5000
        out.append(trade(888_000 + k, T0 + k * M + 1_000, "50.00", size, symbol="ABSUSDT"))
    return out


MIXED_RULES: dict[str, Any] = {
    "baseline_windows": BASELINE,
    "min_baseline_windows": MIN_BASELINE,
    "volume_z": VOLUME_Z,
    "price_z": PRICE_Z,
    "volatility_ratio": VOL_RATIO,
    "whale_percentile": 99.0,
    "whale_min_trades": 50,
}


def _expected_mixed(close_before: int) -> list[dict[str, Any]]:
    return reference.anomalies(
        _mixed(), close_before=close_before, whale_abs={"ABSUSDT": 5000.0}, **MIXED_RULES
    )


def test_every_type_in_the_mixed_tape_matches_the_reference() -> None:
    trades = _mixed()
    rules = Rules(**MIXED_RULES, whale_abs_by_symbol={"ABSUSDT": 5000.0})
    expected = _expected_mixed(close_before=T0 + 30 * M)
    kinds = {(r["symbol"], r["type"], r["window_start"]) for r in expected}
    assert {
        ("VOLUSDT", "volume_spike", T0 + 12 * M),
        ("VOLUSDT", "price_jump", T0 + 15 * M),
        ("VOLUSDT", "volatility_change", T0 + 18 * M),
        ("WHALEUSDT", "whale_trade", T0 + 12 * M),
        ("ABSUSDT", "whale_trade", T0 + 3 * M),
    } <= kinds
    _assert_rows_match(_detect(trades, rules), expected)


@pytest.mark.spark
@pytest.mark.redis
def test_job_reports_what_the_reference_finds(
    spark: Any, feed: Feed, tmp_path: Path, redis_server: Any
) -> None:
    from marketd_spark.jobs import anomaly_detection as job

    trades = _mixed()
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
    _assert_rows_match(rows, _expected_mixed(close_before))
    assert all(r["detected_at"] > 0 for r in rows)

    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        members = client.zrange("analytics:anomalies:WHALEUSDT", 0, -1)
    finally:
        client.close()
    assert any('"trade_id":777777' in m for m in members)


@pytest.mark.spark
def test_job_on_the_steady_series_reports_the_early_whale_and_the_later_spike(
    spark: Any, feed: Feed, tmp_path: Path
) -> None:
    from marketd_spark.jobs import anomaly_detection as job

    trades = _steady()
    feed.add(trades)
    argv = [
        "--source", "files", "--input", str(feed.dir), "--checkpoint", str(tmp_path / "ck"),
        "--sink", "parquet", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    run_once(spark, job, argv)
    rows = [r.asDict() for r in spark.read.parquet(str(tmp_path / "out")).collect()]
    got = {(r["type"], r["window_start"]) for r in rows}
    assert {
        ("whale_trade", T0 + WHALE_MINUTE * M),
        ("volume_spike", T0 + WHALE_MINUTE * M),
        ("volume_spike", T0 + SPIKE_MINUTE * M),
    } <= got
    close_before = max(t["trade_time"] for t in trades) - 10_000
    _assert_rows_match(rows, reference.anomalies(trades, close_before=close_before))
