"""TradeGate: order, de-duplication, backfill requests, gap records, bounded holding."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.ingest.continuity import (
    Emit,
    LostRange,
    PublishGap,
    RequestBackfill,
    TradeGate,
)
from marketd.metrics import MetricsFactory

S = "BTCUSDT"


def gate(**kw: Any) -> TradeGate[int]:
    kw.setdefault("gap_grace_s", 0.0)
    return TradeGate(wall_ms=lambda: 1_000, **kw)


def live(g: TradeGate[int], *ids: int, now: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for i in ids:
        out += g.on_live(S, i, i, trade_time_ms=i * 10, now=now)
    return out


def emitted(actions: list[Any]) -> list[int]:
    return [a.record for a in actions if isinstance(a, Emit)]


def requests(actions: list[Any]) -> list[RequestBackfill]:
    return [a for a in actions if isinstance(a, RequestBackfill)]


def gaps(actions: list[Any]) -> list[Any]:
    return [a.gap for a in actions if isinstance(a, PublishGap)]


def backfill(g: TradeGate[int], *ids: int) -> list[Any]:
    return g.on_backfill(S, [(i, i * 10, i) for i in ids])


def test_first_trade_and_successors_are_emitted_at_once() -> None:
    g = gate()
    assert emitted(live(g, 100, 101, 102)) == [100, 101, 102]
    assert g.last_id(S) == 102


def test_overlap_duplicates_are_dropped_and_counted() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    assert emitted(live(g, 1, 2, 3, 2, 3, 4, 1)) == [1, 2, 3, 4]
    assert (
        metrics.registry.get_sample_value(
            "marketd_overlap_duplicates_total", {"kind": "trades", "source": "live"}
        )
        == 3
    )


def test_jump_requests_exactly_the_missing_range_and_holds_later_trades() -> None:
    g = gate()
    live(g, 10, 11)
    out = live(g, 15, 16)
    assert emitted(out) == []
    assert requests(out) == [RequestBackfill(S, 12, 14, "trades", "id_jump")]
    assert g.held(S) == 2
    out = backfill(g, 12, 13, 14)
    assert [(a.record, a.backfill) for a in out if isinstance(a, Emit)] == [
        (12, True),
        (13, True),
        (14, True),
        (15, False),
        (16, False),
    ]
    (gap,) = gaps(out)
    assert (gap.from_id, gap.to_id, gap.repaired, gap.reason) == (12, 14, True, "id_jump")
    assert g.held(S) == 0


def test_backfill_pages_release_progressively() -> None:
    g = gate()
    live(g, 1, 10)
    assert emitted(backfill(g, 2, 3)) == [2, 3]
    assert emitted(backfill(g, 5, 4)) == [4, 5]
    assert emitted(backfill(g, 6, 7, 8, 9)) == [6, 7, 8, 9, 10]


def test_failed_backfill_publishes_an_unrepaired_gap_then_releases() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    live(g, 1, 2, 6, 7)
    out = g.on_backfill_failed(S, 3, 5, "rest_unavailable")
    (gap,) = gaps(out)
    assert (gap.from_id, gap.to_id, gap.repaired, gap.reason) == (3, 5, False, "rest_unavailable")
    assert (gap.from_time, gap.to_time, gap.stream, gap.kind) == (20, 60, "btcusdt@trade", "trades")
    assert emitted(out) == [6, 7]
    assert out.index(next(a for a in out if isinstance(a, PublishGap))) == 0
    assert (
        metrics.registry.get_sample_value(
            "marketd_gaps_total",
            {"kind": "trades", "reason": "rest_unavailable", "repaired": "false"},
        )
        == 1
    )
    # A late live copy of a lost id is a duplicate, never emitted out of order.
    assert emitted(live(g, 4, 8)) == [8]


def test_history_too_old_repairs_what_exists() -> None:
    g = gate()
    live(g, 100, 200)
    out = backfill(g, *range(150, 200))
    assert emitted(out) == []  # 101..149 still missing: nothing may pass them
    out = g.on_backfill_done(S, 101, 199, [LostRange(101, 149, "history_too_old")])
    (gap,) = gaps(out)
    assert (gap.from_id, gap.to_id, gap.reason, gap.repaired) == (
        101,
        149,
        "history_too_old",
        False,
    )
    assert emitted(out) == [*range(150, 201)]


def test_ids_missing_on_rest_too_are_released_as_a_gap() -> None:
    g = gate()
    live(g, 1, 6)
    out = backfill(g, 2, 3, 5)
    assert emitted(out) == [2, 3]
    out = g.on_backfill_done(S, 2, 5)
    assert [(x.from_id, x.to_id, x.reason) for x in gaps(out)] == [(4, 4, "not_on_rest")]
    assert emitted(out) == [5, 6]


def test_grace_lets_the_other_connection_fill_a_jump() -> None:
    g = gate(gap_grace_s=1.0)
    live(g, 1, 2, now=0.0)
    out = live(g, 5, now=0.1)
    assert requests(out) == []
    assert emitted(live(g, 3, 4, now=0.2)) == [3, 4, 5]
    assert g.tick(5.0) == []


def test_tick_requests_a_gap_once_the_grace_has_passed() -> None:
    g = gate(gap_grace_s=1.0)
    live(g, 1, 5, now=0.0)
    assert requests(g.tick(0.5)) == []
    assert requests(g.tick(1.0)) == [RequestBackfill(S, 2, 4, "trades", "id_jump")]
    assert g.tick(2.0) == []  # requested once


def test_after_reconnect_the_gap_is_requested_at_once() -> None:
    g = gate(gap_grace_s=30.0)
    live(g, 1, 2)
    g.on_reconnect()
    assert requests(live(g, 9)) == [RequestBackfill(S, 3, 8, "trades", "reconnect")]


def test_live_overlap_inside_a_requested_range_needs_no_backfill_record() -> None:
    g = gate()
    live(g, 1)
    (req,) = requests(live(g, 5))
    assert emitted(live(g, 2, 3, 4)) == [2, 3, 4, 5]
    out = backfill(g, 2, 3, 4) + g.on_backfill_done(S, req.from_id, req.to_id)
    assert out == []


def test_overflow_gives_up_the_oldest_gap_instead_of_growing() -> None:
    g = gate(max_held=3)
    live(g, 1, 5, 6, 7)
    out = live(g, 8)
    (gap,) = gaps(out)
    assert (gap.from_id, gap.to_id, gap.reason, gap.repaired) == (2, 4, "hold_overflow", False)
    assert emitted(out) == [5, 6, 7, 8]
    assert g.held(S) == 0
    assert emitted(backfill(g, 2, 3, 4)) == []


def test_agg_trade_gate_names_its_stream() -> None:
    g: TradeGate[int] = TradeGate(kind="agg_trades", gap_grace_s=0.0)
    g.on_live(S, 1, 1, now=0.0)
    out = g.on_live(S, 3, 3, now=0.0)
    assert requests(out)[0].kind == "agg_trades"
    (gap,) = gaps(g.on_backfill_failed(S, 2, 2, "rest_rejected"))
    assert gap.stream == "btcusdt@aggTrade"


# -- properties ------------------------------------------------------------------------------------


@st.composite
def two_connections(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], int]:
    """Two in-order streams over the same tape (each with its own holes) and an interleaving."""
    n = draw(st.integers(5, 120))
    a_start = draw(st.integers(0, n - 1))
    b_start = draw(st.integers(0, n - 1))
    a_drop = draw(st.sets(st.integers(0, n - 1), max_size=n // 3))
    b_drop = draw(st.sets(st.integers(0, n - 1), max_size=n // 3))
    a = [i for i in range(a_start, n) if i not in a_drop]
    b = [i for i in range(b_start, n) if i not in b_drop]
    order = draw(st.lists(st.booleans(), min_size=len(a) + len(b), max_size=len(a) + len(b)))
    merged: list[int] = []
    ia = ib = 0
    for take_a in order:
        if (take_a and ia < len(a)) or ib >= len(b):
            merged.append(a[ia])
            ia += 1
        else:
            merged.append(b[ib])
            ib += 1
    serve_every = draw(st.integers(1, 10))
    return a, b, merged, serve_every


def feed_and_serve(
    g: TradeGate[Any], live_ids: list[int], serve_every: int, *, fail: bool = False
) -> list[Any]:
    """Feed live ids; every `serve_every` trades answer the backfill requests made so far (with
    `fail`, those starting at an odd id fail as REST unavailable). Returns every action."""
    out: list[Any] = []
    queue: list[RequestBackfill] = []

    def serve() -> None:
        while queue:
            req = queue.pop(0)
            if fail and req.from_id % 2:
                out.extend(g.on_backfill_failed(S, req.from_id, req.to_id, "rest_unavailable"))
            else:
                ids = range(req.from_id, req.to_id + 1)
                out.extend(g.on_backfill(S, [(i, i, i) for i in ids]))
                out.extend(g.on_backfill_done(S, req.from_id, req.to_id))

    for k, trade_id in enumerate(live_ids):
        actions = g.on_live(S, trade_id, trade_id, now=0.0)
        out.extend(actions)
        queue += requests(actions)
        if k % serve_every == 0:
            serve()
    serve()
    return out


@settings(max_examples=300, deadline=None)
@given(case=two_connections(), fail=st.booleans())
def test_any_interleaving_gives_each_id_once_in_order(
    case: tuple[list[int], list[int], list[int], int], fail: bool
) -> None:
    _, _, merged, serve_every = case
    if not merged:
        return
    g = gate(max_held=10_000)
    out = feed_and_serve(g, merged, serve_every, fail=fail)

    first, top = merged[0], max(merged)
    covered: list[int] = []
    for action in out:
        if isinstance(action, Emit):
            covered.append(action.record)
        elif isinstance(action, PublishGap) and not action.gap.repaired:
            covered += range(action.gap.from_id, action.gap.to_id + 1)
    # Emitted ids and unrepaired gaps tile the tape exactly, in order, once.
    assert covered == list(range(first, top + 1))
    emitted_ids = emitted(out)
    assert emitted_ids == sorted(set(emitted_ids))
    if not fail:
        assert emitted_ids == list(range(first, top + 1))
    assert g.held(S) == 0


def test_flush_releases_everything_held_behind_gap_records() -> None:
    g = gate(gap_grace_s=10.0)
    live(g, 1, 4, 5, 9)
    out = g.flush()
    assert [(x.from_id, x.to_id, x.reason) for x in gaps(out)] == [
        (2, 3, "shutdown"),
        (6, 8, "shutdown"),
    ]
    assert emitted(out) == [4, 5, 9]
    assert g.held() == 0


# -- seeding at start-up ---------------------------------------------------------------------------


def test_a_seeded_symbol_continues_with_the_next_id() -> None:
    g = gate(gap_grace_s=30.0)
    g.seed(S, 100)
    out = live(g, 101, 102)
    assert emitted(out) == [101, 102]
    assert requests(out) == [] and gaps(out) == []


def test_a_seeded_symbol_backfills_what_the_restart_missed_at_once() -> None:
    g = gate(gap_grace_s=30.0)
    g.seed(S, 100)
    out = live(g, 105, 106)
    assert emitted(out) == []
    assert requests(out) == [RequestBackfill(S, 101, 104, "trades", "restart")]
    assert g.held(S) == 2
    out = backfill(g, 101, 102, 103, 104) + g.on_backfill_done(S, 101, 104)
    assert [(a.record, a.backfill) for a in out if isinstance(a, Emit)] == [
        (101, True),
        (102, True),
        (103, True),
        (104, True),
        (105, False),
        (106, False),
    ]
    assert [(x.from_id, x.to_id, x.reason, x.repaired) for x in gaps(out)] == [
        (101, 104, "restart", True)
    ]
    # Only the first jump after the seed is the restart's: later ones wait their grace.
    assert requests(live(g, 109)) == []
    assert requests(g.tick(30.0)) == [RequestBackfill(S, 107, 108, "trades", "id_jump")]


def test_a_seeded_symbol_drops_the_ids_already_published() -> None:
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    g.seed(S, 100)
    assert live(g, 98, 99, 100) == []
    assert emitted(live(g, 101)) == [101]
    assert (
        metrics.registry.get_sample_value(
            "marketd_overlap_duplicates_total", {"kind": "trades", "source": "live"}
        )
        == 3
    )


def test_duplicates_after_the_seed_do_not_end_the_restart() -> None:
    g = gate(gap_grace_s=30.0)
    g.seed(S, 100)
    live(g, 100)
    assert requests(live(g, 103)) == [RequestBackfill(S, 101, 102, "trades", "restart")]


def test_the_restart_gap_wins_over_a_reconnect_before_the_first_trade() -> None:
    g = gate(gap_grace_s=30.0)
    g.seed(S, 100)
    g.on_reconnect()
    assert requests(live(g, 103)) == [RequestBackfill(S, 101, 102, "trades", "restart")]


def test_a_restart_gap_rest_cannot_fill_is_recorded_then_the_tape_goes_on() -> None:
    g = gate()
    g.seed(S, 100)
    live(g, 105)
    out = g.on_backfill_failed(S, 101, 104, "history_too_old")
    assert [(x.from_id, x.to_id, x.reason, x.repaired) for x in gaps(out)] == [
        (101, 104, "history_too_old", False)
    ]
    assert emitted(out) == [105]


def test_a_restart_gap_open_at_shutdown_is_flushed_like_any_other() -> None:
    g = gate()
    g.seed(S, 100)
    live(g, 103, 104)
    out = g.flush()
    assert [(x.from_id, x.to_id, x.reason) for x in gaps(out)] == [(101, 102, "shutdown")]
    assert emitted(out) == [103, 104]


def test_unseeded_symbols_start_fresh() -> None:
    g = gate()
    g.seed(S, 100)
    assert emitted(g.on_live("ETHUSDT", 5_000, 5_000, now=0.0)) == [5_000]
    assert g.last_id("ETHUSDT") == 5_000
    assert g.last_id(S) == 100


def test_seeding_again_before_the_first_trade_keeps_the_higher_id() -> None:
    g = gate()
    g.seed(S, 100)
    g.seed(S, 90)
    g.seed(S, 120)
    assert g.last_id(S) == 120
    assert emitted(live(g, 110, 121)) == [121]


def test_a_symbol_can_only_be_seeded_before_its_first_trade() -> None:
    g = gate()
    live(g, 10)
    with pytest.raises(ValueError, match="already has trades"):
        g.seed(S, 100)
    g.seed("ETHUSDT", 7)
    g.on_live("ETHUSDT", 8, 8, now=0.0)
    with pytest.raises(ValueError, match="already has trades"):
        g.seed("ETHUSDT", 9)
    with pytest.raises(ValueError, match=">= 0"):
        g.seed("BNBUSDT", -1)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 50),
    ids=st.lists(st.integers(0, 120), max_size=80),
    serve_every=st.integers(1, 10),
)
def test_a_seeded_tape_continues_exactly_after_the_seed(
    seed: int, ids: list[int], serve_every: int
) -> None:
    # Live ids in any order, with repeats and ids the previous process already published.
    g = gate(max_held=10_000)
    g.seed(S, seed)
    out = feed_and_serve(g, ids, serve_every)
    top = max([seed, *ids])
    assert emitted(out) == list(range(seed + 1, top + 1))
    assert all(gap.repaired for gap in gaps(out))
    assert g.held(S) == 0


def test_a_live_tape_far_below_the_seed_is_a_new_tape_not_duplicates() -> None:
    # A test exchange restarted with another seed, a topic re-used across environments: Binance
    # never re-sends trades that old on a live connection.
    metrics = MetricsFactory()
    g = gate(metrics=metrics)
    g.seed(S, 5_000_000)
    assert emitted(live(g, 1_000, 1_001, 1_002)) == [1_000, 1_001, 1_002]
    assert requests(live(g, 1_003)) == []
    assert metrics.registry.get_sample_value("marketd_tape_resets_total", {"kind": "trades"}) == 1
