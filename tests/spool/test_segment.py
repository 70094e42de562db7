"""Segment framing: round trip, and every kind of damage is detected, never decoded."""

from __future__ import annotations

import zlib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from marketd.spool.segment import (
    FRAME_HEADER,
    HEADER_BYTES,
    MAGIC,
    SpoolEntry,
    decode_payload,
    encode_frame,
    scan,
)

entries = st.builds(
    SpoolEntry,
    topic=st.text(min_size=1, max_size=40),
    key=st.none() | st.binary(max_size=40),
    value=st.binary(max_size=300),
    recv_ns=st.integers(min_value=0, max_value=2**63 - 1),
    headers=st.none()
    | st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=10)), min_size=1, max_size=3),
)


@given(entries)
def test_frame_round_trip(entry: SpoolEntry) -> None:
    frame = encode_frame(entry)
    length, crc = FRAME_HEADER.unpack(frame[: FRAME_HEADER.size])
    payload = frame[FRAME_HEADER.size :]
    assert length == len(payload)
    assert crc == zlib.crc32(payload, zlib.crc32(frame[:4]))
    assert decode_payload(payload) == entry


def _segment(tmp_path: Path, n: int) -> tuple[Path, list[int]]:
    path = tmp_path / "00000000000000000001.seg"
    data = bytearray(MAGIC)
    ends = []
    for i in range(n):
        data += encode_frame(SpoolEntry("t", b"k", f"v{i}".encode(), i, None))
        ends.append(len(data))
    path.write_bytes(bytes(data))
    return path, ends


def test_scan_counts_valid_frames(tmp_path: Path) -> None:
    path, ends = _segment(tmp_path, 5)
    result = scan(path)
    assert (result.entries, result.valid_end, result.damage) == (5, ends[-1], None)


def test_torn_tail_is_reported_at_the_last_good_frame(tmp_path: Path) -> None:
    path, ends = _segment(tmp_path, 5)
    path.write_bytes(path.read_bytes()[: ends[-1] - 3])
    result = scan(path)
    assert result.entries == 4
    assert result.valid_end == ends[3]
    assert result.damage is not None
    assert result.damage.reason == "torn_tail"


def test_flipped_byte_is_a_crc_mismatch(tmp_path: Path) -> None:
    path, ends = _segment(tmp_path, 5)
    data = bytearray(path.read_bytes())
    data[ends[2] - 1] ^= 0x01  # last payload byte of the third frame
    path.write_bytes(bytes(data))
    result = scan(path)
    assert result.entries == 2
    assert result.damage is not None
    assert result.damage.reason == "crc_mismatch"
    assert result.damage.offset == ends[1]


def test_zero_filled_tail_is_not_a_frame(tmp_path: Path) -> None:
    path, _ = _segment(tmp_path, 2)
    path.write_bytes(path.read_bytes() + bytes(64))
    result = scan(path)
    assert result.entries == 2
    assert result.damage is not None
    assert result.damage.reason == "bad_length"
    assert result.damage.bytes_discarded == 64


def test_foreign_file_has_a_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "00000000000000000001.seg"
    path.write_bytes(b"not a spool segment")
    result = scan(path)
    assert result.damage is not None
    assert result.damage.reason == "bad_header"
    assert scan(path, HEADER_BYTES).entries == 0
