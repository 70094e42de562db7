"""marketd's error hierarchy, named by what went wrong.

Adapters translate C-client and network exceptions into these at the edge; the supervisor decides
what is transient from the type alone.
"""

from __future__ import annotations


class MarketdError(Exception):
    """Base of every error marketd raises on purpose."""


def _one_line(text: str, limit: int) -> str:
    """Control characters escaped, cut to `limit` characters: an error line stays one line."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(MarketdError):
    """A setting is invalid. The message is the one line the operator sees (exit code 2).

    Whatever the parts contain (a 50 MB value, a newline), the line stays one bounded line.
    """

    def __init__(self, key: str, source: str, problem: str) -> None:
        self.key = _one_line(key, 120)
        self.source = _one_line(source, 300)
        self.problem = _one_line(problem, 600)
        super().__init__(f"{self.key} ({self.source}): {self.problem}")


class ApiBindError(ConfigError):
    """The API cannot listen on api.host:api.port (unresolvable host, address in use, ...).

    A configuration error found only when the API starts: restarting will not fix it, so the
    daemon exits 2 with this one line instead of restarting the component.
    """


class StreamNameError(MarketdError, ValueError):
    """A Binance stream name is malformed or not supported."""


class TransientError(MarketdError):
    """Something outside marketd failed in a way that retrying may fix (network, broker, Redis)."""


class ConnectionLost(TransientError):
    """The WebSocket connection ended; `reason` is the short code counted in metrics."""

    def __init__(self, reason: str, detail: str = "", connected_at: float | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.connected_at = connected_at  # trio clock time the connection came up, if it did
        super().__init__(f"{reason}: {detail}" if detail else reason)


class KafkaUnavailable(TransientError):
    """The Kafka cluster cannot be reached or refused an operation that may succeed later."""


class StoreUnavailable(TransientError):
    """Redis (or another store) cannot be reached."""


class FatalComponentError(MarketdError):
    """A component failed too often; the process exits non-zero so systemd/docker restart it."""


class MissingDependency(MarketdError):
    """A required external program (redis-server, java) is not installed."""
