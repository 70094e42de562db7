"""Errors of the Binance REST client, mapped at the edge from httpx and HTTP statuses.

Transient ones (`RestUnavailable` and subclasses, `RestBadResponse`) are worth retrying later;
`RestRejected` is Binance refusing this request (bad symbol, bad parameter): retrying won't help.
"""

from __future__ import annotations

from marketd.errors import MarketdError, TransientError


class RestError(MarketdError):
    """Base of the REST client's errors; `endpoint` is the path, e.g. /api/v3/klines."""

    def __init__(self, endpoint: str, detail: str) -> None:
        self.endpoint = endpoint
        self.detail = detail
        super().__init__(f"{endpoint}: {detail}")


class RestUnavailable(RestError, TransientError):
    """Timeout, connection failure, 5xx or SERVER_BUSY: try again later."""


class RestRateLimited(RestUnavailable):
    """429: a limit was broken. The shared budget blocks every request for `retry_after_s`."""

    def __init__(self, endpoint: str, detail: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(endpoint, detail)


class RestBanned(RestRateLimited):
    """418: the IP is banned for `retry_after_s` (only after ignoring 429s; should never happen)."""


class RestBadResponse(RestError, TransientError):
    """The answer was not what Binance documents (bad JSON, missing field, NaN price)."""


class RestRejected(RestError):
    """Binance refused the request itself (4xx other than 429/418): permanent for this request."""

    def __init__(self, endpoint: str, status: int, code: int | None, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(endpoint, f"HTTP {status} code={code} {message}")
