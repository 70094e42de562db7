"""Where a process's CPU goes, by part of the ingest path: py-spy samples split by stack.

`record(pid, seconds)` samples a running process with py-spy (raw, collapsed stacks) and returns
the share of samples per part. Parts, first match wins, looking at the whole stack:

* trio-websocket: its reader task (`_reader_task`: wsproto's frame parsing, the receive channel),
  and any stack inside wsproto: py-spy often loses the frames above wsproto's frame-parsing
  generator, and those truncated stacks (~9 % of samples at max rate) used to land in "other";
* produce: `KafkaSink` and the spooling stage (librdkafka's produce() and poll(), C time included);
* decode: `marketd/ingest/decode.py` and `wire.py`;
* tape: the continuity gates, the tape keeper and the intake (`continuity.py`, `tape.py`,
  `intake.py`, `repair.py`);
* connection task (own): anything else under our connection task (`source.py`);
* trio scheduler: samples in trio's core outside any of the above (run loop, epoll, rescheduling);
* other: the rest (metrics, logging, threads).

Shares are of samples, which py-spy takes of running threads only, so they split the process's
CPU; multiply by CPU per message for microseconds per message.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

PARTS = (
    ("trio-websocket", ("_reader_task", "wsproto/")),
    ("produce", ("KafkaSink", "SpoolingProducer", "marketd/ingest/produce.py")),
    ("decode", ("marketd/ingest/decode.py", "marketd/ingest/wire.py")),
    (
        "tape",
        (
            "marketd/ingest/continuity.py",
            "marketd/ingest/tape.py",
            "marketd/ingest/intake.py",
            "marketd/ingest/repair.py",
        ),
    ),
    ("connection task (own)", ("marketd/ingest/source.py",)),
    ("trio scheduler", ("trio/_core",)),
)


def py_spy() -> str | None:
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
    return shutil.which("py-spy") or (str(venv) if venv.exists() else None)


def start(pid: int, seconds: float, rate: int = 250) -> tuple[subprocess.Popen[bytes], Path] | None:
    """Start sampling `pid` for `seconds`; None when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="marketd-spy-")) / "stacks.txt"
    proc = subprocess.Popen(
        [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
         "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, out


def split(path: Path) -> dict[str, float]:
    """Share of samples per part (0..1), from py-spy's raw output."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        counts[_part(stack)] += int(n)
    return {name: counts[name] / total for name, _ in (*PARTS, ("other", ()))} if total else {}


def _part(stack: str) -> str:
    for name, needles in PARTS:
        if any(needle in stack for needle in needles):
            return name
    return "other"
