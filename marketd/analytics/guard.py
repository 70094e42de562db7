"""`python -m marketd.analytics.guard CMD ...`: run one Spark job for marketd, never outlive it.

marketd starts each job through this guard, in a session of its own, with a pipe as the guard's
stdin. The guard runs CMD as its child (same process group, output inherited), forwards SIGTERM
and SIGINT to it and exits with its status. When the pipe reaches end-of-file, marketd is gone
(even by SIGKILL, which leaves no chance to clean up): the guard stops the job, SIGTERM then, after
STOP_GRACE_S, SIGKILL to the whole group (the job's JVM included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

STOP_GRACE_S = 20.0


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m marketd.analytics.guard CMD [ARG ...]", file=sys.stderr)
        return 2
    pending: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if children:
            children[0].send_signal(signum)
        else:
            pending.append(signum)  # arrived while the job was being started

    # Handlers first: a stop request that arrives during the start must reach the job too.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    children.append(child)
    for signum in pending:
        child.send_signal(signum)

    def watch_parent() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
