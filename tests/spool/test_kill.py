"""kill -9 a writer mid-stream: every append that returned is replayed after restart, in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from marketd.spool import Spool

WRITER = textwrap.dedent(
    """
    import sys
    from marketd.spool import Spool, SpoolEntry

    spool = Spool(sys.argv[1], 1 << 30, 1 << 16)
    spool.open()
    n = 0
    while True:
        spool.append([SpoolEntry("raw_trades", b"K", b"x" * 100, n + i, None) for i in range(10)])
        n += 10
        # Printed only after append returned: the parent trusts exactly these.
        print(n, flush=True)
    """
)


def test_every_returned_append_survives_kill_9(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.stdout is not None
    confirmed = 0
    try:
        for line in proc.stdout:
            confirmed = int(line)
            if confirmed >= 3000:  # several segment rotations
                break
        proc.send_signal(signal.SIGKILL)
        confirmed = max([confirmed, *(int(x) for x in proc.stdout.read().split())])
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    assert confirmed >= 3000

    spool = Spool(tmp_path, 1 << 30, 1 << 16)
    report = spool.open()
    # A write interrupted by the kill may leave a torn tail; it is reported, never replayed.
    assert {c.reason for c in report.corruptions} <= {"torn_tail"}
    replayed: list[int] = []
    while batch := spool.read(1000):
        replayed += [e.recv_ns for _, e in batch]
        spool.ack(batch[-1][0])
    assert replayed == list(range(len(replayed)))
    assert len(replayed) >= confirmed
    spool.close()
