"""A bounded, crash-safe on-disk queue of Kafka messages for a broker outage (sync, no trio).

Receives batches of `SpoolEntry` (`append`, fsync'd once per call: when it returns, a kill -9 or a
power cut loses nothing); gives them back in append order (`read`) until `ack`ed, across restarts.
`open()` scans every segment, truncates a torn or corrupt tail and reports it (logged, counted,
returned), never replaying it. Fully acked segments are deleted; an empty spool leaves no files.
Thread-safe (one lock); callers on trio use `trio.to_thread.run_sync` with their own limiter.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Protocol

import attrs

from marketd.errors import MarketdError
from marketd.logs import get_logger
from marketd.metrics import MetricsFactory
from marketd.spool.segment import (
    HEADER_BYTES,
    MAGIC,
    Damage,
    SpoolEntry,
    encode_frame,
    fsync_dir,
    iter_frames,
    scan,
    segment_name,
    segment_seq,
    truncate,
)

log = get_logger(__name__)

ACK_FILE: Final = "ack"
# Spool directories this process holds the flock of (real path -> directory fd). Like POSIX record
# locks, the lock excludes other processes only: a second Spool on the same directory in this
# process (a simulated crash in the tests) shares it.
_LOCKED_DIRS: dict[str, int] = {}
_ACK: Final = struct.Struct(">QQI")  # segment, offset, crc32 of the first 16 bytes


class SpoolError(MarketdError):
    """The spool cannot take or give back data (disk error, unusable directory)."""


class SpoolFull(SpoolError):
    """Appending would exceed max_bytes: the caller applies backpressure instead of dropping."""

    def __init__(self, size_bytes: int, batch_bytes: int, max_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.batch_bytes = batch_bytes
        self.max_bytes = max_bytes
        super().__init__(f"spool full: {size_bytes} + {batch_bytes} bytes > cap {max_bytes}")


class EntryLike(Protocol):
    """What `append` accepts: SpoolEntry, or the pipeline's Outgoing (same fields)."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...
    @property
    def recv_ns(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, bytes]] | None: ...


class Position(NamedTuple):
    """Where an entry ends; `ack(position)` = this entry and all before it were delivered."""

    segment: int
    offset: int  # byte offset just after the entry
    ordinal: int  # 0-based count of the entry among those pending since open (for `pending`)


@attrs.frozen
class Corruption:
    """Damage found in a segment; the bytes from `offset` on were truncated away, not replayed."""

    path: str
    offset: int
    reason: str  # see segment.Damage
    bytes_discarded: int


@attrs.frozen
class OpenReport:
    pending: int
    size_bytes: int
    segments: int
    corruptions: tuple[Corruption, ...]


@attrs.define
class _Segment:
    seq: int
    path: Path
    size: int  # bytes of valid data (header included) = where the next frame goes
    entries: int  # valid entries after the ack point (all of them for unacked segments)


