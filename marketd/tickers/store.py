"""Redis adapter for the ticker hashes: conditional pipelined writes, pipelined reads.

Receives the newest record per symbol of a batch and writes each `ticker:{SYMBOL}` hash (SPEC §3)
through a Lua script that compares event_time atomically, so an older value never replaces a newer
one whatever the number of consumer instances (SPEC §4 rule 2). Synchronous redis-py (+hiredis):
every call blocks and runs in a worker thread (redis.asyncio does not work under trio). Connection
failures become StoreUnavailable; nothing is retried here, the caller owns the backoff.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final

import attrs
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.retry import Retry

from marketd.errors import StoreUnavailable
from marketd.records import TickerRecord
from marketd.tickers.rules import hash_fields, ticker_key

# KEYS[1] = ticker:{SYMBOL}; ARGV[1] = event_time (ms); ARGV[2] = TTL (s); ARGV[3..] = field/value.
# Returns {status, event_time now stored}: 1 written, 0 older than stored, 2 same event_time.
# DEL before HSET keeps the hash to exactly the SPEC §3 fields even if something else wrote to
# the key. Lua numbers are doubles: epoch milliseconds (< 2^53) compare exactly.
CONDITIONAL_WRITE: Final = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'event_time'))
local incoming = tonumber(ARGV[1])
if stored then
  if incoming < stored then return {0, stored} end
  if incoming == stored then return {2, stored} end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, incoming}
"""


class WriteStatus(enum.IntEnum):
    OLDER = 0
    STORED = 1
    DUPLICATE = 2


@attrs.frozen
class WriteResult:
    symbol: str
    status: WriteStatus | None  # None: Redis refused this one command (see error)
    stored_event_time: int | None  # what Redis holds after the write
    error: str | None = None


# Connection-level failures: Redis is down, restarting, loading its data, or unreachable.
# (AuthenticationError and BusyLoadingError are subclasses of ConnectionError in redis-py.)
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class TickerStore:
    """One redis-py client (its own connection pool). Not for the trio thread: every method blocks.

    `timeout_s` bounds connect and each reply, so a hung Redis turns into StoreUnavailable rather
    than a stuck worker thread. redis-py's own retries are off: the consumer retries whole
    batches with backoff and the API answers 503, both visibly.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        client_name: str = "marketd",
        max_connections: int | None = None,
    ) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
            max_connections=max_connections,
        )
        self._sha: str | None = None

    def close(self) -> None:
        self._client.close()

    def ping(self) -> None:
        try:
            self._client.ping()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    # -- writes (the ticker consumer) --------------------------------------------------------

    def write(
        self, records: Sequence[TickerRecord], updated_at_ms: int, ttl_s: int
    ) -> list[WriteResult]:
        """Conditionally write one record per symbol in one pipeline (EVALSHA each)."""
        try:
            sha = self._sha or self._load_script()
            replies = self._run(sha, records, updated_at_ms, ttl_s)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted or SCRIPT FLUSH: load once more and redo only those commands
                # (the others ran; redoing them would report DUPLICATE for our own write).
                sha = self._load_script()
                again = self._run(sha, [records[i] for i in missing], updated_at_ms, ttl_s)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [_result(rec.symbol, reply) for rec, reply in zip(records, replies, strict=True)]

    def _load_script(self) -> str:
        sha: str = self._client.script_load(CONDITIONAL_WRITE)
        self._sha = sha
        return sha

    def _run(
        self, sha: str, records: Sequence[TickerRecord], updated_at_ms: int, ttl_s: int
    ) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for rec in records:
            pipe.evalsha(
                sha,
                1,
                ticker_key(rec.symbol),
                rec.event_time,
                ttl_s,
                *hash_fields(rec, updated_at_ms),
            )
        replies: list[Any] = pipe.execute(raise_on_error=False)
        for reply in replies:
            # A dropped connection mid-pipeline comes back per command; it is an outage.
            if isinstance(reply, _UNAVAILABLE):
                raise reply
        return replies

    # -- reads (the API) ---------------------------------------------------------------------

    def read(self, symbols: Sequence[str]) -> list[dict[str, str]]:
        """HGETALL of every `ticker:{symbol}` in one round trip; {} for an absent key."""
        pipe = self._client.pipeline(transaction=False)
        for symbol in symbols:
            pipe.hgetall(ticker_key(symbol))
        try:
            replies: list[Any] = pipe.execute(raise_on_error=True)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except ResponseError as exc:
            # WRONGTYPE: something else owns a ticker key. Surface it; never guess.
            raise StoreUnavailable(f"redis refused the read: {exc}") from exc
        return [
            {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in reply.items()}
            for reply in replies
        ]


def _result(symbol: str, reply: Any) -> WriteResult:
    if isinstance(reply, RedisError):
        return WriteResult(symbol, None, None, f"{type(reply).__name__}: {reply}")
    status, stored = reply
    return WriteResult(symbol, WriteStatus(int(status)), int(stored))
