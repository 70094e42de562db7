"""Spool behaviour: order, cap, ack and deletion, recovery after a crash or damage."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketd.metrics import MetricsFactory
from marketd.spool import Spool, SpoolEntry, SpoolError, SpoolFull
from marketd.spool.segment import HEADER_BYTES

SEG = 4096


def entry(i: int, size: int = 40) -> SpoolEntry:
    return SpoolEntry(
        "raw_trades", b"BTCUSDT", f"{i:08d}".encode().ljust(size, b"."), i, [("backfill", b"1")]
    )


def values(spool: Spool, max_entries: int = 10_000) -> list[int]:
    return [e.recv_ns for _, e in spool.read(max_entries)]


def drain(spool: Spool) -> list[int]:
    out: list[int] = []
    while batch := spool.read(100):
        out += [e.recv_ns for _, e in batch]
        spool.ack(batch[-1][0])
    return out


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def make(path: Path, max_bytes: int = 1 << 20, metrics: MetricsFactory | None = None) -> Spool:
    spool = Spool(path, max_bytes, SEG, metrics=metrics)
    spool.open()
    return spool


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    spool = make(tmp_path)
    batch = [entry(1), SpoolEntry("raw_klines", None, b"{}", 7, None)]
    spool.append(batch)
    assert spool.pending == 2
    assert [e for _, e in spool.read()] == batch


def test_order_is_kept_across_segments(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for start in range(0, 500, 10):
        spool.append([entry(i) for i in range(start, start + 10)])
    assert len(segments(tmp_path)) > 3
    assert drain(spool) == list(range(500))


def test_cap_refuses_the_whole_batch(tmp_path: Path) -> None:
    metrics = MetricsFactory()
    spool = make(tmp_path, max_bytes=SEG * 2, metrics=metrics)
    n = 0
    while True:
        try:
            spool.append([entry(n), entry(n + 1)])
        except SpoolFull as exc:
            info = exc
            break
        n += 2
    assert info.size_bytes + info.batch_bytes > SEG * 2
    assert spool.size_bytes <= SEG * 2
    assert spool.pending == n
    assert metrics.registry.get_sample_value("marketd_spool_full_total") == 1
    # Delivering frees room again.
    assert drain(spool) == list(range(n))
    spool.append([entry(n)])
    assert values(spool) == [n]


def test_ack_deletes_delivered_segments_and_an_empty_spool_leaves_no_files(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(300):
        spool.append([entry(i)])
    before = len(segments(tmp_path))
    batch = spool.read(150)
    spool.ack(batch[-1][0])
    assert 0 < len(segments(tmp_path)) < before
    assert spool.pending == 150
    drain(spool)
    assert list(tmp_path.iterdir()) == []
    assert spool.pending == 0
    assert spool.size_bytes == 0


def test_reopen_without_close_replays_what_was_not_acked(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append([entry(i) for i in range(100)])
    batch = spool.read(30)
    spool.ack(batch[-1][0])
    spool.read(20)  # read but never acked: delivered maybe, so replayed
    # "kill -9": the first instance is abandoned, a new one opens the same directory.
    again = Spool(tmp_path, 1 << 20, SEG)
    report = again.open()
    assert report.pending == 70
    assert report.corruptions == ()
    assert drain(again) == list(range(30, 100))
    spool.close()


def test_appends_after_recovery_follow_recovered_entries(tmp_path: Path) -> None:
    make(tmp_path).append([entry(i) for i in range(5)])
    spool = make(tmp_path)
    spool.append([entry(i) for i in range(5, 8)])
    assert drain(spool) == list(range(8))


def test_torn_last_record_is_reported_and_not_replayed(tmp_path: Path) -> None:
    metrics = MetricsFactory()
    spool = make(tmp_path)
    spool.append([entry(i) for i in range(10)])
    spool.append([entry(10)])
    (seg,) = segments(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-5])  # the last write was torn
    again = Spool(tmp_path, 1 << 20, SEG, metrics=metrics)
    report = again.open()
    assert report.pending == 10
    (corruption,) = report.corruptions
    assert corruption.reason == "torn_tail"
    assert corruption.path == str(seg)
    assert (
        metrics.registry.get_sample_value(
            "marketd_spool_corruptions_total", {"reason": "torn_tail"}
        )
        == 1
    )
    assert drain(again) == list(range(10))


def test_flipped_byte_truncates_from_the_damaged_record(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(6):
        spool.append([entry(i)])
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    frame = (len(data) - HEADER_BYTES) // 6
    data[HEADER_BYTES + 3 * frame + 12] ^= 0xFF  # inside the fourth record's payload
    seg.write_bytes(bytes(data))
    again = Spool(tmp_path, 1 << 20, SEG)
    report = again.open()
    assert [c.reason for c in report.corruptions] == ["crc_mismatch"]
    assert report.corruptions[0].offset == HEADER_BYTES + 3 * frame
    assert drain(again) == [0, 1, 2]
    # Reopening again finds a clean (truncated) file: the damage is reported once.
    assert Spool(tmp_path, 1 << 20, SEG).open().corruptions == ()


def test_damage_in_an_early_segment_keeps_later_segments(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(200):
        spool.append([entry(i)])
    first = segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    again = Spool(tmp_path, 1 << 20, SEG)
    report = again.open()
    assert len(report.corruptions) == 1
    replayed = drain(again)
    assert replayed == sorted(replayed)
    assert replayed[0] == 0
    assert replayed[-1] == 199
    assert report.pending == len(replayed) == 199  # exactly the torn record is missing


def test_foreign_file_is_quarantined(tmp_path: Path) -> None:
    make(tmp_path).append([entry(1)])
    (tmp_path / "00000000000000000099.seg").write_bytes(b"garbage")
    report = Spool(tmp_path, 1 << 20, SEG).open()
    assert [c.reason for c in report.corruptions] == ["bad_header"]
    assert (tmp_path / "00000000000000000099.corrupt").exists()
    assert report.pending == 1


def test_rewind_reads_unacked_entries_again(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append([entry(i) for i in range(10)])
    first = spool.read(4)
    spool.ack(first[-1][0])
    assert values(spool, 3) == [4, 5, 6]
    spool.rewind()
    assert values(spool) == list(range(4, 10))


def test_ack_beyond_read_is_a_bug(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append([entry(1), entry(2)])
    ((pos, _),) = spool.read(1)
    spool.rewind()
    with pytest.raises(ValueError, match="beyond"):
        spool.ack(pos)


def test_unopened_spool_refuses_work(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path, 1 << 20, SEG).append([entry(1)])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 30)),
            st.tuples(st.just("deliver"), st.integers(1, 40)),
            st.tuples(st.just("crash"), st.just(0)),
        ),
        max_size=25,
    )
)
def test_model_whatever_happens_unacked_entries_come_back_in_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    path = tmp_path_factory.mktemp("spool")
    spool = make(path)
    model: list[int] = []
    n = 0
    for op, k in ops:
        if op == "append":
            spool.append([entry(i, size=200) for i in range(n, n + k)])
            model += range(n, n + k)
            n += k
        elif op == "deliver":
            batch = spool.read(k)
            assert [e.recv_ns for _, e in batch] == model[: len(batch)]
            if batch:
                spool.ack(batch[-1][0])
            del model[: len(batch)]
        else:
            spool = make(path)
        assert spool.pending == len(model)
    assert drain(spool) == model
    assert list(path.iterdir()) == []


def test_replay_iterates_everything_unread(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for start in range(0, 50, 5):
        spool.append([entry(i) for i in range(start, start + 5)])
    seen = [(pos, e.recv_ns) for pos, e in spool.replay(batch=7)]
    assert [v for _, v in seen] == list(range(50))
    spool.ack(seen[-1][0])
    assert spool.pending == 0


def test_a_second_process_cannot_open_the_same_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    spool = Spool(tmp_path, 1 << 20, 1 << 16)
    spool.open()
    try:
        code = (
            "import sys\n"
            "from marketd.spool import Spool, SpoolError\n"
            f"s = Spool({str(tmp_path)!r}, 1 << 20, 1 << 16)\n"
            "try:\n    s.open()\nexcept SpoolError as e:\n    print(e); sys.exit(3)\n"
        )
        other = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert other.returncode == 3, other.stderr
        assert "in use by another process" in other.stdout
    finally:
        spool.close()
    again = subprocess.run(
        [sys.executable, "-c", code.replace("sys.exit(3)", "sys.exit(4)")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr  # released on close
