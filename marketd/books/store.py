"""Redis adapter for the order books: `book:{SYMBOL}` hashes and the `books:updates` stream.

Receives the newest `BookView` per symbol (books/board.py) and writes the top `depth` levels of
each as one hash (README, "HTTP API"; docs/streaming.md §4) through a Lua script, so a reader never
sees half a book and an older update id never replaces a newer one unless the book resynced
(an in_sync or reason change is always written; a forced write is the writer's own resync). The
same script appends every stored book to the capped stream `books:updates`, which the push API
follows from any process. Two clients: `BookStore`, synchronous redis-py (every call blocks: run it
in a worker thread; reads, and writes to TLS or unix-socket stores), and `NativeBookWrites`, the
writer's path to a plain TCP store over a trio socket (docs/performance.md §8). Connection
failures become StoreUnavailable; the caller owns the backoff.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

import attrs
import hiredis
import msgspec
from redis.exceptions import RedisError

from marketd.books.board import BookView, Levels
from marketd.errors import StoreUnavailable
from marketd.redis_store import HashStreamStore, ScriptCall, TcpAddress, WriteStatus, as_text
from marketd.redis_wire import RespConnection, bulk, command

__all__ = [
    "CONDITIONAL_WRITE",
    "CONDITIONAL_WRITE_SHA",
    "DEFAULT_REDIS_DEPTH",
    "HASH_FIELDS",
    "UPDATES_KEY",
    "UPDATES_MAXLEN",
    "BookStore",
    "BookWrite",
    "NativeBookWrites",
    "WriteResult",
    "WriteStatus",  # shared with the ticker store (marketd/redis_store.py)
    "book_key",
    "evalsha_commands",
    "hash_fields",
]

UPDATES_KEY: Final = "books:updates"
# Like tickers:updates: approximate trimming (`~`). A book entry is ~1-3 kB at depth 20, so this
# is at most ~30 MB of Redis memory; at 200 symbols x 10 writes/s it covers ~5 s of history (a
# resuming client further behind gets a fresh snapshot), at 1 write/s per symbol ~50 s.
UPDATES_MAXLEN: Final = 10_000
DEFAULT_REDIS_DEPTH: Final = 20
# The hash fields, in HSET order. bids/asks are JSON `[[price, qty], ...]` (decimal strings,
# best first); integers are decimal text; in_sync is "true"/"false"; reason is "" while in sync.
HASH_FIELDS: Final = (
    "last_update_id", "event_time", "updated_at", "in_sync", "reason", "depth", "bids", "asks",
)  # fmt: skip

_encode = msgspec.json.Encoder().encode


def book_key(symbol: str) -> str:
    return f"book:{symbol}"


# KEYS[1] = book:{SYMBOL}, KEYS[2] = books:updates; ARGV[1] = last_update_id; ARGV[2] = state
# ("in_sync|reason"); ARGV[3] = force ("1": a resync of our own, write whatever is stored);
# ARGV[4] = TTL (s); ARGV[5] = stream MAXLEN; ARGV[6] = symbol; ARGV[7..] = field/value.
# Returns {status, last_update_id now stored (as text), update id}: 1 written, 0 older than
# stored, 2 same id and state (the id is "" unless written). Update ids are compared as text of
# equal length then lexically: Lua numbers are doubles and ids may exceed 2^53. A same-id write
# refreshes the TTL: the writer rewrites quiet books so that a book that is simply not changing
# does not expire while its keeper runs (an older one does not: it is not the current book).
CONDITIONAL_WRITE: Final = """
local cur = redis.call('HMGET', KEYS[1], 'last_update_id', 'in_sync', 'reason')
local stored = cur[1]
local incoming = ARGV[1]
if stored and ARGV[3] ~= '1' then
  if (cur[2] or '') .. '|' .. (cur[3] or '') == ARGV[2] then
    if #incoming < #stored or (#incoming == #stored and incoming < stored) then
      return {0, stored, ''}
    end
    if incoming == stored then
      redis.call('EXPIRE', KEYS[1], ARGV[4])
      return {2, stored, ''}
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[4])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'symbol', ARGV[6],
  unpack(ARGV, 7))
