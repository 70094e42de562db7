"""The pure simulator: seeded tapes, aggregates, retention, kline windows and rolling stats."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.testing.fake_exchange.market import Market, Tape, spec_for
from marketd.testing.fake_exchange.stats import (
    KlineAcc,
    RollingWindow,
    kline_for,
    parse_tz,
    window_end,
    window_start,
)

US = 1_000_000


def _clock(start_us: int = 1_700_000_000 * US) -> list[int]:
    return [start_us]


def test_same_seed_same_tape_whatever_the_interleaving() -> None:
    now = _clock()
    a = Market(["BTCUSDT", "ETHUSDT"], seed=7, retention=10_000, clock_us=lambda: now[0])
    b = Market(["ETHUSDT", "BTCUSDT"], seed=7, retention=10_000, clock_us=lambda: now[0])
    a.generate("BTCUSDT", 300)
    b.generate("ETHUSDT", 50)
    b.generate("BTCUSDT", 300)
    ta, tb = a.tapes["BTCUSDT"], b.tapes["BTCUSDT"]
    assert ta.first_id == tb.first_id
    assert list(ta.price) == list(tb.price) and list(ta.qty) == list(tb.qty)
    c = Market(["BTCUSDT"], seed=8, retention=10_000, clock_us=lambda: now[0])
    c.generate("BTCUSDT", 300)
    assert list(c.tapes["BTCUSDT"].price) != list(ta.price)


def test_silent_symbol_has_no_tape() -> None:
    m = Market(["BTCUSDT", "MATICUSDT"], seed=1, retention=100, clock_us=lambda: 0)
    assert m.tape("MATICUSDT") is None and "MATICUSDT" in m.silent


def test_aggregates_partition_the_trades_at_one_price_and_side() -> None:
    tape = Tape(spec_for("BTCUSDT"), 3, 100_000, 1000)
    tape.generate(2000, 5 * US)
    covered = []
    for agg in range(tape.agg_base, tape.agg_end):
        first, last = tape.agg_range(agg)
        ids = range(first, last + 1)
        covered.extend(ids)
        idx = [i - tape.first_id for i in ids]
        assert len({tape.price[i] for i in idx}) == 1
        assert len({tape.maker[i] for i in idx}) == 1
        assert all(tape.agg_of_trade(i) == agg for i in ids)
    assert covered == list(range(tape.first_id, tape.end_id))


def test_prices_stay_on_tick_and_positive() -> None:
    spec = spec_for("SHIBUSDT")
    tape = Tape(spec, 1, 200_000, 1)
    tape.generate(100_000, 0)
    assert min(tape.price) >= spec.tick_e8
    assert all(p % spec.tick_e8 == 0 for p in tape.price)
    assert all(q % spec.lot_e8 == 0 and q > 0 for q in tape.qty)


def test_retention_keeps_the_newest_trades_and_whole_aggregates() -> None:
    tape = Tape(spec_for("ETHUSDT"), 1, 1000, 500)
    for t in range(50):
        tape.generate(100, t * US)
    assert 1000 <= len(tape.price) <= 1000 + 1024
    assert tape.end_id - tape.first_id == len(tape.price)
    assert tape.agg_first[0] >= tape.first_id
    first, _ = tape.agg_range(tape.agg_base)
    assert first >= tape.first_id


@pytest.mark.parametrize(
    ("interval", "t", "tz", "start", "end"),
    [
        ("1m", "2026-07-15 10:30:25", "0", "2026-07-15 10:30:00", "2026-07-15 10:31:00"),
        ("1h", "2026-07-15 10:30:25", "+08:00", "2026-07-15 10:00:00", "2026-07-15 11:00:00"),
        ("1d", "2026-07-15 10:30:25", "0", "2026-07-15 00:00:00", "2026-07-16 00:00:00"),
        # A UTC+8 day starts at 16:00 UTC the day before.
        ("1d", "2026-07-15 10:30:25", "+08:00", "2026-07-14 16:00:00", "2026-07-15 16:00:00"),
        ("1w", "2026-07-15 10:30:25", "0", "2026-07-13 00:00:00", "2026-07-20 00:00:00"),
        ("1M", "2026-12-31 23:59:59", "0", "2026-12-01 00:00:00", "2027-01-01 00:00:00"),
        ("1M", "2026-02-28 20:00:00", "+08:00", "2026-02-28 16:00:00", "2026-03-31 16:00:00"),
    ],
)
def test_kline_windows(interval: str, t: str, tz: str, start: str, end: str) -> None:
    def us(text: str) -> int:
        date, clock = text.split()
        fields = [*map(int, date.split("-")), *map(int, clock.split(":"))]
        return calendar.timegm((*fields, 0, 0, 0)) * US

    off = parse_tz(tz)
    s = window_start(interval, us(t), off)
    assert s == us(start)
    assert window_end(interval, s, off) == us(end)


def test_weekly_klines_open_on_monday() -> None:
    # Binance's REST example open time 1499040000000 is a Monday (docs/binance.md §4.3).
    assert window_start("1w", 1_499_040_000_000_000 + 3 * 86400 * US) == 1_499_040_000_000_000


def test_parse_tz_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_tz("+15:00")
    assert parse_tz("-5") == -5 * 3600 * US


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(0, 10**6))
def test_kline_fold_equals_brute_force(steps: list[int], seed: int) -> None:
    tape = Tape(spec_for("BTCUSDT"), seed, 10**6, 1)
    t = 0
    for n in steps:
        t += 137_000
        tape.generate(n, t)
    start, end = 200_000, 2_000_000
    k = kline_for(tape, start, end)
    idx = [i for i, ts in enumerate(tape.time_us) if start <= ts < end]
    if not idx:
        assert k.n == 0 and k.f == k.L == -1
        return
    prices = [tape.price[i] for i in idx]
    assert (k.o, k.c, k.h, k.l) == (prices[0], prices[-1], max(prices), min(prices))
    assert k.v == sum(tape.qty[i] for i in idx)
    assert k.q == sum(tape.price[i] * tape.qty[i] for i in idx)
    assert sum(tape.qty[i] for i in idx if not tape.maker[i]) == k.V
    assert (k.f, k.L, k.n) == (idx[0] + 1, idx[-1] + 1, len(idx))
    # Folding in pieces gives the same kline.
    i0, i1 = idx[0], idx[-1] + 1
    acc = KlineAcc(tape.price_before(i0))
    mid = (i0 + i1) // 2
    acc.fold(tape, i0, mid)
    acc.fold(tape, mid, i1)
    assert (acc.o, acc.h, acc.l, acc.c, acc.v, acc.q, acc.n) == (k.o, k.h, k.l, k.c, k.v, k.q, k.n)


def test_rolling_window_matches_brute_force_through_trims() -> None:
    tape = Tape(spec_for("ETHUSDT"), 5, 3000, 10)
    win = RollingWindow(tape)
    for step in range(1, 60):
        tape.generate(97, step * US)
        start = (step - 20) * US
        win.update(start)
        idx = [i for i, ts in enumerate(tape.time_us) if ts >= start]
        prices = [tape.price[i] for i in idx]
        assert win.count == len(idx)
        assert (win.h, win.l) == (max(prices), min(prices))
        assert win.v == sum(tape.qty[i] for i in idx)
        assert win.q == sum(tape.price[i] * tape.qty[i] for i in idx)
