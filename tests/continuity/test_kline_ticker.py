"""KlineGate and TickerDedup: overlap de-duplication and missed closed klines."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from marketd.ingest.continuity import (
    Emit,
    KlineGate,
    LostRange,
    PublishGap,
    RequestKlines,
    TickerDedup,
)
from marketd.metrics import MetricsFactory

STREAM = "btcusdt@kline_1m"
MIN = 60_000


def kline(g: KlineGate[str], open_time: int, event_time: int, closed: bool = False) -> list[Any]:
    record = f"{open_time}/{event_time}/{closed}"
    return g.on_live(STREAM, "BTCUSDT", "1m", open_time, event_time, closed, record)


def test_the_second_connections_copy_is_dropped() -> None:
    g: KlineGate[str] = KlineGate()
    assert len(kline(g, 0, 2_000)) == 1
    assert kline(g, 0, 2_000) == []
    assert len(kline(g, 0, 4_000)) == 1


def test_updates_after_the_closed_kline_are_stale() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, 0, 60_001, closed=True)
    assert kline(g, 0, 58_000) == []  # the lagging connection's last open update
    assert len(kline(g, MIN, 62_000)) == 1


def test_reconnect_requests_the_closed_klines_that_were_due() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, 0, 60_001, closed=True)
    kline(g, MIN, 62_000)
    g.on_reconnect()
    out = kline(g, 4 * MIN, 4 * MIN + 2_000)
    assert out[0] == RequestKlines(STREAM, "BTCUSDT", "1m", 1, 4 * MIN - 1, "reconnect")
    assert isinstance(out[1], Emit)
    assert len(kline(g, 5 * MIN, 5 * MIN + 2_000)) == 1  # only the first kline after it checks


def test_reconnect_within_the_same_kline_requests_nothing() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, MIN, 62_000)
    g.on_reconnect(STREAM)
    assert [type(a) for a in kline(g, MIN, 70_000)] == [Emit]


def test_backfilled_klines_skip_those_already_closed_and_vice_versa() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, 0, 60_001, closed=True)
    out = g.on_backfill(STREAM, [(0, "rest0"), (MIN, "rest1")])
    assert [(a.record, a.backfill) for a in out] == [("rest1", True)]
    assert kline(g, MIN, 120_001, closed=True) == []


def test_lost_kline_ranges_become_gap_records() -> None:
    metrics = MetricsFactory()
    g: KlineGate[str] = KlineGate(metrics=metrics)
    req = RequestKlines(STREAM, "BTCUSDT", "1m", 0, 5 * MIN, "reconnect")
    (action,) = g.on_backfill_done(req, [LostRange(0, MIN, "rest_unavailable")])
    assert isinstance(action, PublishGap)
    assert (action.gap.kind, action.gap.stream, action.gap.repaired) == ("klines", STREAM, False)
    assert (
        metrics.registry.get_sample_value(
            "marketd_gaps_total",
            {"kind": "klines", "reason": "rest_unavailable", "repaired": "false"},
        )
        == 1
    )


def test_memory_is_bounded() -> None:
    g: KlineGate[str] = KlineGate(memory=8)
    for i in range(100):
        kline(g, i * MIN, i * MIN + 60_001, closed=True)
    state = g._state[STREAM]
    assert len(state.recent) <= 8
    assert len(state.closed) <= 8


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), max_size=60))
def test_each_key_is_emitted_at_most_once(keys: list[tuple[int, int]]) -> None:
    g: KlineGate[str] = KlineGate()
    out = []
    for open_i, ev in keys:
        out += [a.record for a in kline(g, open_i * MIN, open_i * MIN + ev) if isinstance(a, Emit)]
    assert len(out) == len(set(out))
    assert set(out) == {f"{o * MIN}/{o * MIN + e}/False" for o, e in keys}


def test_ticker_keeps_only_newer_snapshots_per_key() -> None:
    metrics = MetricsFactory()
    d = TickerDedup(metrics)
    assert d.admit("BTCUSDT", 1_000)
    assert not d.admit("BTCUSDT", 1_000)
    assert d.admit("BTCUSDT", 2_000)
    assert not d.admit("BTCUSDT", 999)
    assert not d.admit("BTCUSDT", 2_000)
    assert d.admit("ETHUSDT", 999)
    assert d.admit("BTCUSDT", 3_000)
    assert not d.admit("BTCUSDT", 1_500)
    assert (
        metrics.registry.get_sample_value(
            "marketd_overlap_duplicates_total", {"kind": "tickers", "source": "live"}
        )
        == 4
    )


def test_with_one_snapshot_kept_only_its_copy_is_dropped() -> None:
    # Nothing corroborates the first snapshot yet: it may be the one dated ahead.
    d = TickerDedup()
    assert d.admit("BTCUSDT", 1_000)
    assert not d.admit("BTCUSDT", 1_000)
    assert d.admit("BTCUSDT", 999)


@given(
    times=st.lists(st.integers(1, 10**6), min_size=1, max_size=60, unique=True).map(sorted),
    lag=st.integers(0, 5),
    order=st.integers(0, 2**120),
)
def test_overlapping_connections_give_snapshots_once_and_never_lose_the_newest(
    times: list[int], lag: int, order: int
) -> None:
    # Both connections carry the same snapshots in order; the second one starts `lag` behind.
    a, b = list(times), list(times[max(0, len(times) - lag - 5) :])
    merged: list[int] = []
    while a or b:
        take_a = bool(order & 1)
        order >>= 1
        merged.append(a.pop(0) if a and (take_a or not b) else b.pop(0))
    d = TickerDedup()
    admitted: list[int] = []
    newest = 0
    for t in merged:
        if d.admit("K", t):
            admitted.append(t)
        else:
            assert t <= newest  # a snapshot newer than all before it is never dropped
        newest = max(newest, t)
    assert len(admitted) == len(set(admitted))  # each at most once
    # Each one is newer than all but at most one kept before it (that one may be an outlier).
    for i, t in enumerate(admitted):
        assert sum(u > t for u in admitted[:i]) <= 1
    assert admitted[-1] == times[-1]


def test_gates_share_one_registry() -> None:
    metrics = MetricsFactory()
    KlineGate(metrics=metrics)
    TickerDedup(metrics)
    KlineGate(metrics=metrics)
