"""Delivery and spool bookkeeping of the producer stage (pure: no trio, no Kafka, no file I/O).

`Delivery` is the state machine behind `ingest/spooling.py` (README "No trade lost"). It knows
which records librdkafka holds, which are in the on-disk spool, what was read back from the spool,
sent, acknowledged, given back; it never performs I/O. The driver feeds it events and performs the
commands it returns, in order, feeding each result back as an event:

  events in                                    commands out
  on_batch         a batch came in             Produce       hand it to librdkafka (live)
  on_outage        Kafka stopped taking        StartSpooling log, count; then Probe
  on_original      an original's delivery      Append        append records to the spool
                   report (ack or given up)    AckPosition   everything up to here is delivered
  on_returned      given up, no copy spooled   Rewind        read the spool again from the ack
  on_appended/     the spool took / refused    Read          read up to n spool entries
    on_full        an append                   Send          produce spooled entries again
  on_read          entries read back           LoadTail      read the trades topic's last ids
  on_sent          how many Send handed over   Probe         ask a broker whether Kafka is back
  on_replayed      a replayed entry's report   KafkaBack     a broker answered
  on_probe         a probe's answer            ReplayStalled no ack for the replay: Kafka down
  on_tail          the topic's last trade ids  TakenOver     an earlier run's entries (count)
  on_input_end     the batch channel closed    SkippedDuplicates  backlog trades in the topic
  tick             time passed (drives the     GoLive        spool empty: straight to Kafka
                   spooling mode)              Stop          input over, replay over/stuck

Two modes. LIVE: batches go to librdkafka; the sink keeps each record until its report (the
driver watches `outage_reason`). SPOOLING: entered on an outage (or with a spool left by an
earlier run). A copy ("shadow") of every record librdkafka still holds is appended first, then
every later batch. The originals stay in librdkafka: an original that gets through marks its
shadow delivered (it is never sent), one that is given up lets its shadow go out like any entry.
Kafka back (a probe answers): the spool is read in append order, at most `replay_window` entries
outstanding, each sent once unless given back (then, once every outstanding entry has its report,
the spool is rewound to the first unacknowledged entry and what was delivered meanwhile is
skipped). When everything appended is delivered and acknowledged, and Kafka is up: LIVE again,
and what came in since the last append is produced directly, after all of it (so a steady input
cannot keep the stage spooling).

Invariants (`check_invariants`, asserted by tests/ingest/test_delivery_core.py after every
event; the first one is also checked there against a model of the spool at every ack):
- the spool is acknowledged as a contiguous prefix: `AckPosition(p)` is issued only when every
  entry up to p is resolved (delivered, dead-lettered, or an earlier run's trade already in the
  topic), and acknowledged entries are never read again;
- the outstanding (read, unacknowledged) entries are a contiguous run of ordinals, none below
  the ack point;
- an entry is in at most one of: resolved (`done`), waiting for its original (`awaiting`),
  waiting to be sent (`unsent`); only read entries can be stashed, unsent or given back;
- a shadow with a spool ordinal is exactly an entry waiting for its original;
- Kafka down (in SPOOLING) always has a probe asking for it; LIVE holds nothing of the above.

Pure on purpose: dataclasses, not attrs (attrs imports threading), and positions and entries are
opaque (`marketd.spool.Position`/`SpoolEntry` in production, anything with `.ordinal` and
`.topic`/`.value` in tests). tests/test_purity.py checks the import closure.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

from marketd.records import trade_identity

# While spooling, records taken from the batch channel per append (one fsync each).
APPEND_MAX_RECORDS: Final = 5000
# How often the stage looks at the outage signals (live) or the spool (spooling) when idle.
LIVE_CHECK_S: Final = 0.25
# Replay service interval while spooled records are in flight (delivery reports, acks).
REPLAY_TICK_S: Final = 0.005
# A sequence number for records of a spooled batch that librdkafka never held (no original).
NO_ORIGINAL: Final = -1


class Located(Protocol):
    """A spool position: where an entry ends, and its ordinal in append order."""

    @property
    def ordinal(self) -> int: ...


class Entry(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def value(self) -> bytes: ...


P = TypeVar("P", bound=Located)
E = TypeVar("E", bound=Entry)


class Mode(enum.Enum):
    LIVE = "live"
    SPOOLING = "spooling"


class Outcome(enum.Enum):
    """What became of a replayed entry in librdkafka."""

    DELIVERED = "delivered"
    GIVEN_BACK = "given_back"  # purged or timed out unsent: send it again after a rewind
    DEAD_LETTERED = "dead_lettered"  # refused for good: handled (the driver dead-letters it)


class OutageReason(enum.Enum):
    BACKLOG = "backlog"  # a spool left by an earlier run
    BROKERS_DOWN = "brokers_down"
    QUEUE_FULL = "queue_full"
    NO_ACKS = "no_acks"
    GAVE_UP = "gave_up"  # librdkafka gave records up (message.timeout.ms)


# -- commands -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Produce:
    records: Sequence[Any]


@dataclass(frozen=True, slots=True)
class Append:
    """Append `records` durably; answer with `on_appended(cmd, base)` or `on_full(cmd)`.
    `shadows`: these are the copies of what librdkafka held at the outage (plus what it gave up,
    plus the unsent rest of the last batch), in produce order."""

    records: list[Any]
    shadows: bool = False


@dataclass(frozen=True, slots=True)
class AckPosition(Generic[P]):
    position: P


@dataclass(frozen=True, slots=True)
class Rewind:
    pass


@dataclass(frozen=True, slots=True)
class Read:
    max_entries: int


@dataclass(frozen=True, slots=True)
class Send(Generic[P, E]):
    """Produce these entries in order; answer with `on_sent(n)`, n = how many were handed over
    (fewer when librdkafka's queue is full), and later `on_replayed(ordinal, outcome)` each."""

    items: tuple[tuple[P, E], ...]


@dataclass(frozen=True, slots=True)
class LoadTail:
    pass


@dataclass(frozen=True, slots=True)
class Probe:
    pass


@dataclass(frozen=True, slots=True)
class KafkaBack:
    pass


@dataclass(frozen=True, slots=True)
class StartSpooling:
    reason: OutageReason
    in_flight: int


@dataclass(frozen=True, slots=True)
class ReplayStalled:
    pass


@dataclass(frozen=True, slots=True)
class TakenOver(Generic[E]):
    """Entries spooled by an earlier run, read for the first time (count them as accepted)."""

    entries: tuple[E, ...]


@dataclass(frozen=True, slots=True)
class SkippedDuplicates:
    count: int


@dataclass(frozen=True, slots=True)
class GoLive:
    """Everything spooled is delivered: live again. `produce`: records that came in after the
    last append, to hand to librdkafka now (already counted as accepted), in this order."""

    replayed: int
    outage_s: float
    produce: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = (
    Produce
    | Append
    | AckPosition[P]
    | Rewind
    | Read
    | Send[P, E]
    | LoadTail
    | Probe
    | KafkaBack
    | StartSpooling
    | ReplayStalled
    | TakenOver[E]
    | SkippedDuplicates
    | GoLive
    | Stop
)


@dataclass(frozen=True, slots=True)
class Policy:
    outage_after_s: float
    replay_window: int
    queue_limit: int  # records in librdkafka that count as an outage
    replay_deadline_s: float = 10.0  # after end of input: how long the replay may go on
    trades_topic: str | None = None


# -- state ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Shadows:
    """Originals in librdkafka whose copy is (or is about to be) in the spool."""

    # seq of the original -> spool ordinal of its shadow (None until appended)
    of: dict[int, int | None] = field(default_factory=dict)
    # resolved before their shadow was appended: seq -> delivered?
    early: dict[int, bool] = field(default_factory=dict)
    # shadow ordinals whose original is unresolved
    awaiting: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Replay(Generic[P, E]):
    """What was read back from the spool, by ordinal."""

    outstanding: deque[P] = field(default_factory=deque)  # read, not acked, in order
    unsent: deque[tuple[P, E]] = field(default_factory=deque)
    stash: dict[int, tuple[P, E]] = field(default_factory=dict)  # read shadows, sent if needed
    done: set[int] = field(default_factory=set)  # resolved, not yet acked
    given_back: set[int] = field(default_factory=set)  # sent, given back: resent after a rewind
    acked: int = 0  # ordinals below this were acknowledged (never read again)


@dataclass(slots=True)
class _Backlog:
    """Entries a crashed or stopped run left in the spool (ordinals below `end`)."""

    end: int = 0
    counted: int = 0  # ordinals below this were reported as TakenOver
    tail: dict[str, int] | None = None  # the trades topic's last id per symbol, once read
    skipped: int = 0


class Delivery(Generic[P, E]):
    """The producer stage's delivery/spool state machine (see the module docstring)."""

    def __init__(self, policy: Policy, *, topic_tail: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.mode = Mode.LIVE
        self.kafka_up = True
        self.probe_wanted = False
        self.probes_failed = 0
        self.full = False  # the last append was refused: take no batches until one succeeds
        self.input_done = False
        self._outage_started = 0.0
        self._sent_in_outage = 0
        self._end_deadline: float | None = None
        self._probes_failed_at_end = 0
        self._pending: list[Any] = []  # accepted while spooling, not appended yet
        # Shadows (and the rest of the last batch) waiting to be appended: (seq, record).
        self._carry: list[tuple[int, Any]] = []
        self._shadows = _Shadows()
        self._replay: _Replay[P, E] = _Replay()
        self._backlog = _Backlog(tail=topic_tail)

    # -- queries ----------------------------------------------------------------------------------

    @property
    def spooling(self) -> bool:
        return self.mode is Mode.SPOOLING

    @property
    def takes_batches(self) -> bool:
        """Spooling: may the driver receive another batch? (not after a refused append)"""
        return not (self.input_done or self.full)

    @property
    def wants_more(self) -> bool:
        """Spooling: should the driver take batches already waiting before the next append?"""
        return self.takes_batches and len(self._pending) < APPEND_MAX_RECORDS

    @property
    def replay_in_flight(self) -> bool:
        """Spooled entries or shadowed originals still wait for a delivery report."""
        return bool(self._replay.outstanding or self._shadows.awaiting)

    @property
    def stashed(self) -> int:
        return len(self._replay.stash)

    def wait_s(self, spool_unread: int) -> float:
        """Spooling: how long the driver may wait for a batch before the next tick."""
        busy = self.kafka_up and (self._replay.outstanding or spool_unread)
        return REPLAY_TICK_S if busy else LIVE_CHECK_S

    def outage_reason(
        self,
        now: float,
        *,
        in_flight: int,
        progress_at: float,
        brokers_down: bool,
        returned: int = 0,
    ) -> OutageReason | None:
        """Live: has Kafka stopped taking records? (`progress_at`: when an ack last came, or the
        queue last went from empty to busy; `returned`: records librdkafka gave up on since)"""
        if returned:
            return OutageReason.GAVE_UP
        if not in_flight:
            return None
        idle_s = now - progress_at
        if brokers_down and idle_s > min(1.0, self.policy.outage_after_s):
            return OutageReason.BROKERS_DOWN
        if in_flight >= self.policy.queue_limit:
            return OutageReason.QUEUE_FULL
        if idle_s > self.policy.outage_after_s:
            return OutageReason.NO_ACKS
        return None

    # -- events -----------------------------------------------------------------------------------

    def start(self, now: float, *, backlog: int) -> list[Command[P, E]]:
        """The stage starts with `backlog` entries left in the spool by an earlier run (ordinals
        0..backlog-1): they are replayed before any new data."""
        self._backlog.end = backlog
        if backlog:
            return self._start_spooling(OutageReason.BACKLOG, now, in_flight=0)
        return []

    def on_batch(self, records: Sequence[Any]) -> Produce | None:
        """A batch came in. Live: produce it. Spooling: it waits for the next append."""
        if self.mode is Mode.LIVE:
            return Produce(records)
        self._pending.extend(records)
        return None

    def on_input_end(self) -> None:
        self.input_done = True

    def on_outage(
        self,
        reason: OutageReason,
        now: float,
        *,
        unacked: Iterable[tuple[int, Any]],
        given_up: Iterable[tuple[int, Any]],
        rest: Sequence[Any] = (),
    ) -> list[Command[P, E]]:
        """Live -> spooling. `unacked`: what librdkafka still holds, by produce sequence number
        (their shadows are appended first); `given_up`: what it gave back meanwhile; `rest`: the
        part of the last batch it never took."""
        held = list(unacked)
        for seq, _ in held:
            self._shadows.of[seq] = None
        merged = sorted([*held, *given_up], key=lambda r: r[0])
        self._carry = [*merged, *((NO_ORIGINAL, r) for r in rest)]
        return self._start_spooling(reason, now, in_flight=len(held))

    def on_original(self, seq: int, delivered: bool) -> bool:
        """librdkafka resolved an original: acknowledged or refused for good (`delivered`), or
        given up (not `delivered`). True when a shadow in the spool covers it."""
        sh = self._shadows
        if seq not in sh.of:
            return False
        ordinal = sh.of.pop(seq)
        if ordinal is None:  # its shadow is not appended yet
            sh.early[seq] = delivered
            return True
        sh.awaiting.discard(ordinal)
        r = self._replay
        read = r.stash.pop(ordinal, None)
        if delivered:
            r.done.add(ordinal)  # the copy is never sent (it was kept in `stash` if read)
        elif read is not None:  # read already: send the copy now
            r.unsent.append(read)
        return True

    def on_returned(self, records: Sequence[Any]) -> None:
        """Given up by librdkafka without a shadow (produced live, failed since): appended
        before the waiting batches. Older than what is spooled already, so per-symbol order may
        break here; never lost."""
        self._pending[:0] = records

    def on_appended(self, cmd: Append, base: int) -> None:
        """The spool took `cmd.records` at ordinals base, base+1, ..."""
        self.full = False
        if not cmd.shadows:
            return
        sh = self._shadows
        for i, (seq, _) in enumerate(self._carry):
            if seq == NO_ORIGINAL or (seq not in sh.of and seq not in sh.early):
                continue  # not a shadow (given up already, or the batch rest)
            ordinal = base + i
            early = sh.early.pop(seq, None)
            if early is None:
                sh.of[seq] = ordinal
                sh.awaiting.add(ordinal)
            elif early:
                self._replay.done.add(ordinal)  # the original got through meanwhile
            # else: the original was given up meanwhile: the shadow is sent like any entry
        self._carry = []

    def on_full(self, cmd: Append) -> None:
        """The spool refused `cmd.records` (full): keep them, take no batches meanwhile."""
        self.full = True
        if not cmd.shadows:
            self._pending[:0] = cmd.records

    def on_read(self, items: Sequence[tuple[P, E]]) -> list[Command[P, E]]:
        r, b, sh = self._replay, self._backlog, self._shadows
        taken: list[E] = []
        skipped = 0
        for pos, entry in items:
            r.outstanding.append(pos)
            o = pos.ordinal
            if b.counted <= o < b.end:
                taken.append(entry)
                b.counted = o + 1
            if o in r.done:
                continue
            if o in sh.awaiting:
                r.stash[o] = (pos, entry)
            elif o < b.end and self._in_topic(entry):
                r.done.add(o)
                skipped += 1
            else:
                r.unsent.append((pos, entry))
        out: list[Command[P, E]] = []
        if taken:
            out.append(TakenOver(tuple(taken)))
        if skipped:
            b.skipped += skipped
            out.append(SkippedDuplicates(skipped))
        if r.unsent:
            out.append(Send(tuple(r.unsent)))
        return out

    def on_sent(self, count: int) -> None:
        unsent = self._replay.unsent
        for _ in range(count):
            unsent.popleft()
        self._sent_in_outage += count

    def on_replayed(self, ordinal: int, outcome: Outcome) -> None:
        if outcome is Outcome.GIVEN_BACK:
            self._replay.given_back.add(ordinal)
        else:
            self._replay.done.add(ordinal)

    def on_probe(self, ok: bool) -> list[Command[P, E]]:
        if not ok:
            self.probes_failed += 1
            return []
        self.probe_wanted = False
        self.kafka_up = True
        return [KafkaBack()]

    def on_tail(self, tail: dict[str, int] | None) -> list[Command[P, E]]:
        """The trades topic's last ids (None: Kafka did not answer; try again once it does)."""
        if tail is None:
            return self._kafka_down()
        self._backlog.tail = tail
        return []

    def tick(self, now: float, *, spool_unread: int, progress_at: float) -> list[Command[P, E]]:
        """Spooling: what to do now (the driver calls it after taking waiting batches and
        serving delivery reports, and performs the commands in order)."""
        if self.mode is not Mode.SPOOLING:
            return []
        r = self._replay
        out: list[Command[P, E]] = []
        ack = self.ack_prefix()
        if ack is not None:
            out.append(ack)
        # Everything appended was read (`spool_unread` 0) and, with this ack, acknowledged:
        # what came in since the last append can go straight to Kafka, in order after all of it
        # (so a steady input does not keep the stage spooling until a quiet moment).
        caught_up = not (self._carry or r.outstanding or r.unsent or spool_unread)
        if caught_up and self.input_done and not self._pending:
            return [*out, Stop()]
        if caught_up and self.kafka_up:
            return [*out, self._go_live(now)]
        if self.input_done and (self.full or not self._pending) and self._draining_over(now):
            return [*out, Stop()]
        if self._carry:
            out.append(Append([rec for _, rec in self._carry], shadows=True))
        elif self._pending:
            out.append(Append(self._pending))
            self._pending = []
        if r.given_back:
            if self._all_reported():
                # Read again from the first unacked entry; what was delivered meanwhile stays
                # in `done` and is skipped.
                r.given_back.clear()
                r.outstanding.clear()
                r.unsent.clear()
                r.stash.clear()
                out.append(Rewind())
            return out
        if not self.kafka_up:
            return out
        if r.outstanding and now - progress_at > self.policy.outage_after_s:
            return [*out, ReplayStalled(), *self._kafka_down()]
        if self._backlog.end and self._backlog.tail is None:
            out.append(LoadTail())
            return out
        room = self.policy.replay_window - len(r.outstanding)
        if room > 0 and spool_unread:
            out.append(Read(room))  # on_read answers with the Send
        elif r.unsent:
            out.append(Send(tuple(r.unsent)))
        return out

    def ack_prefix(self) -> AckPosition[P] | None:
        """The resolved prefix of the outstanding entries, to acknowledge (what was resolved
        out of order waits in `done` until everything before it is)."""
        r = self._replay
        acked: P | None = None
        while r.outstanding and r.outstanding[0].ordinal in r.done:
            acked = r.outstanding.popleft()
            r.done.discard(acked.ordinal)
        if acked is None:
            return None
        r.acked = acked.ordinal + 1
        return AckPosition(acked)

    def leftovers(self, returned: Iterable[tuple[int, Any]]) -> list[Any]:
        """End of input while spooling: what must still be appended. Shadows cover the
        originals still unresolved; given-up records without one, the carry and whatever
        waits for an append do not."""
        left = [rec for seq, rec in returned if seq not in self._shadows.of]
        left += [rec for _, rec in self._carry]
        left += self._pending
        self._carry = []
        self._pending = []
        return left

    # -- invariants -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError when the bookkeeping contradicts itself (see module docstring)."""
        r, sh = self._replay, self._shadows
        read = [p.ordinal for p in r.outstanding]
        assert not read or read == list(range(read[0], read[0] + len(read))), read
        read_set = set(read)
        assert not read or read[0] >= r.acked, ("read again after its ack", read[0], r.acked)
        assert all(o >= r.acked for o in r.done | sh.awaiting), "resolved entry below the ack"
        unsent = {p.ordinal for p, _ in r.unsent}
        assert len(unsent) == len(r.unsent), "an entry waits twice to be sent"
        assert not (r.done & sh.awaiting), r.done & sh.awaiting
        assert not (unsent & r.done) and not (unsent & sh.awaiting), unsent
        assert unsent <= read_set and set(r.stash) <= read_set, (unsent, set(r.stash))
        assert set(r.stash) <= sh.awaiting, set(r.stash) - sh.awaiting
        assert r.given_back <= read_set, r.given_back - read_set
        placed = {o for o in sh.of.values() if o is not None}
        assert placed == sh.awaiting, (placed, sh.awaiting)
        carried = {seq for seq, _ in self._carry}
        unplaced = {s for s, o in sh.of.items() if o is None}
        assert unplaced <= carried and set(sh.early) <= carried, (unplaced, set(sh.early))
        assert not (set(sh.early) & set(sh.of)), set(sh.early) & set(sh.of)
        assert self.kafka_up or self.probe_wanted, "Kafka down and nobody probing"
        if self.mode is Mode.LIVE:
            assert self.kafka_up and not self.full
            assert not (self._pending or self._carry or sh.of or sh.early or sh.awaiting)
            assert not (r.outstanding or r.unsent or r.stash or r.given_back or r.done)

    # -- internals --------------------------------------------------------------------------------

    def _start_spooling(
        self, reason: OutageReason, now: float, *, in_flight: int
    ) -> list[Command[P, E]]:
        self.mode = Mode.SPOOLING
        self._outage_started = now
        self._sent_in_outage = 0
        return [StartSpooling(reason, in_flight), *self._kafka_down()]

    def _kafka_down(self) -> list[Command[P, E]]:
        self.kafka_up = False
        self.probe_wanted = True
        return [Probe()]

    def _go_live(self, now: float) -> GoLive:
        self.mode = Mode.LIVE
        self.full = False
        self._replay.done.clear()
        waiting, self._pending = self._pending, []
        return GoLive(self._sent_in_outage, now - self._outage_started, waiting)

    def _draining_over(self, now: float) -> bool:
        """Input over (and appended, or the spool full): replay on while Kafka takes it,
        within the deadline; when it is down, one more failed probe ends the wait (the records
        are safe on disk; what a full spool refused is logged as lost at shutdown)."""
        if self._end_deadline is None:
            self._end_deadline = now + self.policy.replay_deadline_s
            self._probes_failed_at_end = self.probes_failed
        if now >= self._end_deadline:
            return True
        return not self.kafka_up and self.probes_failed > self._probes_failed_at_end

    def _all_reported(self) -> bool:
        """No outstanding entry is in librdkafka: each is resolved, given back, waiting for its
        original, or not sent (a shadow whose original was given up after it was read: with
        it counted, a rewind is not held up by an entry that waits for the rewind to be sent)."""
        r, awaiting = self._replay, self._shadows.awaiting
        unsent = {p.ordinal for p, _ in r.unsent}
        return all(
            o in r.done or o in r.given_back or o in awaiting or o in unsent
            for o in (p.ordinal for p in r.outstanding)
        )

    def _in_topic(self, entry: E) -> bool:
        """An earlier run's spooled trade that reached the topic anyway (a crash can leave a
        record both written by the broker and spooled): skipped, so the tape stays
        duplicate-free."""
        tail = self._backlog.tail
        if entry.topic != self.policy.trades_topic or not tail:
            return False
        t = trade_identity(entry.value)
        return t is not None and t.trade_id <= tail.get(t.symbol, -1)
