"""The pure ingest core imports no I/O library: checked in a fresh interpreter per module.

A module is imported alone in a subprocess (so nothing imported by pytest or another test
counts) and `sys.modules` is searched for the I/O libraries:

- every core module: no trio, trio_websocket, confluent_kafka, httpx, redis (no event loop, no
  Kafka, no HTTP, no Redis: tested with plain calls);
- the strictest ones (`STRICT`): no socket and no threading either. Most marketd modules cannot
  promise that: `marketd.metrics` imports prometheus_client, which imports socket and threading,
  and attrs imports threading; the delivery state machine uses dataclasses for that reason.

A module that stops being pure fails here with the offending import chain's roots listed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

IO_LIBRARIES = ("trio", "trio_websocket", "confluent_kafka", "httpx", "redis")
LOW_LEVEL = ("socket", "threading")

CORE = (
    "marketd.ingest.delivery",
    "marketd.ingest.continuity",
    "marketd.ingest.decode",
    "marketd.ingest.wire",
    "marketd.ingest.streams",
    "marketd.records",
    "marketd.books.model",
    "marketd.books.book",
    "marketd.books.sync",
    "marketd.books.audit",
    "marketd.books.pacing",
)
STRICT = (
    "marketd.ingest.delivery",
    "marketd.ingest.wire",
    "marketd.records",
    "marketd.books.sync",
    "marketd.books.pacing",
)
# Core by role, not yet by imports: remove from here once they import no I/O library.
NOT_YET = {
    "marketd.ingest.tape": "imports marketd.ingest.backfill (trio, httpx) for gap repair",
}


def imported_by(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


def forbidden(module: str, names: tuple[str, ...]) -> list[str]:
    loaded = imported_by(module)
    return sorted(n for n in names if n in loaded)


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_io_library(module: str) -> None:
    assert forbidden(module, IO_LIBRARIES) == []


@pytest.mark.parametrize("module", STRICT)
def test_strict_core_imports_no_socket_or_threading(module: str) -> None:
    assert forbidden(module, IO_LIBRARIES + LOW_LEVEL) == []


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=pytest.mark.xfail(reason=why, strict=True))
        for m, why in NOT_YET.items()
    ],
)
def test_core_to_be(module: str) -> None:
    """Strict xfail: when one of these becomes pure, this fails: move it to CORE."""
    assert forbidden(module, IO_LIBRARIES) == []


def test_the_check_sees_an_io_import() -> None:
    """The driver around the delivery core does import them: the check can see it."""
    assert {"confluent_kafka", "trio"} <= set(forbidden("marketd.ingest.spooling", IO_LIBRARIES))
