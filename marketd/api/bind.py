"""Why the API cannot listen on api.host:api.port, as the one-line configuration error (exit 2).

Used twice: `marketd run` probes the address before anything starts (so the operator sees one
line, not a component start-up), and the API component maps the same errors when its real bind
fails (the address was taken in between). Plain sockets only: no trio, no web framework.
"""

from __future__ import annotations

import errno
import socket

from marketd.errors import ApiBindError


def _shown(host: str) -> str:
    return repr(host) if len(host) <= 80 else repr(host[:77]) + "..."


def bind_error(exc: OSError, host: str, port: int, sources: tuple[str, str]) -> ApiBindError:
    """The ApiBindError for `exc`; `sources` = where api.host and api.port came from."""
    host_source, port_source = sources
    if isinstance(exc, socket.gaierror):
        return ApiBindError(
            "api.host",
            host_source,
            f"{_shown(host)}: cannot be resolved ({exc.strerror}); a host name or IP address of "
            "this machine, e.g. 127.0.0.1 or 0.0.0.0",
        )
    if exc.errno == errno.EADDRINUSE:
        return ApiBindError(
            "api.port",
            port_source,
            f"{port}: {host}:{port} is already in use; a free port (1 to 65535), or stop the "
            "process listening there",
        )
    if exc.errno == errno.EACCES:
        return ApiBindError(
            "api.port",
            port_source,
            f"{port}: permission denied (ports below 1024 need privileges); a port from 1024 "
            "to 65535",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ApiBindError(
            "api.host",
            host_source,
            f"{_shown(host)}: not an address of this machine; e.g. 127.0.0.1 or 0.0.0.0",
        )
    return ApiBindError(
        "api.host",
        host_source,
        f"{_shown(host)}: cannot listen on {host}:{port} ({exc.strerror or exc})",
    )


def probe_bind(host: str, port: int, sources: tuple[str, str]) -> None:
    """Bind (and release) every address the API would listen on; ApiBindError if one fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                # As trio's open_tcp_listeners: a just-closed server's TIME_WAIT is no conflict.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except (OSError, UnicodeError) as exc:
        if isinstance(exc, UnicodeError):  # IDNA: a label too long or malformed
            exc = socket.gaierror(socket.EAI_NONAME, f"not a valid host name ({exc})")
        raise bind_error(exc, host, port, sources) from None