return {1, incoming, id}
"""


# Redis names a script by the SHA1 of its text: known here, so EVALSHA needs no SCRIPT LOAD reply.
CONDITIONAL_WRITE_SHA: Final = hashlib.sha1(
    CONDITIONAL_WRITE.encode(), usedforsecurity=False
).hexdigest()


@attrs.frozen
class BookWrite:
    """One view to write; `force`: the writer saw this book resync (its id may go back)."""

    view: BookView
    force: bool = False


@attrs.frozen
class WriteResult:
    symbol: str
    status: WriteStatus | None  # None: Redis refused this one command (see error)
    stored_update_id: int | None  # what Redis holds after the write
    error: str | None = None
    update_id: str | None = None  # the `books:updates` entry of a STORED write


def _levels(levels: Levels, depth: int) -> bytes:
    return _encode(levels[:depth])


def hash_fields(view: BookView, updated_at_ms: int, depth: int) -> list[str | int | bytes]:
    """Field/value pairs of the `book:{SYMBOL}` hash, flattened for HSET, HASH_FIELDS order."""
    return [
        "last_update_id", view.last_update_id,
        "event_time", view.event_time,
        "updated_at", updated_at_ms,
        "in_sync", "true" if view.in_sync else "false",
        "reason", "" if view.in_sync else (view.reason or "unknown"),
        "depth", depth,
        "bids", _levels(view.bids, depth),
        "asks", _levels(view.asks, depth),
    ]  # fmt: skip


def _state(view: BookView) -> str:
    return ("true|" if view.in_sync else "false|") + (
        "" if view.in_sync else view.reason or "unknown"
    )


class BookStore(HashStreamStore):
    """`book:{SYMBOL}` hashes and `books:updates`: see HashStreamStore for the client and the
    read side the API's readers and stream hub use. Writes for TLS and unix-socket stores (the
    writer's plain TCP path is NativeBookWrites)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        client_name: str = "marketd-books",
        max_connections: int | None = None,
    ) -> None:
        super().__init__(
            url,
            key=book_key,
            stream=UPDATES_KEY,
            stream_maxlen=UPDATES_MAXLEN,
            script=CONDITIONAL_WRITE,
            # Entries per XRANGE / XREAD: a book entry is ~1-3 kB at depth 20 (see UPDATES_MAXLEN).
            page=200,
            timeout_s=timeout_s,
            client_name=client_name,
            max_connections=max_connections,
        )

    def write(
        self, writes: Sequence[BookWrite], updated_at_ms: int, ttl_s: int, depth: int
    ) -> list[WriteResult]:
        """Conditionally write one view per symbol in one pipeline (EVALSHA each)."""
        calls = [
            ScriptCall(
                w.view.symbol,
                [
                    w.view.last_update_id,
                    _state(w.view),
                    "1" if w.force else "0",
                    ttl_s,
                    self.stream_maxlen,
                    w.view.symbol,
                    *hash_fields(w.view, updated_at_ms, depth),
                ],
            )
            for w in writes
        ]
        replies = self._write_each(calls)
        return [_result(w.view.symbol, reply) for w, reply in zip(writes, replies, strict=True)]


def _result(symbol: str, reply: Any) -> WriteResult:
    if isinstance(reply, RedisError):
        return WriteResult(symbol, None, None, f"{type(reply).__name__}: {reply}")
    status, stored, update_id = reply
    return WriteResult(
        symbol, WriteStatus(int(status)), int(as_text(stored)), update_id=as_text(update_id) or None
    )


# -- the writer's trio-native path --------------------------------------------------------------

_FORCE = {True: bulk(b"1"), False: bulk(b"0")}
_UPDATES_KEY = bulk(UPDATES_KEY.encode())
_MAXLEN = bulk(b"%d" % UPDATES_MAXLEN)
_F_LAST = bulk(b"last_update_id")
_F_EVENT = bulk(b"event_time")
_F_UPDATED = bulk(b"updated_at")
_F_DEPTH = bulk(b"depth")
_F_BIDS = bulk(b"bids")
_F_ASKS = bulk(b"asks")
_STATE_IN_SYNC = bulk(b"true|")
_IN_SYNC_NO_REASON = bulk(b"in_sync") + bulk(b"true") + bulk(b"reason") + bulk(b"")
_OUT_OF_SYNC = bulk(b"in_sync") + bulk(b"false") + bulk(b"reason")
_LOAD_SCRIPT = command("SCRIPT", "LOAD", CONDITIONAL_WRITE)
_PING = command("PING")
# EVALSHA sha numkeys, 2 keys, 6 ARGV before the fields, 8 field/value pairs.
_EVALSHA_HEAD = b"*27\r\n" + bulk(b"EVALSHA") + bulk(CONDITIONAL_WRITE_SHA.encode()) + bulk(b"2")


