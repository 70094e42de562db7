"""BookKeeper in memory on virtual time: frames in, records out, snapshots through a scripted
REST source, periodic snapshots, the audit, dead letters and the board (docs/books.md)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from marketd.books.board import BookBoard
from marketd.books.keeper import BookKeeper, BookSettings
from marketd.ingest.decode import Outgoing
from marketd.metrics import MetricsFactory
from marketd.records import (
    BookSnapshotRecord,
    DepthPartialRecord,
    DepthRecord,
    DlqRecord,
    GapRecord,
)
from marketd.rest.errors import RestUnavailable
from marketd.streams import parse_stream

SYM = "BTCUSDT"
DIFF = parse_stream("btcusdt@depth@100ms")
PARTIAL = parse_stream("btcusdt@depth5")
E = 1_700_000_000_000
RECV_NS = E * 1_000_000


def diff(first: int, last: int, bids: Any = (), asks: Any = (), **over: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "e": "depthUpdate",
        "E": E,
        "s": SYM,
        "U": first,
        "u": last,
        "b": [list(x) for x in bids],
        "a": [list(x) for x in asks],
    }
    payload.update(over)
    return payload


BOOK = {
    "lastUpdateId": 100,
    "bids": [["99.0", "1"], ["98.0", "2"], ["97.0", "3"]],
    "asks": [["101.0", "1"], ["102.0", "2"], ["103.0", "3"]],
}


class FakeRest:
    """Answers /api/v3/depth with `answers` in turn (the last one repeats); an exception
    instance is raised instead."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int, int, float]] = []

    async def depth(self, symbol: str, limit: int, weight: int) -> dict[str, Any]:
        self.calls.append((symbol, limit, weight, trio.current_time()))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        await trio.sleep(0.01)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


class Rig:
    def __init__(self, streams: tuple[Any, ...] = (DIFF, PARTIAL), **settings: Any) -> None:
        self.board = BookBoard()
        self.metrics = MetricsFactory()
        base: dict[str, Any] = {"snapshot_limit": 100, "snapshot_depth": 2, "redis_depth": 2}
        base.update(settings)
        self.keeper = BookKeeper(
            streams,
            settings=BookSettings(**base),
            board=self.board,
            metrics=self.metrics,
            wall_ns=lambda: RECV_NS,
        )
        self.records: list[Outgoing] = []

    async def sink(self, records: list[Outgoing]) -> None:
        self.records.extend(records)

    def frame(self, payload: Any, spec: Any = DIFF) -> list[Outgoing]:
        out = self.keeper.on_frame(spec, payload, RECV_NS)
        self.records.extend(out)
        return out

    def of(self, topic: str, cls: type[Any]) -> list[Any]:
        return [msgspec.json.decode(r.value, type=cls) for r in self.records if r.topic == topic]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels or {})

    async def start(self, nursery: trio.Nursery, rest: FakeRest) -> None:
        await nursery.start(self.keeper.run, rest, self.sink)


