"""Offset bookkeeping of the Python Kafka source: pure functions, no Kafka, no Spark.

An offset is Spark's checkpointed JSON, in the JVM connector's shape: `{"topic": {"0": 42}}` (the
next offset to read per partition). `admit` picks the end offset of the next micro-batch under a
row limit (`--max-offsets-per-trigger`), `cap` bounds it by the Trigger.AvailableNow target,
`ranges` turns (start, end) into the per-partition ranges the executors read, and `gaps` tells
which part of a range retention had already deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TopicPartition = tuple[str, int]
Offsets = dict[TopicPartition, int]


@dataclass(frozen=True)
class OffsetRange:
    """Records [start, end) of one Kafka partition: one Spark task reads it."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def to_json(offsets: Mapping[TopicPartition, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(offset)
    return out


def from_json(data: Mapping[str, Mapping[str, int]]) -> Offsets:
    return {
        (topic, int(partition)): int(offset)
        for topic, parts in data.items()
        for partition, offset in parts.items()
    }


def admit(
    start: Mapping[TopicPartition, int],
    earliest: Mapping[TopicPartition, int],
    latest: Mapping[TopicPartition, int],
    max_rows: int | None,
) -> Offsets:
    """End offsets of the next micro-batch: everything available, or at most `max_rows` records.

    A partition missing from `start` (new, or its topic appeared after the query started) starts
    at its earliest offset. Records already deleted (start < earliest) are not counted against the
    limit: they cannot be read, only reported as a gap. Under a limit, each partition gets a share
    proportional to its backlog (largest remainders, so the shares sum exactly to the limit and a
    small backlog is never starved by a large one). A partition that vanished from the metadata
    keeps its start offset: the end never moves backwards.
    """
    begin: Offsets = {}
    backlog: Offsets = {}
    for tp, last in latest.items():
        first = start.get(tp, earliest.get(tp, 0))
        readable_from = max(first, earliest.get(tp, first))
        begin[tp] = readable_from
        backlog[tp] = max(0, last - readable_from)
    end: Offsets = dict(start)
    total = sum(backlog.values())
    if max_rows is None or total <= max_rows:
        for tp in latest:
            end[tp] = max(begin[tp] + backlog[tp], start.get(tp, begin[tp]))
        return end
    shares = _proportional(backlog, max(1, max_rows))
    for tp in latest:
        end[tp] = max(begin[tp] + shares[tp], start.get(tp, begin[tp]))
    return end


def _proportional(backlog: Mapping[TopicPartition, int], limit: int) -> Offsets:
    total = sum(backlog.values())
    floors = {tp: n * limit // total for tp, n in backlog.items()}
    left = limit - sum(floors.values())
    # Largest remainder first; ties by name so the plan is deterministic.
    order = sorted(backlog, key=lambda tp: (-((backlog[tp] * limit) % total), tp))
    for tp in order[:left]:
        floors[tp] += 1
    return floors


def cap(end: Mapping[TopicPartition, int], target: Mapping[TopicPartition, int]) -> Offsets:
    """`end` bounded by the Trigger.AvailableNow target (partitions outside it are not read)."""
    return {tp: min(off, target[tp]) for tp, off in end.items() if tp in target}


def ranges(
    start: Mapping[TopicPartition, int],
    end: Mapping[TopicPartition, int],
    earliest_default: Mapping[TopicPartition, int] | None = None,
    *,
    max_records_per_task: int = 0,
) -> list[OffsetRange]:
    """The non-empty per-partition ranges between two offsets, split into tasks of at most
    `max_records_per_task` records (0 = one task per partition), in a stable order."""
    out: list[OffsetRange] = []
    for tp in sorted(end):
        first = start.get(tp)
        if first is None:
            first = (earliest_default or {}).get(tp, 0)
        last = end[tp]
        if last <= first:
            continue
        step = max_records_per_task if max_records_per_task > 0 else last - first
        for lo in range(first, last, step):
            out.append(OffsetRange(tp[0], tp[1], lo, min(lo + step, last)))
    return out


def gaps(wanted: OffsetRange, earliest: int) -> int:
    """Records of `wanted` that retention deleted before they were read."""
    return max(0, min(earliest, wanted.end) - wanted.start)


def parse_starting(spec: str, topics: Iterable[str]) -> str | Offsets:
    """`earliest`, `latest` or the JVM connector's JSON ({"topic":{"0":23}}; -2 = earliest,
    -1 = latest per partition). Returns the keyword or the explicit offsets."""
    import json

    text = spec.strip()
    if text in ("earliest", "latest"):
        return text
    try:
        data = json.loads(text)
        offsets = from_json(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"startingOffsets must be earliest, latest or JSON like "
            f'{{"topic":{{"0":23}}}}, got {spec!r}'
        ) from exc
    unknown = {t for t, _ in offsets} - set(topics)
    if unknown:
        raise ValueError(f"startingOffsets names topics not subscribed: {sorted(unknown)}")
    return offsets