def evalsha_commands(
    writes: Sequence[BookWrite], updated_at_ms: int, ttl_s: int, depth: int
) -> bytes:
    """The RESP bytes of one EVALSHA of CONDITIONAL_WRITE per write: the same arguments as
    `BookStore.write` sends, encoded straight to bytes (the levels by msgspec, at most `depth`;
    a view carries the top `book.redis_depth` levels already, docs/books.md §8)."""
    ttl = bulk(b"%d" % ttl_s)
    updated = _F_UPDATED + bulk(b"%d" % updated_at_ms)
    depth_field = _F_DEPTH + bulk(b"%d" % depth)
    out: list[bytes] = []
    for w in writes:
        v = w.view
        symbol = v.symbol.encode()
        update_id = bulk(b"%d" % v.last_update_id)
        if v.in_sync:
            state, sync_fields = _STATE_IN_SYNC, _IN_SYNC_NO_REASON
        else:
            reason = (v.reason or "unknown").encode()
            state, sync_fields = bulk(b"false|" + reason), _OUT_OF_SYNC + bulk(reason)
        bids = v.bids if len(v.bids) <= depth else v.bids[:depth]
        asks = v.asks if len(v.asks) <= depth else v.asks[:depth]
        out += (
            _EVALSHA_HEAD, bulk(b"book:" + symbol), _UPDATES_KEY,
            update_id, state, _FORCE[w.force], ttl, _MAXLEN, bulk(symbol),
            _F_LAST, update_id, _F_EVENT, bulk(b"%d" % v.event_time), updated, sync_fields,
            depth_field, _F_BIDS, bulk(_encode(bids)), _F_ASKS, bulk(_encode(asks)),
        )  # fmt: skip
    return b"".join(out)


class NativeBookWrites:
    """The book writer's Redis path to a plain TCP store: one trio connection, no thread.

    One pipeline per `write` (EVALSHA per book; on a fresh connection `SCRIPT LOAD` goes first
    in the same round trip, since a new connection may be a restarted Redis), replies parsed by
    hiredis. A NOSCRIPT reply (SCRIPT FLUSH) loads the script and redoes those commands once.
    Same results as `BookStore.write`; failures become StoreUnavailable (reconnect on the next
    call). One task at a time.
    """

    def __init__(self, address: TcpAddress, client_name: str = "marketd-books") -> None:
        self._conn = RespConnection(address, client_name)

    async def ping(self) -> None:
        [reply] = await self._conn.roundtrip(_PING, 1)
        if isinstance(reply, hiredis.ReplyError):  # LOADING: not serving yet
            raise StoreUnavailable(f"redis: {reply}")

    async def write(
        self, writes: Sequence[BookWrite], updated_at_ms: int, ttl_s: int, depth: int
    ) -> list[WriteResult]:
        """Conditionally write one view per symbol in one round trip."""
        if not writes:
            return []
        replies = await self._run(
            writes, updated_at_ms, ttl_s, depth, load=not self._conn.connected
        )
        missing = [i for i, r in enumerate(replies) if _noscript(r)]
        if missing:
            again = await self._run(
                [writes[i] for i in missing], updated_at_ms, ttl_s, depth, load=True
            )
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return [_native_result(w.view.symbol, r) for w, r in zip(writes, replies, strict=True)]

    async def _run(
        self, writes: Sequence[BookWrite], updated_at_ms: int, ttl_s: int, depth: int, *, load: bool
    ) -> list[Any]:
        payload = evalsha_commands(writes, updated_at_ms, ttl_s, depth)
        if not load:
            return await self._conn.roundtrip(payload, len(writes))
        loaded, *replies = await self._conn.roundtrip(_LOAD_SCRIPT + payload, len(writes) + 1)
        if isinstance(loaded, hiredis.ReplyError):
            # The EVALSHAs then fail with NOSCRIPT and are refused per command with the reason.
            return [loaded] * len(writes)
        return replies

    async def close(self) -> None:
        await self._conn.close()


def _noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _native_result(symbol: str, reply: Any) -> WriteResult:
    if isinstance(reply, hiredis.ReplyError):
        return WriteResult(symbol, None, None, f"ReplyError: {reply}")
    status, stored, update_id = reply
    return WriteResult(
        symbol, WriteStatus(status), int(stored), update_id=update_id.decode() or None
    )
