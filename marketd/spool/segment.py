"""One spool segment file: a header, then append-only framed entries (pure file I/O, no trio).

Frame: `>I length` + `>I crc32(length bytes + payload)` + payload; the payload is a msgpack array
(topic, key, value, recv_ns, headers). Because the checksum covers the length too, a torn write,
a zero-filled tail (what some filesystems leave after a crash) or a flipped bit is caught when the
segment is scanned; `scan()` returns the valid prefix and a `Damage` describing what follows it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

import msgspec

MAGIC: Final = b"MKDSPL01"  # file format name + version; a different value is not ours
HEADER_BYTES: Final = len(MAGIC)
FRAME_HEADER: Final = struct.Struct(">II")
_LENGTH: Final = struct.Struct(">I")
# One Kafka message is at most a few MiB (message.max.bytes); anything larger is a corrupt length.
MAX_PAYLOAD_BYTES: Final = 64 << 20
SUFFIX: Final = ".seg"


class SpoolEntry(NamedTuple):
    """One spooled Kafka message. Same field order as marketd.ingest.decode.Outgoing."""

    topic: str
    key: bytes | None
    value: bytes
    recv_ns: int
    headers: list[tuple[str, bytes]] | None = None


class Damage(NamedTuple):
    """What `scan` found after the last valid frame of a segment."""

    offset: int  # where the valid prefix ends (the file is truncated here)
    reason: str  # "torn_tail" | "crc_mismatch" | "bad_length" | "bad_payload" | "bad_header"
    bytes_discarded: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(
    tuple[str, bytes | None, bytes, int, list[tuple[str, bytes]] | None]
)


def encode_frame(entry: SpoolEntry) -> bytes:
    payload = _encoder.encode(
        (entry.topic, entry.key, entry.value, entry.recv_ns, entry.headers or None)
    )
    length = _LENGTH.pack(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return length + _LENGTH.pack(crc) + payload


def decode_payload(payload: bytes) -> SpoolEntry:
    topic, key, value, recv_ns, headers = _decoder.decode(payload)
    return SpoolEntry(topic, key, value, recv_ns, headers)


def segment_name(seq: int) -> str:
    return f"{seq:020d}{SUFFIX}"


def segment_seq(path: Path) -> int | None:
    """The sequence number of a segment file name, or None if the name is not one of ours."""
    if path.suffix != SUFFIX or not path.stem.isdigit() or len(path.stem) != 20:
        return None
    return int(path.stem)


def read_frame(f: BinaryIO, offset: int, end: int) -> tuple[SpoolEntry, int] | Damage:
    """Read the frame at `offset` (f positioned there); returns (entry, next offset) or Damage."""
    head = f.read(FRAME_HEADER.size)
    if len(head) < FRAME_HEADER.size:
        return Damage(offset, "torn_tail", end - offset)
    length, crc = FRAME_HEADER.unpack(head)
    if length == 0 or length > MAX_PAYLOAD_BYTES:
        return Damage(offset, "bad_length", end - offset)
    payload = f.read(length)
    if len(payload) < length:
        return Damage(offset, "torn_tail", end - offset)
    if zlib.crc32(payload, zlib.crc32(head[:4])) != crc:
        return Damage(offset, "crc_mismatch", end - offset)
    try:
        entry = decode_payload(payload)
    except msgspec.DecodeError:
        # The checksum matched, so these are the bytes we wrote: a bug or a foreign writer.
        return Damage(offset, "bad_payload", end - offset)
    return entry, offset + FRAME_HEADER.size + length


class ScanResult(NamedTuple):
    entries: int
    valid_end: int  # byte offset after the last valid frame
    damage: Damage | None


def scan(path: Path, start: int = HEADER_BYTES) -> ScanResult:
    """Validate every frame from `start`; count them and find where the valid data ends."""
    end = path.stat().st_size
    with path.open("rb") as f:
        if f.read(HEADER_BYTES) != MAGIC:
            return ScanResult(0, 0, Damage(0, "bad_header", end))
        start = max(start, HEADER_BYTES)
        if start >= end:
            return ScanResult(0, max(end, HEADER_BYTES), None)  # an ack at (or past) the end
        f.seek(start)
        offset = start
        count = 0
        while offset < end:
            got = read_frame(f, offset, end)
            if isinstance(got, Damage):
                return ScanResult(count, offset, got)
            count += 1
            offset = got[1]
        return ScanResult(count, offset, None)


def iter_frames(path: Path, start: int, stop: int) -> Iterator[tuple[SpoolEntry, int] | Damage]:
    """Entries between byte offsets `start` and `stop` (frame boundaries), with end offsets."""
    with path.open("rb") as f:
        f.seek(start)
        offset = start
        while offset < stop:
            got = read_frame(f, offset, stop)
            yield got
            if isinstance(got, Damage):
                return
            offset = got[1]


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a created, renamed or deleted file name durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
