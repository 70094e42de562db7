"""The delivery/spool state machine (marketd/ingest/delivery.py) with plain calls.

A small world plays librdkafka (records in flight, acked or given up in any order), Kafka (the
log of what was written), the spool (a list with a read cursor and an ack point) and the clock;
hypothesis interleaves batches, delivery reports, outages, probes, a full spool and the driver's
command steps. After every step the core's own invariants hold; every acknowledged spool prefix
was resolved; at the end, with Kafka healed, every record is in Kafka exactly once and the spool
is empty.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from marketd.ingest.delivery import (
    APPEND_MAX_RECORDS,
    AckPosition,
    Append,
    Delivery,
    GoLive,
    LoadTail,
    Mode,
    OutageReason,
    Outcome,
    Policy,
    Read,
    Rewind,
    Send,
    SkippedDuplicates,
    StartSpooling,
    Stop,
    TakenOver,
)

TOPIC = "raw_trades"
QUEUE_LIMIT = 8  # librdkafka's queue: a batch past it is the "queue_full" outage


class Pos(NamedTuple):
    ordinal: int


@dataclass(frozen=True)
class Rec:
    topic: str
    value: bytes


def trade(symbol: str, trade_id: int) -> Rec:
    return Rec(TOPIC, json.dumps({"symbol": symbol, "trade_id": trade_id}).encode())


@dataclass
class World:
    core: Delivery[Pos, Rec]
    now: float = 0.0
    kafka_up: bool = True
    spool_full: bool = False
    progress_at: float = 0.0
    ids: dict[str, int] = field(default_factory=dict)
    produced: list[bytes] = field(default_factory=list)  # every record accepted, in order
    written: list[bytes] = field(default_factory=list)  # Kafka's log
    dead: list[bytes] = field(default_factory=list)  # refused for good (dead-lettered)
    # librdkafka: originals by produce seq, replayed entries by send token
    originals: dict[int, Rec] = field(default_factory=dict)
    replays: dict[int, tuple[int, Rec]] = field(default_factory=dict)
    returned: list[tuple[int, Rec]] = field(default_factory=list)
    seq: int = 0
    token: int = 0
    # the spool
    spool: list[Rec] = field(default_factory=list)
    acked: int = 0
    read_at: int = 0
    # the driver: commands of the current tick not performed yet
    queue: deque[Any] = field(default_factory=deque)
    stopped: bool = False
    went_live: int = 0
    tail: dict[str, int] = field(default_factory=dict)  # the trades topic's last ids

    # -- the world's side of things ---------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self.originals) + len(self.replays)

    def new_records(self, n: int, symbols: int = 3) -> list[Rec]:
        out = []
        for i in range(n):
            sym = f"S{(len(self.produced) + i) % symbols}"
            self.ids[sym] = self.ids.get(sym, 0) + 1
            out.append(trade(sym, self.ids[sym]))
        self.produced += [r.value for r in out]
        return out

    def batch(self, n: int) -> None:
        core = self.core
        if self.queue or (core.spooling and not core.takes_batches):
            return  # the driver is busy performing commands, or takes no batches now
        records = self.new_records(n)
        produce = core.on_batch(records)
        if produce is None:
            return  # spooling: waits for the next append
        self.produce_live(produce.records)

    def produce_live(self, records: Sequence[Rec]) -> None:
        rest: list[Rec] = []
        for i, r in enumerate(records):
            if self.in_flight() >= QUEUE_LIMIT:
                rest = list(records[i:])  # queue full: the driver gives up waiting
                break
            if not self.in_flight():
                self.progress_at = self.now
            self.originals[self.seq] = r
            self.seq += 1
        if rest or self.returned:
            reason = OutageReason.QUEUE_FULL if rest else OutageReason.GAVE_UP
            self.outage(reason, rest)

    def outage(self, reason: OutageReason, rest: list[Rec]) -> None:
        given_up, self.returned = sorted(self.returned, key=lambda r: r[0]), []
        commands = self.core.on_outage(
            reason, self.now, unacked=sorted(self.originals.items()), given_up=given_up, rest=rest
        )
        assert isinstance(commands[0], StartSpooling)

    def pick(self, i: int) -> tuple[str, int] | None:
        keys = [("o", s) for s in self.originals] + [("r", t) for t in self.replays]
        return keys[i % len(keys)] if keys else None

    def deliver(self, i: int) -> None:
        if not self.kafka_up or (got := self.pick(i)) is None:
            return
        kind, key = got
        self.progress_at = self.now
        if kind == "o":
            rec = self.originals.pop(key)
            self.written.append(rec.value)
            self.core.on_original(key, True)
        else:
            ordinal, rec = self.replays.pop(key)
            self.written.append(rec.value)
            self.core.on_replayed(ordinal, Outcome.DELIVERED)

    def give_up(self, i: int, for_good: bool) -> None:
        if (got := self.pick(i)) is None:
            return
        kind, key = got
        if kind == "o":
            rec = self.originals.pop(key)
            if for_good:  # dead-lettered: handled
                self.dead.append(rec.value)
                self.core.on_original(key, True)
            elif not self.core.on_original(key, False):
                self.returned.append((key, rec))
        else:
            ordinal, rec = self.replays.pop(key)
            if for_good:
                self.dead.append(rec.value)
                self.core.on_replayed(ordinal, Outcome.DEAD_LETTERED)
            else:
                self.core.on_replayed(ordinal, Outcome.GIVEN_BACK)

    def probe(self) -> None:
        if self.core.probe_wanted and self.core.on_probe(self.kafka_up):
            self.progress_at = self.now  # KafkaBack: the driver restarts the ack clock

    def time(self, dt: float) -> None:
        self.now += dt
        core = self.core
        if core.mode is Mode.LIVE:  # the live watcher
            reason = core.outage_reason(
                self.now,
                in_flight=self.in_flight(),
                progress_at=self.progress_at,
                brokers_down=not self.kafka_up,
                returned=len(self.returned),
            )
            if reason is not None:
                self.outage(reason, [])

    # -- the driver -------------------------------------------------------------------------------

    def step(self) -> None:
        core = self.core
        if self.queue:
            self.perform(self.queue.popleft())
            return
        if not core.spooling:
            return
        late, self.returned = [r for _, r in sorted(self.returned, key=lambda r: r[0])], []
        if late:
            core.on_returned(late)
        commands = core.tick(
            self.now,
            spool_unread=len(self.spool) - self.read_at,
            progress_at=self.progress_at,
        )
        if any(isinstance(c, Stop | GoLive) for c in commands):
            assert isinstance(commands[-1], Stop | GoLive), commands
        self.queue.extend(commands)

    def perform(self, cmd: Any) -> None:
        core = self.core
        if isinstance(cmd, Append):
            if self.spool_full:
                core.on_full(cmd)
            else:
                base = len(self.spool)
                self.spool += cmd.records
                core.on_appended(cmd, base)
        elif isinstance(cmd, AckPosition):
            o = cmd.position.ordinal
            assert self.acked <= o < self.read_at, (self.acked, o, self.read_at)
            resolved = set(self.written) | set(self.dead)
            unresolved = [
                i for i in range(self.acked, o + 1) if self.spool[i].value not in resolved
            ]
            assert not unresolved, f"acked {o} but entries {unresolved} were never delivered"
            self.acked = o + 1
        elif isinstance(cmd, Rewind):
            self.read_at = self.acked
        elif isinstance(cmd, Read):
            end = min(len(self.spool), self.read_at + cmd.max_entries)
            items = [(Pos(o), self.spool[o]) for o in range(self.read_at, end)]
            self.read_at = end
            for then in core.on_read(items):  # performed at once by the driver (no await)
                if isinstance(then, Send):
                    self.perform(then)
                else:
                    assert isinstance(then, TakenOver | SkippedDuplicates), then
        elif isinstance(cmd, Send):
            sent = 0
            for pos, rec in cmd.items:
                if self.in_flight() >= QUEUE_LIMIT:
                    break  # BufferError: the next tick sends the rest
                if not self.in_flight():
                    self.progress_at = self.now
                self.replays[self.token] = (pos.ordinal, rec)
                self.token += 1
                sent += 1
            core.on_sent(sent)
        elif isinstance(cmd, Stop):
            self.stopped = True
        elif isinstance(cmd, GoLive):
            self.went_live += 1
            assert core.mode is Mode.LIVE
            self.produce_live(cmd.produce)  # what came in since the last append
        elif isinstance(cmd, LoadTail):
            core.on_tail(self.tail if self.kafka_up else None)
        # Probe, StartSpooling, ReplayStalled, KafkaBack: signals, logs and metrics only

    def heal(self) -> None:
        """Kafka back for good, room in the spool: everything must drain and go live."""
        self.kafka_up, self.spool_full = True, False
        for _ in range(2000):
            while self.in_flight():
                self.deliver(0)
            self.probe()
            self.step()
            self.core.check_invariants()
            live = self.core.mode is Mode.LIVE
            if live and not (self.in_flight() or self.queue or self.returned):
                return
            self.time(0.01)
        raise AssertionError("the spool never drained")


# Op names weighted by repetition: the driver's steps and the clock most, so outages, replays,
# rewinds and given-up shadows all come up within a few dozen steps.
OPS = ["batch"] * 3 + ["deliver"] * 3 + ["give_up"] * 2 + ["dead", "full"] + ["kafka"] * 2
OPS += ["probe"] * 2 + ["time"] * 3 + ["step"] * 7
ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 20)), min_size=20, max_size=300)


def make_world(backlog: int = 0, in_topic: int = 0) -> World:
    core: Delivery[Pos, Rec] = Delivery(
        Policy(
            outage_after_s=1.0,
            replay_window=4,
            queue_limit=QUEUE_LIMIT,
            replay_deadline_s=5.0,
            trades_topic=TOPIC,
        )
    )
    world = World(core)
    if backlog:
        # An earlier run left `backlog` trades in the spool; the first `in_topic` of them
        # reached the topic before it died.
        left = world.new_records(backlog, symbols=1)
        world.spool = list(left)
        world.written = [r.value for r in left[:in_topic]]
        world.tail = {"S0": in_topic} if in_topic else {}
    for cmd in core.start(world.now, backlog=backlog):
        world.perform(cmd)
    return world


def run(world: World, steps: list[tuple[str, Any]]) -> None:
    for op, arg in steps:
        if op == "batch":
            world.batch(1 + arg % 6)
        elif op == "deliver":
            world.deliver(arg)
        elif op == "give_up":
            world.give_up(arg, for_good=False)
        elif op == "dead":
            world.give_up(arg, for_good=True)
        elif op == "kafka":
            world.kafka_up = arg % 2 == 0
        elif op == "full":
            world.spool_full = arg % 3 == 0
        elif op == "probe":
            world.probe()
        elif op == "time":
            world.time((0.01, 0.3, 1.5)[arg % 3])
        else:
            world.step()
        world.core.check_invariants()


def assert_exactly_once(world: World) -> None:
    out = world.written + world.dead
    assert sorted(out) == sorted(world.produced), (
        f"lost: {set(world.produced) - set(out)}; "
        f"twice: {[v for v in set(out) if out.count(v) > 1]}"
    )
    assert world.acked == len(world.spool), "the spool is not empty"


@settings(max_examples=400, deadline=None)
@given(ops)
def test_every_record_reaches_kafka_exactly_once(steps: list[tuple[str, Any]]) -> None:
    world = make_world()
    run(world, steps)
    world.heal()
    assert_exactly_once(world)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.data(), ops)
def test_a_spool_left_behind_goes_out_once(
    backlog: int, data: st.DataObject, steps: list[tuple[str, Any]]
) -> None:
    in_topic = data.draw(st.integers(0, backlog))
    world = make_world(backlog, in_topic)
    assert world.core.spooling
    run(world, steps)
    world.heal()
    assert_exactly_once(world)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_input_end_stops_and_keeps_the_rest_in_the_spool(steps: list[tuple[str, Any]]) -> None:
    world = make_world()
    run(world, steps)
    core = world.core
    while world.queue:
        world.step()
    core.on_input_end()
    for _ in range(2000):
        if (not core.spooling or world.stopped) and not world.queue:
            break
        world.step()
        world.probe()
        world.time(0.3)
        core.check_invariants()
    assert not core.spooling or world.stopped
    # What the driver appends at the end, and what the spool and Kafka hold, lose nothing:
    # every record is in Kafka, dead-lettered, in the spool past the ack point, or still held
    # by librdkafka with its shadow in the spool; only what a full spool refuses at the end is
    # lost, and the driver logs it (spool.lost_at_shutdown).
    if core.spooling:
        left = core.leftovers(sorted(world.returned, key=lambda r: r[0]))
    else:
        left = [r for _, r in sorted([*world.originals.items(), *world.returned])]
    if not world.spool_full:
        world.spool += left
    kept = {r.value for r in world.spool[world.acked :]}
    somewhere = set(world.written) | set(world.dead) | kept
    assert set(world.produced) - somewhere <= {r.value for r in left}


def test_outage_shadows_then_early_reports() -> None:
    """Originals resolved between the outage and the append of their shadows (early)."""
    world = make_world()
    world.batch(4)
    world.kafka_up = False
    world.time(1.5)
    assert world.core.spooling and not world.core.kafka_up
    world.step()  # tick: Append the shadows
    assert isinstance(world.queue[0], Append) and world.queue[0].shadows
    world.kafka_up = True
    world.deliver(0)  # original 0 gets through before its shadow is appended
    world.give_up(0, for_good=False)  # original 1 is given up: its shadow must go out
    world.step()  # the append
    world.core.check_invariants()
    world.heal()
    assert_exactly_once(world)
    assert world.written.count(world.produced[1]) == 1


def test_a_full_spool_refuses_batches_until_an_append_succeeds() -> None:
    world = make_world()
    world.kafka_up = False
    world.batch(3)
    world.time(1.5)
    world.spool_full = True
    world.step()  # Append the shadows: refused
    world.step()
    assert world.core.full and not world.core.takes_batches
    world.spool_full = False
    world.step()
    world.step()
    assert not world.core.full and world.core.takes_batches
    assert len(world.spool) == 3


def test_backlog_waits_for_the_tail_and_skips_what_the_topic_has() -> None:
    world = make_world(backlog=5, in_topic=3)
    world.kafka_up = False
    world.probe()  # fails
    world.step()
    assert not world.queue  # Kafka down: no LoadTail yet
    world.kafka_up = True
    world.probe()
    world.step()
    assert isinstance(world.queue[-1], LoadTail)
    world.heal()
    assert_exactly_once(world)
    assert world.core.mode is Mode.LIVE and world.went_live == 1


def test_batches_past_the_append_bound_wait_in_the_channel() -> None:
    world = make_world()
    world.kafka_up = False
    world.batch(1)
    world.time(1.5)
    core = world.core
    core.on_batch(world.new_records(APPEND_MAX_RECORDS))
    assert not core.wants_more and core.takes_batches


def test_a_rewind_is_not_held_up_by_a_shadow_waiting_to_be_sent() -> None:
    """Replay: entry 0 is given back while the original of the stashed shadow 2 is given up
    (so 2 waits to be sent): the rewind must still come, and everything go out once. (The
    stage before the state machine waited for 2's report forever here.)"""
    world = make_world()
    steps = [("batch", 0)] * 4 + [("batch", 1)] + [("deliver", 0)] * 5  # 6 records
    steps += [("give_up", 0), ("batch", 1), ("deliver", 0), ("probe", 0)] + [("step", 0)] * 4
    run(world, steps)
    assert world.core.stashed == 1
    run(world, [("give_up", 0), ("give_up", 0)])  # the original of 2, then replayed entry 0
    world.heal()
    assert_exactly_once(world)


def test_goes_live_while_batches_keep_coming() -> None:
    """A steady input must not keep the stage spooling: once the spool is delivered, what came
    in since the last append goes straight to Kafka."""
    world = make_world()
    world.kafka_up = False
    world.batch(3)
    world.time(1.5)
    assert world.core.spooling
    world.kafka_up = True
    world.probe()
    for _ in range(50):
        world.batch(2)  # before every driver iteration
        world.step()
        while world.queue:
            world.step()
        while world.in_flight():
            world.deliver(0)
        world.core.check_invariants()
        if world.core.mode is Mode.LIVE:
            break
    assert world.core.mode is Mode.LIVE and world.went_live == 1
    world.heal()
    assert_exactly_once(world)
