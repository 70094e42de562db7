"""The books core imports no I/O library, no socket and no threading (fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("trio", "trio_websocket", "confluent_kafka", "httpx", "redis", "socket", "threading")
MODULES = (
    "marketd.books",
    "marketd.books.model",
    "marketd.books.book",
    "marketd.books.sync",
    "marketd.books.audit",
    "marketd.books.pacing",
    "marketd.books.publish",
)


@pytest.mark.parametrize("module", MODULES)
def test_books_core_is_pure(module: str) -> None:
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(out.stdout))
    assert sorted(n for n in FORBIDDEN if n in loaded) == []
