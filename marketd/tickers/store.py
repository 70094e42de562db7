"""Redis adapter for the ticker hashes: conditional pipelined writes, pipelined reads.

Receives the newest record per symbol of a batch and writes each `ticker:{SYMBOL}` hash
(docs/contract.md §3) through a Lua script that compares event_time atomically, so an older value
never replaces a newer one whatever the number of consumer instances (docs/contract.md §4 rule 2).
The same script appends every stored update to the capped Redis stream `tickers:updates`
(docs/streaming.md): its entry ids are what the push API sends as SSE `id:` and resumes from, and
any API process reads it, so pushing does not depend on which process consumed. Synchronous redis-py
(+hiredis): every call blocks and runs in a worker thread (redis.asyncio does not work under trio).
Connection failures become StoreUnavailable; nothing is retried here, the caller owns the backoff.
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

UPDATES_KEY: Final = "tickers:updates"
# About 11 minutes of updates at 15 symbols/s: a client that reconnects within that resumes with
# exactly what changed; later it gets a fresh snapshot. Trimming is approximate (`~`, cheap).
UPDATES_MAXLEN: Final = 10_000

# KEYS[1] = ticker:{SYMBOL}, KEYS[2] = tickers:updates; ARGV[1] = event_time (ms); ARGV[2] = TTL
# (s); ARGV[3] = stream MAXLEN; ARGV[4] = symbol; ARGV[5..] = field/value.
# Returns {status, event_time now stored, update id}: 1 written, 0 older than stored, 2 same
# event_time (the id is "" unless written). DEL before HSET keeps the hash to exactly the
# docs/contract.md §3 fields even if something else wrote to the key. The XADD runs in the same
# script, so a reader that sees the entry also sees the hash, and no stored update is ever missing
# from the stream. Lua numbers are doubles: epoch milliseconds (< 2^53) compare exactly.
CONDITIONAL_WRITE: Final = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'event_time'))
local incoming = tonumber(ARGV[1])
if stored then
  if incoming < stored then return {0, stored, ''} end
  if incoming == stored then return {2, stored, ''} end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'symbol', ARGV[4],
  unpack(ARGV, 5))
return {1, incoming, id}
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
    update_id: str | None = None  # the `tickers:updates` entry of a STORED write


@attrs.frozen(kw_only=True)
class TcpAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None = attrs.field(repr=False)
    timeout_s: float


@attrs.frozen
class Update:
    """One entry of `tickers:updates`: a stored ticker (its hash fields) and its id."""

    id: str
    symbol: str
    fields: dict[str, str]


@attrs.frozen
class Snapshot:
    """Every requested hash and the last update id at the same instant (one MULTI)."""

    last_id: str  # "0-0" when the stream is empty
    rows: list[dict[str, str]]


@attrs.frozen
class Changes:
    """What changed after an id: the newest update per symbol, or unknown (trimmed / foreign)."""

    known: bool
    last_id: str
    latest: list[Update]  # ascending ids, one per symbol at most


def parse_update_id(text: str) -> tuple[int, int] | None:
    """A stream entry id "<ms>-<seq>" as a comparable pair; None when malformed."""
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        return None
    return int(ms), int(seq)


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

    def tcp_address(self) -> TcpAddress | None:
        """Where a trio-native reader can connect (plain TCP only: not TLS, not a unix socket)."""
        pool = self._client.connection_pool
        if pool.connection_class is not redis.Connection:
            return None
        kw = pool.connection_kwargs
        return TcpAddress(
            host=str(kw.get("host", "localhost")),
            port=int(kw.get("port", 6379)),
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            timeout_s=float(kw.get("socket_timeout") or 2.0),
        )

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
                2,
                ticker_key(rec.symbol),
                UPDATES_KEY,
                rec.event_time,
                ttl_s,
                UPDATES_MAXLEN,
                rec.symbol,
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
        return [_decode(reply) for reply in replies]

    # -- the update stream (the push API) -------------------------------------------------------

    def snapshot(self, symbols: Sequence[str]) -> Snapshot:
        """The last update id and every `ticker:{symbol}` hash, atomically (MULTI/EXEC)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xrevrange(UPDATES_KEY, "+", "-", count=1)
        for symbol in symbols:
            pipe.hgetall(ticker_key(symbol))
        try:
            last, *replies = pipe.execute()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except ResponseError as exc:
            raise StoreUnavailable(f"redis refused the read: {exc}") from exc
        last_id = _text(last[0][0]) if last else "0-0"
        return Snapshot(last_id, [_decode(reply) for reply in replies])

    def last_update_id(self) -> str:
        try:
            last = self._client.xrevrange(UPDATES_KEY, "+", "-", count=1)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except ResponseError as exc:
            raise StoreUnavailable(f"redis refused the read: {exc}") from exc
        return _text(last[0][0]) if last else "0-0"

    def changes_since(
        self, after_id: str, symbols: frozenset[str] | None, page: int = 1000
    ) -> Changes:
        """Updates after `after_id`, newest per symbol (of `symbols`, or all when None).

        Known only if `after_id` itself is still in the stream: when it was trimmed, or the
        stream was lost (Redis restarted without persistence), the caller must resynchronise.
        """
        latest: dict[str, Update] = {}
        start = after_id
        inclusive = True
        last_id = after_id
        try:
            while True:
                entries: list[Any] = (
                    self._client.xrange(
                        UPDATES_KEY, start if inclusive else f"({start}", "+", count=page
                    )
                    or []
                )
                full = len(entries) == page
                if inclusive:
                    if not entries or _text(entries[0][0]) != after_id:
                        return Changes(False, after_id, [])
                    entries = entries[1:]
                    inclusive = False
                for raw_id, raw_fields in entries:
                    update = _update(raw_id, raw_fields)
                    last_id = update.id
                    if symbols is None or update.symbol in symbols:
                        latest.pop(update.symbol, None)  # re-insert: dict order = id order
                        latest[update.symbol] = update
                if not full:
                    break
                start = last_id
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except ResponseError as exc:
            raise StoreUnavailable(f"redis refused the read: {exc}") from exc
        return Changes(True, last_id, list(latest.values()))

    def wait_updates(self, after_id: str, block_ms: int, count: int = 1000) -> list[Update]:
        """XREAD BLOCK: entries after `after_id`, waiting up to `block_ms` ([] on timeout).

        The client's socket timeout must exceed `block_ms` (see the push API's hub).
        """
        try:
            reply = self._client.xread({UPDATES_KEY: after_id}, count=count, block=block_ms)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        except ResponseError as exc:
            raise StoreUnavailable(f"redis refused the read: {exc}") from exc
        if not reply:
            return []
        # RESP2 gives [[key, entries]], RESP3 {key: [entries]}.
        streams = reply.items() if isinstance(reply, dict) else reply
        out: list[Update] = []
        for _key, entries in streams:
            for raw_id, raw_fields in entries:
                out.append(_update(raw_id, raw_fields))
        return out


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode(reply: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in reply.items()}


def _update(raw_id: Any, raw_fields: Any) -> Update:
    fields = _decode(raw_fields)
    symbol = fields.pop("symbol", "")
    return Update(_text(raw_id), symbol, fields)


def _result(symbol: str, reply: Any) -> WriteResult:
    if isinstance(reply, RedisError):
        return WriteResult(symbol, None, None, f"{type(reply).__name__}: {reply}")
    status, stored, update_id = reply
    return WriteResult(
        symbol, WriteStatus(int(status)), int(stored), update_id=_text(update_id) or None
    )
