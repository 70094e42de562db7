"""Operator-command tests run the real CLI in-process with a controlled environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from marketd.config import env_names


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No marketd variable from the caller's environment, no .env: each test sets what it needs."""
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch
