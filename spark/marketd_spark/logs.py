"""Key=value event logging for the Spark jobs (stdlib logging: the jobs never import marketd).

`event(log, "batch.done", batch=3, rows=10)` emits `batch.done batch=3 rows=10`. `Throttle` lets a
kind of bad input be logged once per interval with a sample while every occurrence is counted.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup(level: str = "INFO") -> None:
    root = logging.getLogger("marketd_spark")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def event(log: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s", name, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))


class Throttle:
    """At most one log line per kind per `interval_s`; callers count every occurrence themselves."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def ready(self, kind: str) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[kind] = now
        return True