async def settle(until: Callable[[], bool], timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not until():
            await trio.sleep(0.01)


async def test_diffs_are_published_as_received_and_the_book_syncs_from_a_snapshot(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig()
    view = rig.board.latest(SYM)
    assert view is not None and not view.in_sync and view.reason == "start"
    out = rig.frame(diff(95, 101, bids=[("99.0", "5")], asks=[("104.0", "1")]))
    (rec,) = [msgspec.json.decode(o.value, type=DepthRecord) for o in out]
    assert out[0].topic == "raw_depth" and out[0].key == b"BTCUSDT"
    assert (rec.first_update_id, rec.last_update_id, rec.event_time) == (95, 101, E)
    assert rec.bids == (("99.0", "5"),) and rec.asks == (("104.0", "1"),)
    assert (rec.stream, rec.ingested_at, rec.source) == ("btcusdt@depth@100ms", E, "binance")
    rest = FakeRest(BOOK)
    await rig.start(nursery, rest)
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    assert rest.calls[0][:3] == (SYM, 100, 5)
    rig.frame(diff(102, 102, bids=[("98.0", "0")]))
    view = rig.board.latest(SYM)
    assert view is not None and view.in_sync and view.last_update_id == 102
    assert view.bids == (("99.0", "5"), ("97.0", "3"))
    assert view.asks == (("101.0", "1"), ("102.0", "2"))
    await settle(lambda: len(rig.of("book_snapshots", BookSnapshotRecord)) >= 3)
    snaps = rig.of("book_snapshots", BookSnapshotRecord)
    assert snaps[0].reason == "synced" and snaps[0].last_update_id == 101
    assert snaps[0].bids == (("99.0", "5"), ("98.0", "2")) and snaps[0].depth == 2
    assert {s.reason for s in snaps[1:]} == {"periodic"}
    assert snaps[-1].last_update_id == 102 and snaps[-1].in_sync
    assert rig.metric("marketd_book_in_sync", {"symbol": SYM}) == 1
    assert rig.metric("marketd_book_snapshot_requests_total", {"purpose": "sync", "outcome": "ok"})
    assert rig.metric("marketd_book_updates_applied_total", {"symbol": SYM}) == 2
    assert rig.metric("marketd_book_levels", {"symbol": SYM, "side": "bid"}) == 2


async def test_periodic_snapshots_follow_the_interval_on_virtual_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig(snapshot_interval_s=1.0)
    rig.frame(diff(101, 101))
    await rig.start(nursery, FakeRest(BOOK))
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    start = trio.current_time()
    await trio.sleep(10.5)
    periodic = [s for s in rig.of("book_snapshots", BookSnapshotRecord) if s.reason == "periodic"]
    assert len(periodic) == 10
    assert trio.current_time() - start >= 10


async def test_a_gap_marks_the_book_out_of_sync_resyncs_and_publishes_a_gap_record(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig()
    rig.frame(diff(101, 101))
    later = dict(BOOK, lastUpdateId=110)
    await rig.start(nursery, FakeRest(BOOK, later))
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    rig.frame(diff(105, 106))  # 102..104 missed
    view = rig.board.latest(SYM)
    assert view is not None and not view.in_sync and view.reason == "gap" and view.bids == ()
    assert rig.metric("marketd_book_in_sync", {"symbol": SYM}) == 0
    rig.frame(diff(107, 111))
    await settle(lambda: bool(rig.of("raw_gaps", GapRecord)))
    (gap,) = rig.of("raw_gaps", GapRecord)
    assert (gap.kind, gap.from_id, gap.to_id, gap.reason, gap.repaired) == (
        "depth",
        102,
        110,
        "gap",
        True,
    )
    assert gap.stream == "btcusdt@depth@100ms" and gap.symbol == SYM
    reasons = [s.reason for s in rig.of("book_snapshots", BookSnapshotRecord)]
    assert reasons[0] == "synced" and "resynced" in reasons
    await settle(
        lambda: rig.metric("marketd_book_resyncs_total", {"symbol": SYM, "reason": "gap"}) == 1
    )


@pytest.mark.parametrize(
    ("payload", "reason", "resync"),
    [
        (diff(102, 102, bids=[("99.0", "-1")]), "negative_value", "bad_level"),
        (diff(102, 102, asks=[("1e5", "1")]), "bad_decimal", "bad_level"),
        (diff(102, 102, asks=[("0", "1")]), "out_of_range", "bad_level"),
        (diff(102, 102, asks=[["1", "2", "3"]]), "wrong_type", "bad_level"),
        (diff(103, 102), "inconsistent_values", "bad_event"),
        (diff(102, 2**63), "out_of_range", "bad_event"),
        ({k: v for k, v in diff(102, 102).items() if k != "u"}, "missing_field", "bad_event"),
        (diff(102, 102, U="102"), "wrong_type", "bad_event"),
        (diff(102, 102, s="ETHUSDT"), "symbol_mismatch", "bad_event"),
        (diff(102, 102, e="trade"), "event_type_mismatch", "bad_event"),
        (diff(102, 102, E=5), "absurd_timestamp", "bad_event"),
        (diff(102, 102, E=E + 60_000), "absurd_timestamp", "bad_event"),
        (b'{"e": "depthUpdate", ', "bad_json", "bad_event"),
        ([1, 2], "not_an_object", "bad_event"),
    ],
)
async def test_a_refused_diff_is_dead_lettered_and_the_book_resyncs(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    payload: Any,
    reason: str,
    resync: str,
) -> None:
    rig = Rig()
    rig.frame(diff(101, 101))
    await rig.start(nursery, FakeRest(BOOK))
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    out = rig.frame(payload)
    (dead,) = out
    assert dead.topic == "raw_dlq" and dead.key == b"BTCUSDT"
    record = msgspec.json.decode(dead.value, type=DlqRecord)
    assert (record.reason, record.stream) == (reason, "btcusdt@depth@100ms")
    assert record.raw is not None and record.received_at == E
    view = rig.board.latest(SYM)
    assert view is not None and not view.in_sync and view.reason == resync
    assert rig.metric("marketd_book_rejected_total", {"reason": reason}) == 1


async def test_partial_book_frames_have_their_own_records_and_no_book(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = Rig()
    good = {"lastUpdateId": 7, "bids": [["1.0", "2"]], "asks": [["1.1", "3"]]}
    (out,) = rig.frame(good, PARTIAL)
    assert out.topic == "raw_depth_partial" and out.key == b"BTCUSDT"
    rec = msgspec.json.decode(out.value, type=DepthPartialRecord)
    assert (rec.last_update_id, rec.depth, rec.event_time, rec.stream) == (
        7,
        5,
        None,
        "btcusdt@depth5",
    )
    assert json.loads(out.value)["event_time"] is None
    deep = dict(good, bids=[["1.0", "2"]] * 6)
    (dead,) = rig.frame(deep, PARTIAL)
    assert msgspec.json.decode(dead.value, type=DlqRecord).reason == "inconsistent_values"
    assert rig.keeper.books[SYM].phase.value == "waiting"  # a partial frame never feeds the book


async def test_only_book_symbols_keep_books_and_other_diffs_still_reach_raw_depth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    eth = parse_stream("ethusdt@depth")
    rig = Rig((DIFF, eth), symbols=("ETHUSDT",))
    assert list(rig.keeper.books) == ["ETHUSDT"]
    (out,) = rig.frame(diff(1, 2))
    assert out.topic == "raw_depth"
    assert rig.board.latest(SYM) is None


async def test_a_reconnect_rebuilds_the_book_from_the_new_connection(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig()
    rig.frame(diff(101, 101))
    rest = FakeRest(BOOK, dict(BOOK, lastUpdateId=200))
    await rig.start(nursery, rest)
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    assert rig.keeper.on_reconnect([SYM, "NOPEUSDT"]) == []
    view = rig.board.latest(SYM)
    assert view is not None and not view.in_sync and view.reason == "reconnect"
    await trio.sleep(5)
    assert len(rest.calls) == 1  # waits for the new connection's first event
    rig.frame(diff(199, 203))
    await settle(lambda: bool(rig.of("raw_gaps", GapRecord)))
    (gap,) = rig.of("raw_gaps", GapRecord)
    assert (gap.from_id, gap.to_id, gap.reason) == (102, 200, "reconnect")


async def test_a_failed_snapshot_is_retried_after_a_backoff(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig()
    rig.frame(diff(101, 101))
    rest = FakeRest(RestUnavailable("/api/v3/depth", "timeout"), RestUnavailable("x", "y"), BOOK)
    await rig.start(nursery, rest)
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    times = [c[3] for c in rest.calls]
    assert len(times) == 3 and times[1] - times[0] >= 1 and times[2] - times[1] >= 2
    labels = {"purpose": "sync", "outcome": "error"}
    assert rig.metric("marketd_book_snapshot_requests_total", labels) == 2


async def test_snapshots_of_many_books_are_paced_by_weight(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    symbols = [f"S{i}USDT" for i in range(6)]
    specs = tuple(parse_stream(f"{s.lower()}@depth") for s in symbols)
    rig = Rig(specs, snapshot_limit=5000, snapshot_weight_per_min=500)  # 2 x 250 per minute
    rest = FakeRest(BOOK)
    await rig.start(nursery, rest)
    for i, s in enumerate(symbols):
        rig.keeper.on_frame(specs[i], diff(101, 101, s=s), RECV_NS)
    await settle(lambda: len(rest.calls) == 6, timeout=400)
    times = [c[3] for c in rest.calls]
    assert all(b - a >= 30 - 1e-6 for a, b in itertools.pairwise(times))
    assert {c[2] for c in rest.calls} == {250}


async def test_the_audit_compares_one_book_in_turn_and_resyncs_on_a_mismatch(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig(audit_interval_s=10)
    rig.frame(diff(101, 101))
    same = dict(BOOK, lastUpdateId=101)  # the book at its own id: diff 101 changed nothing
    wrong = dict(same, bids=[["99.0", "1"], ["98.0", "7"], ["97.0", "3"]])
    rest = FakeRest(BOOK, same, wrong, same)
    await rig.start(nursery, rest)
    await settle(lambda: rig.keeper.books[SYM].audits >= 1)
    ok = {"symbol": SYM, "result": "matching"}
    assert rig.metric("marketd_book_audit_levels", ok) == 6
    assert rig.metric("marketd_book_audits_total", {"symbol": SYM, "outcome": "ok"}) == 1
    await settle(lambda: rig.keeper.books[SYM].audits >= 2)
    missing = {"symbol": SYM, "result": "missing"}
    assert rig.metric("marketd_book_audit_levels", missing) == 1
    assert rig.metric("marketd_book_audits_total", {"symbol": SYM, "outcome": "mismatch"}) == 1
    assert [r.value for r in rig.keeper.books[SYM].resyncs] == ["audit_mismatch"]


async def test_a_diff_received_twice_is_published_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = Rig()
    rig.frame(diff(101, 105))
    assert rig.frame(diff(101, 105)) == []  # the overlapping connection's copy
    assert rig.frame(diff(104, 105)) == []
    (out,) = rig.frame(diff(106, 107))
    assert out.topic == "raw_depth"
    # Far below the newest id is not a copy (a corrupt id must not hide what follows).
    rig.frame(diff(10**12, 10**12))
    (out,) = rig.frame(diff(108, 108))
    assert out.topic == "raw_depth"
    assert rig.metric("marketd_book_duplicate_diffs_total") == 2


async def test_raw_frames_are_decoded_and_refused_ones_keep_their_text(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rig = Rig()
    (out,) = rig.frame(msgspec.Raw(json.dumps(diff(101, 101)).encode()))
    assert out.topic == "raw_depth"
    (dead,) = rig.frame(memoryview(b'{"e": 1'))
    record = msgspec.json.decode(dead.value, type=DlqRecord)
    assert (record.reason, record.raw) == ("bad_json", '{"e": 1')


def test_the_keeper_takes_its_settings_from_the_config(tmp_path: Any) -> None:
    from marketd.config import load_config

    env = {
        "BINANCE_STREAMS": "btcusdt@depth@100ms,ethusdt@depth,ethusdt@depth10",
        "BOOK_SYMBOLS": "ethusdt",
        "BOOK_SNAPSHOT_LIMIT": "1000",
        "TOPIC_RAW_DEPTH": "d",
    }
    cfg = load_config(None, environ=env, dotenv=None).config
    specs = [parse_stream(n) for n in cfg.binance.streams]
    keeper = BookKeeper.from_config(cfg, specs, metrics=MetricsFactory())
    assert list(keeper.books) == ["ETHUSDT"] and keeper.diff_streams == {"ETHUSDT": "ethusdt@depth"}
    assert keeper.books["ETHUSDT"].snapshot_limit == 1000 and keeper.topics.raw_depth == "d"
    assert keeper.settings.max_future_ms == cfg.ingest.max_future_ms


async def test_a_batch_of_frames_publishes_one_view_per_book_and_only_top_changes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    rig = Rig()
    rig.frame(diff(95, 101, bids=[("99.0", "5")], asks=[("104.0", "1")]))
    await rig.start(nursery, FakeRest(BOOK))
    await settle(lambda: rig.keeper.books[SYM].in_sync)
    rig.board.take()
    rig.keeper.begin_batch()
    rig.frame(diff(102, 102, bids=[("98.0", "0")]))
    rig.frame(diff(103, 103, asks=[("101.0", "2")]))
    assert rig.board.pending() == 0  # nothing before the batch ends
    rig.keeper.end_batch()
    (view,) = rig.board.take()
    assert view.last_update_id == 103 and view.asks[0] == ("101.0", "2")
    # A change below the top redis_depth (2) levels: no reader could see it, no view.
    rig.frame(diff(104, 104, bids=[("50.0", "1")]))
    assert rig.board.take() == []
    # A book that loses sync inside a batch is never shown in sync after its out-of-sync view.
    rig.keeper.begin_batch()
    rig.frame(diff(105, 105, bids=[("99.0", "6")]))
    rig.frame(diff(107, 107, bids=[("99.0", "7")]))  # a gap
    rig.keeper.end_batch()
    views = rig.board.take()
    assert [v.in_sync for v in views] == [False] and views[0].reason == "gap"
