"""One corrupt value never makes a gate discard the valid data after it (issue 9, item 6)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.ingest.continuity import (
    ID_STEP_BASE,
    TAPE_RESET_IDS,
    Emit,
    KlineGate,
    PublishGap,
    Quarantine,
    RequestBackfill,
    TickerDedup,
    TradeGate,
)
from marketd.metrics import MetricsFactory
from tests.continuity.test_trade_gate import S, emitted, feed_and_serve, gaps, requests

# -- trades and aggTrades -------------------------------------------------------------------------


def gate(kind: str = "trades", **kw: Any) -> TradeGate[int]:
    kw.setdefault("gap_grace_s", 0.0)
    return TradeGate(kind=kind, wall_ms=lambda: 1_000, **kw)


def live(g: TradeGate[int], *ids: int, now: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for i in ids:
        out += g.on_live(S, i, i, trade_time_ms=i, now=now)
    return out


def quarantined(actions: list[Any]) -> list[int]:
    return [a.record for a in actions if isinstance(a, Quarantine)]


def outliers(metrics: MetricsFactory, outcome: str, kind: str = "trades") -> float | None:
    return metrics.registry.get_sample_value(
        "marketd_gate_outliers_total", {"kind": kind, "outcome": outcome}
    )


def test_a_huge_id_jump_is_quarantined_and_the_tape_goes_on() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    live(g, 100, 101)
    out = live(g, 10**12, 102, 103, 104)
    assert emitted(out) == [102, 103, 104]
    assert quarantined(out) == [10**12]
    (q,) = [a for a in out if isinstance(a, Quarantine)]
    assert "far above" in q.detail and "102" in q.detail
    assert requests(out) == [] and gaps(out) == []
    assert g.last_id(S) == 104 and g.held(S) == 0 and g.missing(S) == []
    assert outliers(metrics, "quarantined") == 1


def test_a_huge_agg_trade_id_jump_is_quarantined_too() -> None:
    g = gate("agg_trades")
    live(g, 7, 8)
    out = live(g, 2**62, 9, 10)
    assert emitted(out) == [9, 10] and quarantined(out) == [2**62]
    assert requests(out) == []


def test_an_id_far_below_the_tape_is_quarantined_not_a_new_tape() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    live(g, 5_000_000, 5_000_001)
    out = live(g, 3, 5_000_002)
    assert emitted(out) == [5_000_002] and quarantined(out) == [3]
    assert not metrics.registry.get_sample_value("marketd_tape_resets_total", {"kind": "trades"})


def test_a_corrupt_first_trade_is_followed_by_a_reset_to_the_real_tape() -> None:
    # Nothing to compare the very first trade with: it is published, and the real tape far
    # below it resets the symbol once a second trade confirms it.
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    out = live(g, 10**12, 5_000, 5_001, 5_002)
    assert emitted(out) == [10**12, 5_000, 5_001, 5_002]
    assert requests(out) == [] and quarantined(out) == []
    assert metrics.registry.get_sample_value("marketd_tape_resets_total", {"kind": "trades"}) == 1


def test_a_corrupt_low_first_trade_does_not_ask_rest_for_the_ids_up_to_the_real_tape() -> None:
    g = gate()
    out = live(g, 0, 5_000_000_000, 5_000_000_001)
    assert emitted(out) == [0, 5_000_000_000, 5_000_000_001]
    assert requests(out) == []


def test_a_real_jump_is_confirmed_by_the_next_trade_and_backfilled() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    g.seed(S, 100)  # a restart after a long stop: many trades since the seed
    jump = 100 + ID_STEP_BASE + 50_000
    assert live(g, jump) == []  # aside until the next trade says
    out = live(g, jump + 1)
    assert requests(out) == [RequestBackfill(S, 101, jump - 1, "trades", "restart")]
    assert g.held(S) == 2 and quarantined(out) == []
    assert outliers(metrics, "confirmed") == 1


def test_the_time_since_the_last_trade_makes_a_reconnects_jump_plausible() -> None:
    g = gate()
    live(g, 1, 2, now=0.0)
    g.on_reconnect()
    jump = 2 + ID_STEP_BASE + 500_000  # 10 s of trades at 50k/s
    out = live(g, jump, now=10.0)
    assert requests(out) == [RequestBackfill(S, 3, jump - 1, "trades", "reconnect")]


def test_the_other_connections_copy_of_a_suspect_decides_nothing() -> None:
    g = gate()
    live(g, 10, 11)
    assert live(g, 10**9, 10**9) == []
    out = live(g, 12)
    assert emitted(out) == [12] and quarantined(out) == [10**9]


def test_duplicates_while_a_suspect_waits_are_still_dropped() -> None:
    g = gate()
    live(g, 10, 11, 12)
    assert live(g, 10**9, 11, 12) == []
    out = live(g, 13)
    assert emitted(out) == [13] and quarantined(out) == [10**9]


def test_two_outliers_in_a_row_are_both_quarantined() -> None:
    g = gate()
    live(g, 10, 11)
    out = live(g, 10**9, 10**15, 12, 13)
    assert quarantined(out) == [10**9, 10**15] and emitted(out) == [12, 13]


def test_a_suspect_still_waiting_at_shutdown_is_quarantined() -> None:
    g = gate()
    live(g, 10)
    live(g, 10**9)
    out = g.flush()
    assert quarantined(out) == [10**9]
    (q,) = [a for a in out if isinstance(a, Quarantine)]
    assert "shutdown" in q.detail


def test_a_new_tape_gives_up_the_old_ones_holes_and_ignores_their_late_backfill() -> None:
    g = gate()
    live(g, 1_000_000, 1_000_005)  # 1_000_001..1_000_004 requested
    out = live(g, 7, 8)
    assert [(x.from_id, x.to_id, x.reason, x.repaired) for x in gaps(out)] == [
        (1_000_001, 1_000_004, "tape_reset", False)
    ]
    assert emitted(out) == [1_000_005, 7, 8]
    late = g.on_backfill(S, [(1_000_001, 0, 1_000_001)])
    assert late == [] and g.held(S) == 0
    assert g.on_backfill_done(S, 1_000_001, 1_000_004) == []
    assert emitted(live(g, 9)) == [9]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(5, 120),
    drop=st.sets(st.integers(0, 119), max_size=30),
    at=st.integers(1, 119),
    outlier=st.sampled_from([10**12, 2**63 - 1, -1, 3 * TAPE_RESET_IDS]),
    serve_every=st.integers(1, 10),
)
def test_one_outlier_anywhere_changes_nothing_but_itself(
    n: int, drop: set[int], at: int, outlier: int, serve_every: int
) -> None:
    base = 10 * TAPE_RESET_IDS  # the tape: base + 0..n-1; "-1" means far below it
    ids = [base + i for i in range(n) if i not in drop or i == 0]
    at = min(at, len(ids))
    bad = outlier if outlier != -1 else 5
    if bad == 3 * TAPE_RESET_IDS:
        bad = base - 3 * TAPE_RESET_IDS
    g = gate(max_held=10_000)
    out = feed_and_serve(g, [*ids[:at], bad, *ids[at:]], serve_every)
    out += g.flush()
    assert emitted(out) == list(range(ids[0], ids[-1] + 1))
    assert quarantined(out) == [bad]
    assert all(not isinstance(a, PublishGap) or a.gap.repaired for a in out)


# -- klines ---------------------------------------------------------------------------------------

STREAM = "btcusdt@kline_1m"
MIN = 60_000


def kline(
    g: KlineGate[str], open_time: int, event_time: int, closed: bool = False, tag: str = ""
) -> list[str]:
    record = f"{open_time}/{event_time}/{closed}{tag}"
    actions = g.on_live(
        STREAM,
        "BTCUSDT",
        "1m",
        open_time,
        event_time,
        closed,
        record,
        close_time=open_time + MIN - 1,
    )
    return [a.record for a in actions if isinstance(a, Emit)]


def test_a_premature_close_does_not_hold_back_the_rest_of_its_kline() -> None:
    g: KlineGate[str] = KlineGate()
    assert kline(g, MIN, MIN + 2_000)
    assert kline(g, MIN, MIN + 3_000, closed=True, tag="corrupt")  # published, not final
    assert kline(g, MIN, MIN + 4_000) == [f"{MIN}/{MIN + 4_000}/False"]
    assert kline(g, MIN, 2 * MIN + 1, closed=True) == [f"{MIN}/{2 * MIN + 1}/True"]
    assert kline(g, MIN, MIN + 5_000) == []  # the lagging connection after the real close


def test_a_close_dated_ahead_does_not_hold_back_the_real_close() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, MIN, MIN + 55_000)
    assert kline(g, MIN, 2 * MIN + 9_000, closed=True, tag="corrupt")
    assert kline(g, MIN, 2 * MIN + 3, closed=True) == [f"{MIN}/{2 * MIN + 3}/True"]
    assert kline(g, MIN, 2 * MIN + 5, closed=True) == []  # the other connection's later copy
    assert kline(g, 2 * MIN, 2 * MIN + 2_000) == [f"{2 * MIN}/{2 * MIN + 2_000}/False"]


def test_a_premature_close_does_not_move_the_reconnect_floor() -> None:
    g: KlineGate[str] = KlineGate()
    kline(g, 0, MIN + 1, closed=True)
    kline(g, 5 * MIN, 5 * MIN + 10, closed=True)  # corrupt: five minutes early
    g.on_reconnect()
    actions = g.on_live(
        STREAM, "BTCUSDT", "1m", 3 * MIN, 3 * MIN + 10, False, "x", close_time=4 * MIN - 1
    )
    assert [(a.start_ms, a.end_ms) for a in actions if not isinstance(a, Emit)] == [
        (1, 3 * MIN - 1)
    ]


# -- tickers --------------------------------------------------------------------------------------


def test_a_ticker_dated_ahead_does_not_silence_the_ones_after_it() -> None:
    d = TickerDedup()
    now = 1_800_000_000_000
    assert d.admit("BTCUSDT", now)
    assert d.admit("BTCUSDT", now + 1_000)
    assert d.admit("BTCUSDT", now + 9_999)  # corrupt, within the decoder's skew bound
    good = [now + 2_000 + i * 1_000 for i in range(30)]
    assert [d.admit("BTCUSDT", t) for t in good] == [True] * 30


def test_a_ticker_dated_ahead_as_the_very_first_does_not_silence_either() -> None:
    d = TickerDedup()
    now = 1_800_000_000_000
    assert d.admit("BTCUSDT", now + 9_500)
    assert all(d.admit("BTCUSDT", now + i * 1_000) for i in range(1, 20))


def test_copies_and_stale_tickers_are_still_dropped_around_an_outlier() -> None:
    metrics = MetricsFactory()
    d = TickerDedup(metrics)
    for t in (1_000, 2_000, 90_000, 3_000):
        assert d.admit("K", t)
    assert not d.admit("K", 3_000)  # the other connection's copy
    assert not d.admit("K", 2_500)  # older than the second newest kept
    assert not d.admit("K", 90_000)
    assert d.admit("K", 4_000)
    assert (
        metrics.registry.get_sample_value(
            "marketd_overlap_duplicates_total", {"kind": "tickers", "source": "live"}
        )
        == 3
    )
