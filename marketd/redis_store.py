"""The redis-py side of a store of per-symbol hashes with a capped update stream.

`HashStreamStore` is what `TickerStore` (`ticker:{SYMBOL}` + `tickers:updates`) and `BookStore`
(`book:{SYMBOL}` + `books:updates`) share: one client, the conditional write (each store's Lua
script, run by EVALSHA per symbol in one pipeline, that writes the hash and appends it to the
stream), and the read side the API's readers and stream hub use. Synchronous redis-py (+hiredis):
every call blocks, run it in a worker thread (redis.asyncio does not work under trio). Connection
failures become StoreUnavailable; nothing is retried here, the caller owns the backoff.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry
from redis.typing import EncodableT

from marketd.errors import StoreUnavailable


class WriteStatus(enum.IntEnum):
    """The first element of a conditional write script's reply."""

    OLDER = 0
    STORED = 1
    DUPLICATE = 2


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
    """One entry of an update stream: a stored hash (its fields) and the entry's id."""

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


@attrs.frozen
class ScriptCall:
    """One EVALSHA of the store's script: KEYS = (key(symbol), stream), then `argv`."""

    symbol: str
    argv: Sequence[EncodableT]


def parse_update_id(text: str) -> tuple[int, int] | None:
    """A stream entry id "<ms>-<seq>" as a comparable pair; None when malformed."""
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        return None
    return int(ms), int(seq)


# Connection-level failures: Redis is down, restarting, loading its data, or unreachable.
# (AuthenticationError and BusyLoadingError are subclasses of ConnectionError in redis-py.)
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class HashStreamStore:
    """One redis-py client (its own connection pool). Not for the trio thread: every method blocks.

    `key` names a symbol's hash, `stream` is the update stream the store's `script` appends to
    (capped near `stream_maxlen`, which the subclass passes in its ARGV), `page` the entries per
    XRANGE / XREAD. `timeout_s` bounds connect and each reply, so a hung Redis turns into
    StoreUnavailable rather than a stuck worker thread. redis-py's own retries are off: writers
    retry whole batches with backoff and the API answers 503, both visibly.
    """

    def __init__(
        self,
        url: str,
        *,
        key: Callable[[str], str],
        stream: str,
        stream_maxlen: int,
        script: str,
        page: int,
        timeout_s: float,
        client_name: str,
        max_connections: int | None,
    ) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
            max_connections=max_connections,
        )
        self._key = key
        self._stream = stream
        self.stream_maxlen = stream_maxlen
        self._script = script
        self._page = page
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

    # -- writes ----------------------------------------------------------------------------

    def _write_each(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """The script's reply per call, in one pipeline; a per-command error is its reply."""
        try:
            sha = self._sha or self._load_script()
            replies = self._evalsha(sha, calls)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted or SCRIPT FLUSH: load once more and redo only those commands
                # (the others ran; redoing them would report DUPLICATE for our own write).
                sha = self._load_script()
                again = self._evalsha(sha, [calls[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return replies

    def _load_script(self) -> str:
        sha: str = self._client.script_load(self._script)
        self._sha = sha
        return sha

    def _evalsha(self, sha: str, calls: Sequence[ScriptCall]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(sha, 2, self._key(call.symbol), self._stream, *call.argv)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        for reply in replies:
            # A dropped connection mid-pipeline comes back per command; it is an outage.
            if isinstance(reply, _UNAVAILABLE):
                raise reply
        return replies

    # -- reads (the API's readers) ---------------------------------------------------------

    def read(self, symbols: Sequence[str]) -> list[dict[str, str]]:
        """HGETALL of every symbol's hash in one round trip; {} for an absent key."""
        pipe = self._client.pipeline(transaction=False)
        for symbol in symbols:
            pipe.hgetall(self._key(symbol))
        with _read_errors():
            replies: list[Any] = pipe.execute(raise_on_error=True)
        return [_decode(reply) for reply in replies]

    # -- the update stream (the push API's hub) --------------------------------------------

    def snapshot(self, symbols: Sequence[str]) -> Snapshot:
        """The last update id and every symbol's hash, atomically (MULTI/EXEC)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xrevrange(self._stream, "+", "-", count=1)
        for symbol in symbols:
            pipe.hgetall(self._key(symbol))
        with _read_errors():
            last, *replies = pipe.execute()
        last_id = as_text(last[0][0]) if last else "0-0"
        return Snapshot(last_id, [_decode(reply) for reply in replies])

    def last_update_id(self) -> str:
        with _read_errors():
            last = self._client.xrevrange(self._stream, "+", "-", count=1)
        return as_text(last[0][0]) if last else "0-0"

    def changes_since(
        self, after_id: str, symbols: frozenset[str] | None, page: int | None = None
    ) -> Changes:
        """Updates after `after_id`, newest per symbol (of `symbols`, or all when None).

        Known only if `after_id` itself is still in the stream: when it was trimmed, or the
        stream was lost (Redis restarted without persistence), the caller must resynchronise.
        `page`: entries per XRANGE (default: the store's).
        """
        page = self._page if page is None else page
        latest: dict[str, Update] = {}
        start = after_id
        inclusive = True
        last_id = after_id
        with _read_errors():
            while True:
                entries: list[Any] = (
                    self._client.xrange(
                        self._stream, start if inclusive else f"({start}", "+", count=page
                    )
                    or []
                )
                full = len(entries) == page
                if inclusive:
                    if not entries or as_text(entries[0][0]) != after_id:
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
        return Changes(True, last_id, list(latest.values()))

    def wait_updates(self, after_id: str, block_ms: int, count: int | None = None) -> list[Update]:
        """XREAD BLOCK: entries after `after_id`, waiting up to `block_ms` ([] on timeout).

        At most `count` entries (default: the store's page). The client's socket timeout must
        exceed `block_ms` (see the push API's hub).
        """
        with _read_errors():
            reply = self._client.xread(
                {self._stream: after_id},
                count=self._page if count is None else count,
                block=block_ms,
            )
        if not reply:
            return []
        # RESP2 gives [[key, entries]], RESP3 {key: [entries]}.
        streams = reply.items() if isinstance(reply, dict) else reply
        return [_update(raw_id, raw) for _key, entries in streams for raw_id, raw in entries]


@contextmanager
def _read_errors() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
    except ResponseError as exc:
        # WRONGTYPE: something else owns one of our keys. Surface it; never guess.
        raise StoreUnavailable(f"redis refused the read: {exc}") from exc


def as_text(value: Any) -> str:
    """A reply value as text (bytes decoded as UTF-8, undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode(reply: Any) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in reply.items()}


def _update(raw_id: Any, raw_fields: Any) -> Update:
    fields = _decode(raw_fields)
    symbol = fields.pop("symbol", "")
    return Update(as_text(raw_id), symbol, fields)
