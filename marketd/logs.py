"""Structured logs: events with fields, as key=value text (default) or JSON lines.

`log = get_logger(__name__)`, then `log.info("ws.connected", conn=1, streams=6)`.
`Throttle` keeps repeated events (bad input, retried faults) to one line per kind per interval,
with a sample and the count of what was suppressed, so bad input never floods the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def _fmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {})
        parts = [f"{ts}.{int(record.msecs):03d}Z", record.levelname, record.getMessage()]
        parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for k, v in getattr(record, "fields", {}).items():
            out[k] = v if isinstance(v, int | float | bool | type(None)) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class EventLogger:
    """A thin wrapper over a stdlib logger that takes fields as keyword arguments."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: Any, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, exc_info=exc_info, extra={"fields": fields}, stacklevel=3
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, None, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, None, fields)

    def warning(self, event: str, *, exc_info: Any = None, **fields: Any) -> None:
        self._log(logging.WARNING, event, exc_info, fields)

    def error(self, event: str, *, exc_info: Any = None, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(name))


def configure_logging(level: str = "INFO", fmt: str = "text", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    for noisy in ("hypercorn", "quart", "trio-websocket", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(level if level == "DEBUG" else "WARNING")


class Throttle:
    """At most one log line per kind per `interval_s`, carrying a sample and a suppressed count.

    Uses the monotonic clock of the caller (`now` argument) so trio code can pass
    `trio.current_time()` and tests stay on virtual time.
    """

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def should_log(self, kind: str, now: float) -> int | None:
        """None: stay quiet. Otherwise: how many were suppressed since the last line."""
        due = self._next.get(kind)
        if due is not None and now < due:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        self._next[kind] = now + self.interval_s
        return self._suppressed.pop(kind, 0)
