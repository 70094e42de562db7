"""sd_notify: datagrams reach a real AF_UNIX socket, path or abstract; absence is a no-op."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

import pytest

from marketd.sdnotify import notify


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_to_a_path_socket(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with _listener(str(path)) as sock:
        clean_env.setenv("NOTIFY_SOCKET", str(path))
        notify("READY=1")
        notify("STOPPING=1")
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_sends_to_an_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"marketd-test-{uuid.uuid4().hex}"
    with _listener(b"\0" + name.encode()) as sock:
        clean_env.setenv("NOTIFY_SOCKET", f"@{name}")
        notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_happens(clean_env: pytest.MonkeyPatch) -> None:
    notify("READY=1")  # no $NOTIFY_SOCKET: not under systemd


def test_a_dead_socket_is_logged_not_raised(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING):
        notify("READY=1")
    assert [r.getMessage() for r in caplog.records] == ["sdnotify.failed"]
