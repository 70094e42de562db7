"""`marketd verify tape`: prove a trade topic has no gap and no duplicate, per symbol.

Reads every partition of the topic from its low watermark (the oldest record retention kept: ids
before it are not gaps) to the high watermark seen at start, by explicit assignment (no consumer
group, nothing committed), and reports per symbol the id range, gaps, duplicates, backfilled and
out-of-order counts. Exit 0: clean; 1: a gap or a duplicate; 2: configuration error; 3: Kafka
could not be read to the end. `analyze()` is the pure core.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple, TextIO

import attrs

from marketd.records import trade_identity

EXIT_OK: Final = 0
EXIT_DEFECT: Final = 1
EXIT_CONFIG: Final = 2
EXIT_KAFKA: Final = 3
SAMPLE: Final = 20  # duplicate ids / gaps listed per symbol in text output


class TapeEntry(NamedTuple):
    """One trade as read back: enough to check continuity."""

    symbol: str
    trade_id: int
    backfill: bool


class _Ranges:
    """A set of ints kept as sorted disjoint ranges: memory grows with the gaps, not the ids."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, i: int) -> bool:
        """Add `i`; False if it was already there."""
        starts, ends = self.starts, self.ends
        if ends and i == ends[-1] + 1:  # the usual case: the next id
            ends[-1] = i
            return True
        k = bisect.bisect_right(starts, i) - 1
        if k >= 0 and i <= ends[k]:
            return False
        left = k >= 0 and ends[k] == i - 1
        right = k + 1 < len(starts) and starts[k + 1] == i + 1
        if left and right:
            ends[k] = ends[k + 1]
            del starts[k + 1], ends[k + 1]
        elif left:
            ends[k] = i
        elif right:
            starts[k + 1] = i
        else:
            starts.insert(k + 1, i)
            ends.insert(k + 1, i)
        return True

    def gaps(self) -> list[tuple[int, int]]:
        return [(self.ends[j] + 1, self.starts[j + 1] - 1) for j in range(len(self.starts) - 1)]


@attrs.define
class SymbolReport:
    symbol: str
    first_id: int
    last_id: int
    records: int = 0  # read, duplicates included
    duplicates: int = 0
    backfilled: int = 0
    out_of_order: int = 0  # ids lower than an earlier one, not duplicates
    duplicate_ids: list[int] = attrs.field(factory=list)  # the first SAMPLE of them
    gaps: list[tuple[int, int]] = attrs.field(factory=list)  # missing ranges, inclusive

    @property
    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.gaps)

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.duplicates


@attrs.define
class TapeReport:
    topic: str
    symbols: dict[str, SymbolReport]
    records: int
    undecodable: int = 0
    partitions: list[tuple[int, int, int]] = attrs.field(factory=list)  # partition, low, high

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.symbols.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "ok": self.ok,
            "records": self.records,
            "undecodable": self.undecodable,
            "partitions": [
                {"partition": p, "low": lo, "high": hi} for p, lo, hi in self.partitions
            ],
            "symbols": {
                name: {
                    "first_id": s.first_id,
                    "last_id": s.last_id,
                    "records": s.records,
                    "gaps": [[a, b] for a, b in s.gaps],
                    "missing": s.missing,
                    "duplicates": s.duplicates,
                    "duplicate_ids_sample": s.duplicate_ids,
                    "backfilled": s.backfilled,
                    "out_of_order": s.out_of_order,
                    "ok": s.ok,
                }
                for name, s in sorted(self.symbols.items())
            },
        }


def analyze(entries: Iterable[TapeEntry], topic: str = "", undecodable: int = 0) -> TapeReport:
    """Per-symbol continuity of a tape, in the order it was read (per-partition order)."""
    ranges: dict[str, _Ranges] = {}
    reports: dict[str, SymbolReport] = {}
    previous: dict[str, int] = {}
    total = 0
    for symbol, trade_id, backfill in entries:
        total += 1
        r = ranges.get(symbol)
        if r is None:
            r = ranges[symbol] = _Ranges()
            reports[symbol] = SymbolReport(symbol, trade_id, trade_id)
        rep = reports[symbol]
        rep.records += 1
        if backfill:
            rep.backfilled += 1
        if not r.add(trade_id):
            rep.duplicates += 1
            if len(rep.duplicate_ids) < SAMPLE:
                rep.duplicate_ids.append(trade_id)
            continue
        prev = previous.get(symbol)
        if prev is not None and trade_id < prev:
            rep.out_of_order += 1
        else:
            previous[symbol] = trade_id
        rep.first_id = min(rep.first_id, trade_id)
        rep.last_id = max(rep.last_id, trade_id)
    for symbol, rep in reports.items():
        # Only holes between ids we saw: what retention removed before the first is no gap.
        rep.gaps = ranges[symbol].gaps()
    return TapeReport(topic, reports, total, undecodable)


# -- reading Kafka --------------------------------------------------------------------------------


class KafkaReadError(Exception):
    pass


@attrs.define
class _Reader:
    undecodable: int = 0
    partitions: list[tuple[int, int, int]] = attrs.field(factory=list)


