"""librdkafka's mock Kafka cluster in a child process, so a test or bench can hang the broker.

`KafkaClusterProcess` starts `python -m marketd.testing.kafka_cluster`, which hosts an
`EmbeddedCluster` and prints its bootstrap address on one flushed stdout line. `pause()` SIGSTOPs
the child: the broker stops answering while its TCP connections stay open (a hung broker, not a
refused one: clients see timeouts, never resets); `resume()` SIGCONTs it and the queued requests
are answered, nothing lost. The in-process `EmbeddedCluster` cannot be frozen without freezing
its clients too. The child exits 0 on SIGTERM/SIGINT (and, for `KafkaClusterProcess`, when its
stdin closes, so a parent that dies takes its cluster with it; a cluster left paused by a parent
killed with SIGKILL stays stopped until it gets SIGCONT or SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import IO

from marketd.kafka.client import EmbeddedCluster

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ClusterProcessError(RuntimeError):
    """The cluster child did not start, or it died while we expected it to run."""


class KafkaClusterProcess:
    """A mock cluster in its own process; `pause()`/`resume()` freeze and thaw the broker."""

    def __init__(self, brokers: int = 1, start_timeout_s: float = 30.0) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "marketd.testing.kafka_cluster",
                "--brokers",
                str(brokers),
                "--exit-with-stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.paused = False
        try:
            assert self._proc.stdout is not None
            line = _readline(self._proc.stdout, start_timeout_s)
            if not line.strip():
                raise ClusterProcessError(
                    f"mock cluster child printed no address (exit code {self._proc.poll()})"
                )
            self.bootstrap_servers = line.strip()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit code once it has exited (0 after a clean stop), else None."""
        return self._proc.poll()

    def pause(self) -> None:
        """SIGSTOP the broker; returns once the child is stopped (it answers nothing from now)."""
        self._signal_and_wait(signal.SIGSTOP, os.WSTOPPED)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT the broker; returns once the child runs again."""
        self._signal_and_wait(signal.SIGCONT, os.WCONTINUED)
        self.paused = False

    def _signal_and_wait(self, sig: signal.Signals, state: int) -> None:
        if self._proc.poll() is not None:
            raise ClusterProcessError(f"mock cluster exited with {self._proc.returncode}")
        self._proc.send_signal(sig)
        # WNOWAIT leaves the child's status for Popen to collect: this only observes the change.
        info = os.waitid(os.P_PID, self._proc.pid, state | os.WEXITED | os.WNOWAIT)
        if info is not None and info.si_code in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED):
            raise ClusterProcessError(f"mock cluster died ({info.si_code=}, {info.si_status=})")

    def close(self) -> None:
        """Stop the child (thawed first: a stopped process cannot act on SIGTERM)."""
        proc = self._proc
        if proc.poll() is None:
            if self.paused:
                proc.send_signal(signal.SIGCONT)
                self.paused = False
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> KafkaClusterProcess:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _readline(stream: IO[str], timeout_s: float) -> str:
    """One line from a child's stdout, or ClusterProcessError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterProcessError(f"mock cluster did not start within {timeout_s:g} s")
            if sel.select(left):
                # The child prints its one line at once (flushed): readline does not block long.
                return stream.readline()


# -- the child ----------------------------------------------------------------------------------


def serve(brokers: int, exit_with_stdin: bool) -> int:
    """Host the cluster until SIGTERM/SIGINT (or stdin EOF); print the address first."""
    # Blocked before librdkafka starts its threads (they inherit the mask), so the signals stay
    # pending for sigwait on this thread rather than landing on a C thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    with EmbeddedCluster(brokers) as cluster:
        print(cluster.bootstrap_servers, flush=True)
        if exit_with_stdin:
            threading.Thread(target=_stop_at_stdin_eof, daemon=True).start()
        signal.sigwait(_STOP_SIGNALS)
    return 0


def _stop_at_stdin_eof() -> None:
    while sys.stdin.read(65536):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m marketd.testing.kafka_cluster",
        description="Serve librdkafka's mock Kafka cluster until SIGTERM/SIGINT; "
        "prints the bootstrap address on one line.",
    )
    parser.add_argument("--brokers", type=int, default=1, help="mock brokers (1)")
    parser.add_argument(
        "--exit-with-stdin", action="store_true", help="also stop when stdin reaches EOF"
    )
    args = parser.parse_args(argv)
    return serve(args.brokers, args.exit_with_stdin)


if __name__ == "__main__":
    sys.exit(main())
