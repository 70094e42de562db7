"""BookSync against a reference model, through drops, duplicates, reorders, reconnects and stale
snapshots: whenever it says it is in sync, its book equals the exchange's at its update id
(inside its horizon), every applied diff continues the book, and memory stays bounded."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.books import (
    Applied,
    AuditDone,
    BookSync,
    Command,
    DepthUpdate,
    Level,
    OrderBook,
    RequestSnapshot,
    ResyncReason,
    SetInSync,
    SnapshotPurpose,
    compare,
)
from tests.books.helpers import SYM, top_snapshot

Side = dict[Decimal, str]


class Exchange:
    """The truth: a book evolving in steps of distinct level changes (bids 1..40, asks 41..80:
    never crossed), each step one diff event spanning 1..3 update ids."""

    def __init__(self, rng: random.Random, steps: int) -> None:
        self.rng = rng
        bids: Side = {Decimal(p): "1" for p in range(20, 41) if rng.random() < 0.7}
        asks: Side = {Decimal(p): "2" for p in range(41, 61) if rng.random() < 0.7}
        self.base_id = rng.randrange(1, 10**6)
        self.states: dict[int, tuple[Side, Side]] = {self.base_id: (dict(bids), dict(asks))}
        self.events: list[DepthUpdate] = []
        last = self.base_id
        for _ in range(steps):
            changes_b: list[Level] = []
            changes_a: list[Level] = []
            for side, lo, hi, out in ((bids, 1, 40, changes_b), (asks, 41, 80, changes_a)):
                for price in rng.sample(range(lo, hi + 1), rng.randint(0, 4)):
                    key = Decimal(price)
                    if key in side and rng.random() < 0.4:
                        del side[key]
                        out.append(Level(str(price), "0.000"))
                    else:
                        qty = f"{rng.randint(1, 9)}.{rng.randint(0, 99):02d}"
                        side[key] = qty
                        out.append(Level(f"{price}.0" if rng.random() < 0.5 else str(price), qty))
            first = last + 1
            last = first + rng.randint(0, 2)
            self.events.append(
                DepthUpdate(
                    symbol=SYM,
                    first_update_id=first,
                    last_update_id=last,
                    event_time_ms=first,
                    bids=tuple(changes_b),
                    asks=tuple(changes_a),
                )
            )
            self.states[last] = (dict(bids), dict(asks))

    def book_at(self, update_id: int) -> OrderBook:
        bids, asks = self.states[update_id]
        book = OrderBook(max_levels=10_000)
        book.load(top_snapshot(update_id, bids, asks, 10_000))
        return book


def check_equal(sync: BookSync, ex: Exchange) -> None:
    book = sync.book
    assert book.last_update_id is not None
    truth = ex.book_at(book.last_update_id)
    result = compare(book, truth, symbol=SYM)
    assert result.ok, result.sample
    assert not book.crossed()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    steps=st.integers(1, 120),
    drop=st.floats(0, 0.15),
    dup=st.floats(0, 0.15),
    swap=st.floats(0, 0.15),
    reconnect=st.floats(0, 0.05),
    stale=st.floats(0, 0.5),
    max_levels=st.integers(3, 40),
    limit=st.integers(2, 40),
    max_buffered=st.integers(1, 20),
)
def test_book_equals_the_exchange_whenever_in_sync(
    seed: int,
    steps: int,
    drop: float,
    dup: float,
    swap: float,
    reconnect: float,
    stale: float,
    max_levels: int,
    limit: int,
    max_buffered: int,
) -> None:
    rng = random.Random(seed)
    ex = Exchange(rng, steps)
    sync = BookSync(
        SYM,
        snapshot_limit=limit,
        max_levels=max_levels,
        snapshot_depth=min(3, limit),
        max_buffered=max_buffered,
        audit_max_events=50,
    )
    # The wire: events in order, with drops, duplicates and neighbours swapped.
    wire: list[int] = []
    for i in range(len(ex.events)):
        r = rng.random()
        if r < drop:
            continue
        wire.append(i)
        if r < drop + dup:
            wire.append(i)
    for k in range(len(wire) - 1):
        if rng.random() < swap:
            wire[k], wire[k + 1] = wire[k + 1], wire[k]

    pending: list[tuple[int, SnapshotPurpose]] = []  # (answer after this many deliveries, kind)
    position = ex.base_id  # the exchange's current id: the newest event put on the wire
    synced_at: int | None = None
    now = 0.0

    def handle(cmds: list[Command], delivered: int) -> None:
        nonlocal synced_at
        for cmd in cmds:
            if isinstance(cmd, RequestSnapshot):
                assert cmd.limit == limit
                pending.append((delivered + rng.randint(0, 4), cmd.purpose))
            elif isinstance(cmd, Applied):
                u = cmd.update
                assert synced_at is not None
                # Right after a sync the buffered diffs follow the snapshot (checked by the
                # equality below); after that each diff continues the previous one exactly.
                assert synced_at == -1 or u.first_update_id == synced_at + 1
                synced_at = u.last_update_id
            elif isinstance(cmd, SetInSync):
                synced_at = -1 if cmd.in_sync else None
            elif isinstance(cmd, AuditDone):
                assert cmd.result.ok, cmd.result.sample
        if sync.in_sync:
            check_equal(sync, ex)
        assert len(sync.book.bids) <= max_levels and len(sync.book.asks) <= max_levels
        assert sync.buffered <= max_buffered

    def answer_due(delivered: int) -> None:
        while pending and pending[0][0] <= delivered:
            _, purpose = pending.pop(0)
            at = position
            if rng.random() < stale:  # a lagging REST replica
                older = [i for i in ex.states if i <= position]
                at = rng.choice(sorted(older)[-8:])
            snapshot = top_snapshot(at, *ex.states[at], limit)
            if purpose is SnapshotPurpose.SYNC:
                handle(sync.on_snapshot(snapshot, now), delivered)
            else:
                handle(sync.on_audit_snapshot(snapshot, now), delivered)

    for n, i in enumerate(wire):
        event = ex.events[i]
        position = max(position, event.last_update_id)
        if rng.random() < reconnect:
            handle(sync.on_reconnect(now), n)
        if rng.random() < 0.05:
            handle(sync.start_audit(now), n)
        handle(sync.on_diff(event, now), n)
        answer_due(n)
    answer_due(10**9)
    if sync.in_sync:
        check_equal(sync, ex)
    note_event(f"applied>0: {sync.applied > 0}")
    note_event(f"resynced: {sum(sync.resyncs.values()) > 0}")
    note_event(f"audited: {sync.audits > 0}")
    assert sync.resyncs[ResyncReason.AUDIT_MISMATCH] == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(2, 80), cut=st.data())
def test_a_dropped_diff_is_always_detected(seed: int, steps: int, cut: st.DataObject) -> None:
    """Drop one diff from an otherwise perfect stream: the book never applies past the hole
    without a resync, whatever the dropped diff changed."""
    rng = random.Random(seed)
    ex = Exchange(rng, steps)
    sync = BookSync(SYM, snapshot_limit=100, max_levels=100)
    events = ex.events
    sync.on_diff(events[0], 0.0)
    sync.on_snapshot(
        top_snapshot(events[0].last_update_id, *ex.states[events[0].last_update_id], 100), 0.0
    )
    assert sync.in_sync
    k = cut.draw(st.integers(1, len(events) - 1))
    for i, event in enumerate(events[1:], start=1):
        if i == k:
            continue
        cmds = sync.on_diff(event, 0.0)
        if i == k + 1 or (k == len(events) - 1 and i > k):
            assert not sync.in_sync
            assert sync.resyncs[ResyncReason.GAP] == 1
            assert not any(isinstance(c, Applied) for c in cmds)
        if sync.in_sync:
            check_equal(sync, ex)
    if k < len(events) - 1:
        assert sync.resyncs[ResyncReason.GAP] == 1
