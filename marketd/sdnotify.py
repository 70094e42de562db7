"""systemd readiness notification (sd_notify protocol) without libsystemd.

`notify("READY=1")` sends one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (set by
systemd for Type=notify units; `@` starts an abstract-namespace name). Without $NOTIFY_SOCKET it
does nothing, so the daemon calls it unconditionally. A failed send is logged, never raised:
readiness reporting must not take the daemon down.
"""

from __future__ import annotations

import os
import socket

from marketd.logs import get_logger

log = get_logger(__name__)

ENV = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes:
    # systemd passes abstract sockets as "@name"; the kernel wants a leading NUL byte instead.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> None:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to systemd, if it listens."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return
    if not raw.startswith(("/", "@")):
        # vsock (vsock:CID:PORT) and other transports are not used for services on a host.
        log.warning("sdnotify.unsupported_socket", socket=raw, state=state)
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sdnotify.failed", socket=raw, state=state, error=str(exc))
        return
    log.debug("sdnotify.sent", state=state)