def read_tape(
    settings: dict[str, Any],
    topic: str,
    symbols: frozenset[str] | None,
    timeout_s: float,
    reader: _Reader,
) -> Iterator[TapeEntry]:
    """Every trade of `topic` from the low to the (initial) high watermark of each partition."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer(settings)
    deadline = time.monotonic() + timeout_s
    try:
        try:
            md = consumer.list_topics(topic, timeout=max(1.0, min(10.0, timeout_s)))
        except confluent_kafka.KafkaException as exc:
            raise KafkaReadError(f"cannot reach Kafka: {exc}") from exc
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            why = tmd.error.str() if tmd is not None and tmd.error is not None else "no partitions"
            raise KafkaReadError(f"topic {topic!r} not available: {why}")
        assign = []
        high: dict[int, int] = {}
        for p in sorted(tmd.partitions):
            tp = confluent_kafka.TopicPartition(topic, p)
            try:
                low, hi = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            except confluent_kafka.KafkaException as exc:
                raise KafkaReadError(f"watermarks of {topic}[{p}]: {exc}") from exc
            reader.partitions.append((p, low, hi))
            if hi > low:
                assign.append(confluent_kafka.TopicPartition(topic, p, low))
                high[p] = hi
        if not assign:
            return
        consumer.assign(assign)
        pending = set(high)
        while pending:
            if time.monotonic() > deadline:
                raise KafkaReadError(
                    f"timed out after {timeout_s:g} s with partitions {sorted(pending)} unfinished"
                )
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaReadError(f"reading {topic}: {err.str()}")
                p, offset = msg.partition(), msg.offset()
                if p is None or offset is None or p not in pending or offset >= high[p]:
                    continue  # produced after we started: not part of this check
                entry = _entry(msg, reader)
                if entry is not None and (symbols is None or entry.symbol in symbols):
                    yield entry
                if offset >= high[p] - 1:
                    pending.discard(p)
            # Offsets can skip (control records, compaction): trust the position too.
            for tp in consumer.position(
                [confluent_kafka.TopicPartition(topic, p) for p in pending]
            ):
                if tp.offset >= high[tp.partition]:
                    pending.discard(tp.partition)
    finally:
        consumer.close()


def _entry(msg: Any, reader: _Reader) -> TapeEntry | None:
    v = trade_identity(msg.value() or b"")
    if v is None:
        reader.undecodable += 1
        return None
    backfill = v.backfill or any(
        k == "backfill" and val in (b"1", b"true") for k, val in (msg.headers() or ())
    )
    return TapeEntry(v.symbol, v.trade_id, backfill)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default=None, help="trade topic (default: topics.raw_trades)")
    parser.add_argument(
        "--symbol",
        action="append",
        metavar="SYMBOL",
        help="only these symbols (repeatable; default: all)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MARKETD_CONFIG") or None,
        help="marketd.toml, as for `marketd run` (default: $MARKETD_CONFIG)",
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="give up reading after S seconds"
    )


def main(args: argparse.Namespace) -> int:
    from marketd.cli import load
    from marketd.kafka.client import consumer_settings, is_embedded

    cfg = load(args).config
    topic = args.topic or cfg.topics.raw_trades
    if is_embedded(cfg.kafka.bootstrap_servers):
        print(
            "marketd verify: kafka.bootstrap_servers is 'embedded', a mock cluster that lives "
            "inside the daemon; point KAFKA_BOOTSTRAP_SERVERS at the brokers to verify",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    settings = consumer_settings(
        cfg.kafka,
        cfg.kafka.bootstrap_servers,
        f"marketd-verify-{uuid.uuid4().hex[:8]}",  # never committed: assignment only
        **{"enable.partition.eof": False},
    )
    symbols = frozenset(s.strip().upper() for s in args.symbol) if args.symbol else None
    reader = _Reader()
    try:
        report = analyze(read_tape(settings, topic, symbols, args.timeout, reader), topic)
    except KafkaReadError as exc:
        print(f"marketd verify: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    report.undecodable = reader.undecodable
    report.partitions = reader.partitions
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_DEFECT


def render(report: TapeReport, out: TextIO) -> None:
    parts = ", ".join(f"{p}:{lo}-{hi}" for p, lo, hi in report.partitions)
    out.write(f"topic {report.topic}: {report.records} trades read (partition:low-high {parts})\n")
    if report.undecodable:
        out.write(f"  {report.undecodable} records are not trade records (ignored)\n")
    header = ("symbol", "first_id", "last_id", "records", "missing", "gaps", "dups", "backfill")
    out.write("{:<14}{:>14}{:>14}{:>10}{:>9}{:>6}{:>6}{:>10}\n".format(*header))
    for name, s in sorted(report.symbols.items()):
        out.write(
            f"{name:<14}{s.first_id:>14}{s.last_id:>14}{s.records:>10}{s.missing:>9}"
            f"{len(s.gaps):>6}{s.duplicates:>6}{s.backfilled:>10}\n"
        )
        for a, b in s.gaps[:SAMPLE]:
            out.write(f"    gap {a}..{b} ({b - a + 1} ids)\n")
        if len(s.gaps) > SAMPLE:
            out.write(f"    ... {len(s.gaps) - SAMPLE} more gaps\n")
        if s.duplicate_ids:
            more = " ..." if s.duplicates > len(s.duplicate_ids) else ""
            out.write(f"    duplicate ids {', '.join(map(str, s.duplicate_ids))}{more}\n")
        if s.out_of_order:
            out.write(f"    {s.out_of_order} ids arrived after a higher id (out of order)\n")
    gaps = sum(len(s.gaps) for s in report.symbols.values())
    dups = sum(s.duplicates for s in report.symbols.values())
    verdict = "OK" if report.ok else "FAIL"
    out.write(f"{verdict}: {len(report.symbols)} symbols, {gaps} gaps, {dups} duplicates\n")