class Spool:
    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        segment_bytes: int,
        *,
        metrics: MetricsFactory | None = None,
    ) -> None:
        if segment_bytes <= HEADER_BYTES or max_bytes < segment_bytes:
            raise ValueError("need max_bytes >= segment_bytes > segment header size")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._writer: int | None = None  # fd of the last segment, opened for append
        self._next_seq = 1
        self._read = (0, 0)  # (segment seq, offset) of the next entry to read
        self._ack_cursor = (0, 0)  # (segment seq, offset) just after the last acked entry
        self._next_index = 0  # index the next appended entry gets
        self._read_index = 0
        self._acked_index = 0  # entries with index < this are delivered
        self._opened = False
        self._dir_lock: int | None = None  # fd of the directory, flock'ed while open
        m = metrics or MetricsFactory()
        self._m_bytes = m.gauge("spool_bytes", "bytes in the Kafka-outage spool")
        self._m_pending = m.gauge("spool_pending_records", "spooled records not yet delivered")
        self._m_records = m.counter(
            "spool_records", "spool records by operation (appended, replayed, acked)", ["op"]
        )
        self._m_corrupt = m.counter(
            "spool_corruptions", "damaged spool data truncated on open or read", ["reason"]
        )
        self._m_full = m.counter("spool_full", "appends refused because the spool was full")

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> OpenReport:
        """Recover after a stop or a crash: drop acked data, validate, truncate damage."""
        with self._lock:
            return self._open()

    def close(self) -> None:
        with self._lock:
            self._close_writer()
            self._opened = False
            self._unlock_dir()

    def _lock_dir(self) -> None:
        """One process per spool directory: two writers would interleave and ack each other."""
        self._unlock_dir()
        key = os.path.realpath(self.dir)
        if key in _LOCKED_DIRS:
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(
                f"spool directory {self.dir} is in use by another process (flock: {exc}); "
                "give each marketd instance its own spool.dir (SPOOL_DIR)"
            ) from exc
        self._dir_lock = fd
        _LOCKED_DIRS[key] = fd

    def _unlock_dir(self) -> None:
        if self._dir_lock is not None:
            _LOCKED_DIRS.pop(os.path.realpath(self.dir), None)
            os.close(self._dir_lock)  # closing the descriptor releases the flock
            self._dir_lock = None

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- state ----------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes on disk, delivered-but-not-yet-deleted data included (what the cap applies to)."""
        return sum(s.size for s in self._segments)

    @property
    def pending(self) -> int:
        """Entries appended (or recovered) and not yet acked."""
        return self._next_index - self._acked_index

    @property
    def appended(self) -> int:
        """The ordinal the next appended entry gets (`Position.ordinal` counts from 0 at open)."""
        return self._next_index

    @property
    def unread(self) -> int:
        """Entries not yet handed out by `read` since the last `rewind`."""
        return self._next_index - self._read_index

    # -- writing --------------------------------------------------------------------------------

    def append(self, entries: Iterable[EntryLike]) -> None:
        """Write a batch durably (one fsync); all or nothing: SpoolFull leaves the spool as is."""
        frames = [
            encode_frame(SpoolEntry(e.topic, e.key, e.value, e.recv_ns, e.headers)) for e in entries
        ]
        if not frames:
            return
        data = b"".join(frames)
        with self._lock:
            self._check_open()
            size = self.size_bytes
            if size + len(data) > self.max_bytes:
                self._m_full.inc()
                raise SpoolFull(size, len(data), self.max_bytes)
            seg = self._segments[-1] if self._writer is not None else None
            rotate = seg is not None and seg.size + len(data) > self.segment_bytes
            if seg is None or (rotate and seg.size > HEADER_BYTES):
                seg = self._new_segment()
            assert self._writer is not None
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._writer, data[written:])
                os.fsync(self._writer)
            except OSError as exc:
                # Leave no half-written batch behind: the next open would report it as damage.
                self._abandon_writer(seg)
                raise SpoolError(f"spool write to {seg.path} failed: {exc}") from exc
            seg.size += len(data)
            seg.entries += len(frames)
            self._next_index += len(frames)
        self._m_records.labels("appended").inc(len(frames))
        self._update_gauges()

    # -- reading --------------------------------------------------------------------------------

    def read(
        self, max_entries: int = 1000, max_bytes: int = 8 << 20
    ) -> list[tuple[Position, SpoolEntry]]:
        """The next unread entries in append order (empty when all were read)."""
        out: list[tuple[Position, SpoolEntry]] = []
        with self._lock:
            self._check_open()
            budget = max_bytes
            while len(out) < max_entries and budget > 0:
                seq, offset = self._read
                seg = self._segment(seq)
                if seg is None or offset >= seg.size:
                    nxt = self._segment_after(seq)
                    if nxt is None:
                        break
                    self._read = (nxt.seq, HEADER_BYTES)
                    continue
                for got in iter_frames(seg.path, offset, seg.size):
                    if isinstance(got, Damage):
                        self._damaged_while_reading(seg, got)
                        break
                    entry, end = got
                    out.append((Position(seg.seq, end, self._read_index), entry))
                    self._read = (seg.seq, end)
                    self._read_index += 1
                    budget -= len(entry.value)
                    if len(out) >= max_entries or budget <= 0:
                        break
        if out:
            self._m_records.labels("replayed").inc(len(out))
        return out

    def replay(self, batch: int = 1000) -> Iterator[tuple[Position, SpoolEntry]]:
        """Every unread entry in append order (a convenience over `read`; ack as you deliver)."""
        while entries := self.read(batch):
            yield from entries

    def rewind(self) -> None:
        """Read again from the first unacked entry (after a failed delivery)."""
        with self._lock:
            self._check_open()
            self._read = self._ack_cursor
            self._read_index = self._acked_index

    def ack(self, position: Position) -> None:
        """Everything up to and including `position` was delivered: persist, delete old segments."""
        with self._lock:
            self._check_open()
            if position.ordinal < self._acked_index:
                return  # already acked (acks may repeat after a rewind)
            if position.ordinal >= self._read_index:
                raise ValueError(f"ack of {position} beyond what was read")
            acked = position.ordinal + 1 - self._acked_index
            self._acked_index = position.ordinal + 1
            self._ack_cursor = (position.segment, position.offset)
            if self.pending == 0:
                self._clear()
            else:
                self._write_ack(position.segment, position.offset)
                self._drop_segments_before(position)
        self._m_records.labels("acked").inc(acked)
        self._update_gauges()

    # -- internals --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._opened:
            raise SpoolError("spool is not open")

    def _open(self) -> OpenReport:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.dir}: {exc}") from exc
        self._lock_dir()
        self._close_writer()
        ack = self._read_ack()
        corruptions: list[Corruption] = []
        segments: list[_Segment] = []
        pending = 0
        names = sorted((seq, p) for p in self.dir.iterdir() if (seq := segment_seq(p)) is not None)
        max_seq = max([ack[0] if ack else 0, *(seq for seq, _ in names)])
        for seq, path in names:
            if ack is not None and seq < ack[0]:
                path.unlink()  # delivered before the last stop
                continue
            start = ack[1] if ack is not None and seq == ack[0] else HEADER_BYTES
            result = scan(path, start)
            if result.damage is not None:
                corruptions.append(self._repair(path, result.damage))
                if result.damage.reason == "bad_header":
                    continue
            segments.append(_Segment(seq, path, result.valid_end, result.entries))
            pending += result.entries
        self._segments = segments
        self._next_seq = max_seq + 1
        first = segments[0].seq if segments else self._next_seq
        resume = ack is not None and ack[0] == first
        self._ack_cursor = (first, ack[1] if ack is not None and resume else HEADER_BYTES)
        self._read = self._ack_cursor
        self._next_index = pending
        self._read_index = self._acked_index = 0
        self._opened = True
        if pending == 0:
            self._clear()
        self._update_gauges()
        report = OpenReport(pending, self.size_bytes, len(self._segments), tuple(corruptions))
        log.info(
            "spool.opened",
            dir=str(self.dir),
            pending=pending,
            size_bytes=report.size_bytes,
            segments=report.segments,
            corruptions=len(corruptions),
        )
        return report

    def _repair(self, path: Path, damage: Damage) -> Corruption:
        corruption = Corruption(str(path), damage.offset, damage.reason, damage.bytes_discarded)
        self._m_corrupt.labels(damage.reason).inc()
        log.error(
            "spool.corrupt",
            path=str(path),
            offset=damage.offset,
            reason=damage.reason,
            bytes_discarded=damage.bytes_discarded,
            action="quarantined" if damage.reason == "bad_header" else "truncated",
        )
        if damage.reason == "bad_header":
            # Not a segment we can read at all: keep it aside for a human, out of the replay.
            path.rename(path.with_suffix(".corrupt"))
        else:
            truncate(path, damage.offset)
        return corruption

    def _damaged_while_reading(self, seg: _Segment, damage: Damage) -> None:
        self._repair(seg.path, damage)
        lost = seg.size - damage.offset
        seg.size = damage.offset
        if seg is self._segments[-1] and self._writer is not None:
            self._close_writer()  # never append behind damaged bytes
        # The entries after the damage are gone: what remains unread is in the later segments.
        later = sum(s.entries for s in self._segments if s.seq > seg.seq)
        self._next_index = self._read_index + later
        log.error("spool.read_damage", path=str(seg.path), bytes_lost=lost)

    def _new_segment(self) -> _Segment:
        self._close_writer()
        seq = self._next_seq
        self._next_seq += 1
        path = self.dir / segment_name(seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            os.write(fd, MAGIC)
            os.fsync(fd)
            fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot create spool segment {path}: {exc}") from exc
        self._writer = fd
        seg = _Segment(seq, path, HEADER_BYTES, 0)
        self._segments.append(seg)
        if len(self._segments) == 1:
            self._read = self._ack_cursor = (seq, HEADER_BYTES)
        return seg

    def _abandon_writer(self, seg: _Segment) -> None:
        self._close_writer()
        try:
            truncate(seg.path, seg.size)
        except OSError as exc:
            log.error("spool.truncate_failed", path=str(seg.path), error=str(exc))

    def _close_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def _segment(self, seq: int) -> _Segment | None:
        for s in self._segments:
            if s.seq == seq:
                return s
        return None

    def _segment_after(self, seq: int) -> _Segment | None:
        for s in self._segments:
            if s.seq > seq:
                return s
        return None

    def _drop_segments_before(self, position: Position) -> None:
        keep: list[_Segment] = []
        for seg in self._segments:
            done = seg.seq < position.segment or (
                seg.seq == position.segment
                and position.offset >= seg.size
                and seg is not self._segments[-1]
            )
            if done:
                seg.path.unlink(missing_ok=True)
            else:
                keep.append(seg)
        self._segments = keep

    def _clear(self) -> None:
        """Nothing pending: delete every segment, then the ack file (in that order: a crash
        between the two leaves an ack pointing at nothing, never segments without their ack)."""
        self._close_writer()
        for seg in self._segments:
            seg.path.unlink(missing_ok=True)
        self._segments = []
        (self.dir / ACK_FILE).unlink(missing_ok=True)
        fsync_dir(self.dir)
        self._ack_cursor = self._read = (self._next_seq, HEADER_BYTES)

    def _write_ack(self, seq: int, offset: int) -> None:
        body = struct.pack(">QQ", seq, offset)
        tmp = self.dir / (ACK_FILE + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(_ACK.pack(seq, offset, zlib.crc32(body)))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.dir / ACK_FILE)
            fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot persist spool ack in {self.dir}: {exc}") from exc

    def _read_ack(self) -> tuple[int, int] | None:
        (self.dir / (ACK_FILE + ".tmp")).unlink(missing_ok=True)
        path = self.dir / ACK_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) == _ACK.size:
            seq, offset, crc = _ACK.unpack(raw)
            if zlib.crc32(raw[:16]) == crc:
                return seq, offset
        # Without a trustworthy ack everything still on disk is replayed: duplicates, never loss.
        self._m_corrupt.labels("bad_ack").inc()
        log.error("spool.corrupt", path=str(path), reason="bad_ack", action="replay_all")
        return None

    def _update_gauges(self) -> None:
        self._m_bytes.set(self.size_bytes)
        self._m_pending.set(self.pending)
