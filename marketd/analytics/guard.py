"""`python -m marketd.analytics.guard [--stop-signal S] [--user U] -- CMD ...`: die with marketd.

marketd starts each Spark job (and the embedded PostgreSQL server) through this guard, in a session
of its own, with a pipe as the guard's stdin. The guard runs CMD as its child (same process group,
output inherited; as user NAME when given, which needs root), forwards SIGTERM and SIGINT to it and
exits with its status. When the pipe reaches end-of-file, marketd is gone (even by SIGKILL, which
leaves no chance to clean up): the guard sends the child the stop signal (TERM; PostgreSQL's fast
shutdown is INT) and, after STOP_GRACE_S, SIGKILL to the whole group (a job's JVM included).
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import sys
import threading
from types import FrameType

STOP_GRACE_S = 20.0


USAGE = "usage: python -m marketd.analytics.guard [--stop-signal INT] [--user NAME] -- CMD ..."


def main(argv: list[str]) -> int:
    stop_signal = signal.SIGTERM
    user: str | None = None
    while argv and argv[0].startswith("--"):
        flag, argv = argv[0], argv[1:]
        if flag == "--":
            break
        if flag in ("--stop-signal", "--user") and argv:
            value, argv = argv[0], argv[1:]
            if flag == "--user":
                user = value
            else:
                stop_signal = signal.Signals["SIG" + value.upper().removeprefix("SIG")]
            continue
        print(USAGE, file=sys.stderr)
        return 2
    if not argv:
        print(USAGE, file=sys.stderr)
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
    as_user = {"user": user, "group": grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name,
               "extra_groups": []} if user else {}  # fmt: skip
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **as_user)  # type: ignore[call-overload]
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
        child.send_signal(stop_signal)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    code: int = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
