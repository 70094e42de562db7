"""Snapshot pacing: resyncs first, evenly spaced, never over the weight per minute, retries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.books import AuditRotation, RequestSnapshot, SnapshotPacer, SnapshotPurpose

SYNC, AUDIT = SnapshotPurpose.SYNC, SnapshotPurpose.AUDIT


def req(symbol: str, purpose: SnapshotPurpose = SYNC, weight: int = 250) -> RequestSnapshot:
    return RequestSnapshot(symbol=symbol, limit=5000, weight=weight, purpose=purpose)


def test_resyncs_go_before_audits_in_order_of_arrival() -> None:
    p = SnapshotPacer(weight_per_min=100_000, max_in_flight=10)
    p.want(req("A", AUDIT), 0.0)
    p.want(req("B"), 0.0)
    p.want(req("C"), 0.0)
    p.want(req("B"), 0.0)  # merged
    order = []
    now = 0.0
    while (g := p.next_grant(now)) is not None or p.queued:
        if g is None:
            at = p.wake_at(now)
            assert at is not None and at > now
            now = at
            continue
        order.append((g.symbol, g.purpose))
    assert order == [("B", SYNC), ("C", SYNC), ("A", AUDIT)]


def test_spacing_and_in_flight_limit() -> None:
    p = SnapshotPacer(weight_per_min=1000, max_in_flight=1, burst_weight=0)
    for s in "ABC":
        p.want(req(s), 0.0)
    assert p.next_grant(0.0) == req("A")
    assert p.next_grant(0.0) is None and p.wake_at(0.0) is None  # A in flight
    p.finished("A", SYNC, ok=True, now=0.5)
    # 250 of 1000/min: one every 15 s.
    assert p.next_grant(0.5) is None and p.wake_at(0.5) == 15.0
    assert p.next_grant(15.0) == req("B")


def test_a_burst_goes_at_once_then_spacing() -> None:
    p = SnapshotPacer(weight_per_min=1000, max_in_flight=1)  # burst: 500, two of 250
    for s in "ABC":
        p.want(req(s), 0.0)
    assert p.next_grant(0.0) == req("A")
    p.finished("A", SYNC, ok=True, now=0.5)
    assert p.wake_at(0.5) == 0.5 and p.next_grant(0.5) == req("B")  # within the burst
    p.finished("B", SYNC, ok=True, now=1.0)
    # 750 > 500: spaced, 15 s after B's grant.
    assert p.next_grant(1.0) is None and p.wake_at(1.0) == 15.5
    assert p.next_grant(15.5) == req("C")


def test_failed_request_is_retried_with_a_growing_delay() -> None:
    p = SnapshotPacer(weight_per_min=100_000, retry_base_s=1.0, retry_max_s=4.0)
    p.want(req("A"), 0.0)
    now = 0.0
    delays = []
    for _ in range(4):
        g = p.next_grant(now)
        assert g is not None
        p.finished("A", SYNC, ok=False, now=now)
        at = p.wake_at(now)
        assert at is not None
        delays.append(at - now)
        now = at
    assert delays == [1.0, 2.0, 4.0, 4.0]
    assert p.retries == 4


def test_drop_forgets_a_symbol() -> None:
    p = SnapshotPacer(weight_per_min=1000)
    p.want(req("A"), 0.0)
    p.drop("A")
    assert p.next_grant(0.0) is None and p.queued == 0


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([5, 25, 50, 250]), min_size=1, max_size=60),
    limit=st.integers(250, 6000),
    latency=st.floats(0.0, 3.0),
)
def test_never_more_than_the_weight_per_minute(
    weights: list[int], limit: int, latency: float
) -> None:
    p = SnapshotPacer(weight_per_min=limit, max_in_flight=3)
    for i, w in enumerate(weights):
        p.want(req(f"S{i}", weight=w), 0.0)
    now = 0.0
    grants: list[tuple[float, int]] = []
    in_flight: list[tuple[float, str]] = []
    for _ in range(10_000):
        while (g := p.next_grant(now)) is not None:
            grants.append((now, g.weight))
            in_flight.append((now + latency, g.symbol))
        if not p.queued and not in_flight:
            break
        wake = p.wake_at(now)
        done_at = min((t for t, _ in in_flight), default=None)
        candidates = [t for t in (wake, done_at) if t is not None]
        now = max(now, min(candidates))
        for t, s in list(in_flight):
            if t <= now:
                in_flight.remove((t, s))
                p.finished(s, SYNC, ok=True, now=now)
    assert len(grants) == len(weights)
    for start, _ in grants:
        assert sum(w for t, w in grants if start <= t < start + 60.0) <= limit


def test_audit_rotation_takes_symbols_in_turn() -> None:
    r = AuditRotation(60.0)
    assert r.due(0.0, ["B", "A"]) is None  # the first one after one interval
    assert r.due(59.0, ["B", "A"]) is None
    assert r.due(60.0, ["B", "A"]) == "A"
    assert r.due(120.0, ["B", "A", "C"]) == "B"
    assert r.due(180.0, ["A", "C"]) == "C"
    assert r.due(240.0, ["A", "C"]) == "A"
    assert r.due(300.0, []) is None
