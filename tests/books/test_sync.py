"""BookSync, scenario by scenario: Binance's procedure, gaps, resyncs, periodic snapshots, audit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from marketd.books import (
    Applied,
    AuditDone,
    AuditSkipped,
    BookSync,
    Command,
    Level,
    Phase,
    PublishBook,
    PublishGap,
    RequestSnapshot,
    ResyncReason,
    SetInSync,
    SnapshotPurpose,
    SnapshotReason,
)
from tests.books.helpers import SYM, diff, snap


def kinds(cmds: Sequence[Command]) -> list[str]:
    return [type(c).__name__ for c in cmds]


def synced(**kw: int) -> BookSync:
    """A book in sync at update id 10: bids 100/99, asks 101/102."""
    s = BookSync(SYM, snapshot_limit=100, **kw)
    s.on_diff(diff(9, 10, bids=[("100", "1")]), 0.0)
    s.on_snapshot(
        snap(10, bids=[("100", "1"), ("99", "2")], asks=[("101", "1"), ("102", "2")]), 0.0
    )
    assert s.in_sync
    return s


def test_first_diff_asks_for_a_snapshot_with_its_weight() -> None:
    s = BookSync(SYM, snapshot_limit=5000)
    assert s.phase is Phase.WAITING and not s.in_sync
    cmds = s.on_diff(diff(5, 7), 0.0)
    assert cmds == [
        RequestSnapshot(symbol=SYM, limit=5000, weight=250, purpose=SnapshotPurpose.SYNC)
    ]
    assert s.on_diff(diff(8, 9), 0.0) == []  # buffered, no second request
    assert s.buffered == 2


def test_sync_drops_old_buffered_diffs_and_applies_the_rest() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(5, 7, bids=[("1", "1")]), 0.0)
    s.on_diff(diff(8, 9, bids=[("2", "2")]), 0.0)
    s.on_diff(diff(10, 12, bids=[("3", "3")], event_time_ms=77), 0.0)
    cmds = s.on_snapshot(snap(8, bids=[("1", "5")]), 0.0)
    # 5..7 discarded (u <= 8); 8..9 straddles the snapshot; 10..12 follows.
    assert kinds(cmds) == ["SetInSync", "Applied", "Applied", "PublishBook"]
    book = cmds[-1]
    assert isinstance(book, PublishBook) and book.reason is SnapshotReason.SYNCED
    assert book.view.last_update_id == 12 and book.view.event_time_ms == 77
    assert book.view.bids == (Level("3", "3"), Level("2", "2"), Level("1", "5"))
    assert book.view.in_sync


def test_snapshot_older_than_the_first_buffered_diff_is_refetched() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(20, 22), 0.0)
    cmds = s.on_snapshot(snap(18), 0.0)  # 19 is missing between snapshot and buffer
    assert kinds(cmds) == ["RequestSnapshot"] and not s.in_sync
    assert s.refetches[ResyncReason.STALE_SNAPSHOT] == 1
    assert kinds(s.on_snapshot(snap(19), 0.0))[0] == "SetInSync"
    assert s.book.last_update_id == 22


def test_snapshot_newer_than_every_buffered_diff() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(20, 22), 0.0)
    s.on_snapshot(snap(30, bids=[("1", "1")]), 0.0)
    assert s.in_sync and s.book.last_update_id == 30
    assert s.on_diff(diff(23, 26), 0.0) == []  # u <= 30: ignored
    assert kinds(s.on_diff(diff(27, 33), 0.0)) == ["Applied"]  # straddles 30
    assert kinds(s.on_diff(diff(34, 34), 0.0)) == ["Applied"]


def test_first_diff_after_the_snapshot_that_does_not_reach_it() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(20, 22), 0.0)
    s.on_snapshot(snap(30), 0.0)
    cmds = s.on_diff(diff(35, 36), 0.0)  # the stream went 22 -> 35: a gap
    assert kinds(cmds) == ["SetInSync", "RequestSnapshot"]
    assert s.resyncs[ResyncReason.GAP] == 1
    # A reconnect while the snapshot is on its way: the new stream cannot be compared with the
    # old, so a first diff beyond the snapshot is blamed on the snapshot.
    s.on_reconnect(0.0)
    s.on_snapshot(snap(40), 0.0)
    assert s.in_sync
    s.on_diff(diff(45, 46), 0.0)
    assert s.resyncs[ResyncReason.STALE_SNAPSHOT] == 1


@pytest.mark.parametrize(
    ("first", "last"),
    [(12, 12), (15, 20), (10, 11)],  # missed 11; missed 11..14; overlaps 10 (not previous u + 1)
)
def test_any_u_but_previous_plus_one_is_a_gap(first: int, last: int) -> None:
    s = synced()
    cmds = s.on_diff(diff(first, last), 1.0)
    assert cmds[0] == SetInSync(symbol=SYM, in_sync=False, reason=ResyncReason.GAP)
    assert isinstance(cmds[1], RequestSnapshot)
    assert s.resyncs[ResyncReason.GAP] == 1 and not s.in_sync
    # The diff after the hole is kept: a snapshot just before it completes the resync.
    cmds = s.on_snapshot(snap(first - 1 if first > 11 else last), 2.0)
    assert kinds(cmds)[:2] == ["SetInSync", "PublishGap"]
    gap = cmds[1]
    assert isinstance(gap, PublishGap) and gap.from_update_id == 11 and gap.repaired
    assert gap.reason is ResyncReason.GAP and gap.kind == "depth"
    assert isinstance(cmds[-1], PublishBook) and cmds[-1].reason is SnapshotReason.RESYNCED


def test_duplicates_are_ignored() -> None:
    s = synced()
    assert kinds(s.on_diff(diff(11, 12), 0.0)) == ["Applied"]
    assert s.on_diff(diff(11, 12), 0.0) == []
    assert s.on_diff(diff(9, 10), 0.0) == []
    assert s.ignored == 2 and s.in_sync


def test_crossed_book_resyncs() -> None:
    s = synced()
    cmds = s.on_diff(diff(11, 11, bids=[("101", "1")]), 0.0)
    assert kinds(cmds) == ["Applied", "SetInSync", "RequestSnapshot"]
    assert s.resyncs[ResyncReason.CROSSED] == 1
    # While out of sync the book is published without levels.
    view = s.view()
    assert not view.in_sync and view.bids == () and view.asks == ()


def test_crossed_snapshot_is_refetched() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(1, 1), 0.0)
    assert kinds(s.on_snapshot(snap(1, bids=[("5", "1")], asks=[("5", "1")]), 0.0)) == [
        "RequestSnapshot"
    ]
    assert s.refetches[ResyncReason.CROSSED] == 1


def test_refused_diff_resyncs() -> None:
    s = synced()
    cmds = s.on_bad_diff(0.0)
    assert cmds[0] == SetInSync(symbol=SYM, in_sync=False, reason=ResyncReason.BAD_LEVEL)


def test_reconnect_waits_for_the_new_stream_before_asking() -> None:
    s = synced()
    cmds = s.on_reconnect(0.0)
    assert kinds(cmds) == ["SetInSync"] and s.phase is Phase.WAITING
    assert kinds(s.on_diff(diff(40, 41), 0.0)) == ["RequestSnapshot"]
    cmds = s.on_snapshot(snap(40), 0.0)
    gap = next(c for c in cmds if isinstance(c, PublishGap))
    assert (gap.from_update_id, gap.to_update_id, gap.reason) == (11, 40, ResyncReason.RECONNECT)


def test_late_snapshot_is_ignored() -> None:
    s = synced()
    assert s.on_snapshot(snap(5), 0.0) == []
    assert s.book.last_update_id == 10


def test_buffer_is_bounded_and_keeps_the_newest() -> None:
    s = BookSync(SYM, max_buffered=3)
    for i in range(1, 11):
        s.on_diff(diff(i, i), 0.0)
    assert s.buffered == 3 and s.buffer_dropped == 7
    assert kinds(s.on_snapshot(snap(5), 0.0)) == ["RequestSnapshot"]  # 6, 7 are gone
    assert s.on_snapshot(snap(7), 0.0)[0] == SetInSync(symbol=SYM, in_sync=True, reason=None)
    assert s.book.last_update_id == 10


def test_hole_inside_the_buffer_restarts_it() -> None:
    s = BookSync(SYM)
    s.on_diff(diff(1, 1), 0.0)
    s.on_diff(diff(3, 3), 0.0)
    assert s.buffered == 1
    assert kinds(s.on_snapshot(snap(1), 0.0)) == ["RequestSnapshot"]


def test_periodic_snapshots_on_absolute_deadlines() -> None:
    s = BookSync(SYM, snapshot_interval_s=1.0)
    assert s.tick(5.0) == []  # never synced: nothing to publish
    s.on_diff(diff(1, 1), 0.0)
    s.on_snapshot(snap(1, bids=[("1", "1")]), 0.0)
    assert s.tick(0.5) == []
    (cmd,) = s.tick(1.0)
    assert isinstance(cmd, PublishBook) and cmd.reason is SnapshotReason.PERIODIC
    assert s.next_tick_at() == 2.0
    s.tick(10.3)  # late: the next deadline is one interval later, not a burst
    assert s.next_tick_at() == pytest.approx(11.3)


def test_shallow_truncated_side_resyncs() -> None:
    s = BookSync(SYM, snapshot_limit=3, snapshot_depth=2)
    s.on_diff(diff(1, 1), 0.0)
    s.on_snapshot(
        snap(1, bids=[("3", "1"), ("2", "1"), ("1", "1")], asks=[("4", "1")], limit=3), 0.0
    )
    assert s.in_sync
    assert s.in_sync and kinds(s.on_diff(diff(2, 2, bids=[("3", "0")]), 0.0)) == ["Applied"]
    cmds = s.on_diff(diff(3, 3, bids=[("2", "0")]), 0.0)  # 1 known bid left of a cut side
    assert SetInSync(symbol=SYM, in_sync=False, reason=ResyncReason.SHALLOW) in cmds


# -- audit ----------------------------------------------------------------------------------------


def test_audit_matching_snapshot_at_the_same_id() -> None:
    s = synced()
    (req,) = s.start_audit(0.0)
    assert isinstance(req, RequestSnapshot) and req.purpose is SnapshotPurpose.AUDIT
    assert s.start_audit(0.0) == []  # one at a time
    (done,) = s.on_audit_snapshot(
        snap(10, bids=[("100", "1"), ("99", "2")], asks=[("101", "1"), ("102", "2")]), 0.0
    )
    assert isinstance(done, AuditDone)
    r = done.result
    assert (r.matching, r.missing, r.phantom, r.update_id, r.ok) == (4, 0, 0, 10, True)


def test_audit_older_snapshot_is_brought_forward_with_the_diffs_since() -> None:
    s = synced()
    s.start_audit(0.0)
    s.on_diff(diff(11, 12, bids=[("99", "0"), ("98", "7")]), 0.0)
    (done,) = s.on_audit_snapshot(
        snap(10, bids=[("100", "1"), ("99", "2")], asks=[("101", "1"), ("102", "2")]), 0.0
    )
    assert isinstance(done, AuditDone) and done.result.ok and done.result.update_id == 12


def test_audit_newer_snapshot_waits_for_the_book() -> None:
    s = synced()
    s.start_audit(0.0)
    truth = snap(13, bids=[("100", "1"), ("98", "7")], asks=[("101", "1"), ("102", "2")])
    assert s.on_audit_snapshot(truth, 0.0) == []
    assert kinds(s.on_diff(diff(11, 12, bids=[("99", "0")]), 0.0)) == ["Applied"]
    cmds = s.on_diff(diff(13, 14, bids=[("98", "7")], asks=[("103", "1")]), 0.0)
    assert kinds(cmds) == ["Applied", "AuditDone"]
    done = cmds[1]
    assert isinstance(done, AuditDone) and done.result.ok and done.result.update_id == 14


def test_audit_mismatch_counts_and_resyncs() -> None:
    s = synced()
    s.start_audit(0.0)
    cmds = s.on_audit_snapshot(
        snap(10, bids=[("100", "1"), ("98", "2")], asks=[("101", "3"), ("102", "2")]), 0.0
    )
    done = cmds[0]
    assert isinstance(done, AuditDone)
    r = done.result
    # bid 99 phantom, bid 98 missing, ask 101 qty differs (one missing, one phantom)
    assert (r.matching, r.missing, r.phantom, r.qty_differs) == (2, 2, 2, 1)
    assert len(r.sample) == 3
    assert SetInSync(symbol=SYM, in_sync=False, reason=ResyncReason.AUDIT_MISMATCH) in cmds
    assert s.resyncs[ResyncReason.AUDIT_MISMATCH] == 1


def test_audit_with_a_snapshot_older_than_the_request_is_skipped() -> None:
    s = synced()
    s.start_audit(0.0)
    assert s.on_audit_snapshot(snap(9), 0.0) == [AuditSkipped(symbol=SYM, why="snapshot_too_old")]
    assert s.in_sync


def test_audit_abandoned_by_a_resync_and_bounded() -> None:
    s = synced()
    s.start_audit(0.0)
    cmds = s.on_diff(diff(20, 20), 0.0)
    assert AuditSkipped(symbol=SYM, why="resynced") in cmds and not s.auditing
    s2 = synced(audit_max_events=2)
    s2.start_audit(0.0)
    s2.on_diff(diff(11, 11), 0.0)
    s2.on_diff(diff(12, 12), 0.0)
    assert AuditSkipped(symbol=SYM, why="too_many_events") in s2.on_diff(diff(13, 13), 0.0)


def test_applied_carries_the_update() -> None:
    s = synced()
    update = diff(11, 11, asks=[("103", "1")])
    assert s.on_diff(update, 0.0) == [Applied(symbol=SYM, update=update)]


def test_a_side_cut_at_max_levels_is_not_shallow_by_default() -> None:
    s = BookSync(SYM, max_levels=2, snapshot_depth=20)
    assert s.min_known_levels == 2
    s.on_diff(diff(1, 1), 0.0)
    s.on_snapshot(snap(1, bids=[("3", "1"), ("2", "1"), ("1", "1")], asks=[("4", "1")]), 0.0)
    assert s.in_sync and s.book.bids.horizon is not None
    with pytest.raises(ValueError, match="min_known_levels"):
        BookSync(SYM, max_levels=2, min_known_levels=3)
