"""marketd's error hierarchy, named by what went wrong.

Adapters translate C-client and network exceptions into these at the edge; the supervisor decides
what is transient from the type alone.
"""

from __future__ import annotations


class MarketdError(Exception):
    """Base of every error marketd raises on purpose."""


class ConfigError(MarketdError):
    """A setting is invalid. The message is the one line the operator sees (exit code 2)."""

    def __init__(self, key: str, source: str, problem: str) -> None:
        self.key = key
        self.source = source
        self.problem = problem
        super().__init__(f"{key} ({source}): {problem}")


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
