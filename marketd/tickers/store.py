"""Redis adapter for the ticker hashes: conditional pipelined writes, pipelined reads.

Receives the newest record per symbol of a batch and writes each `ticker:{SYMBOL}` hash
(docs/contract.md §3) through a Lua script that compares event_time atomically, so an older value
never replaces a newer one whatever the number of consumer instances (docs/contract.md §4 rule 2).
The same script appends every stored update to the capped Redis stream `tickers:updates`
(docs/streaming.md): its entry ids are what the push API sends as SSE `id:` and resumes from, and
any API process reads it, so pushing does not depend on which process consumed. The client, the
pipelined EVALSHA and the read side are `HashStreamStore`'s (marketd/redis_store.py): every call
blocks (run it in a worker thread), connection failures become StoreUnavailable, nothing is
retried here, the caller owns the backoff.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs
from redis.exceptions import RedisError

from marketd.records import TickerRecord
from marketd.redis_store import (
    Changes,
    HashStreamStore,
    ScriptCall,
    Snapshot,
    TcpAddress,
    Update,
    WriteStatus,
    as_text,
    parse_update_id,
)
from marketd.tickers.rules import hash_fields, ticker_key

# The stream's records and the write status live in marketd/redis_store.py (the book store shares
# them); importers keep finding them here.
__all__ = [
    "CONDITIONAL_WRITE",
    "UPDATES_KEY",
    "UPDATES_MAXLEN",
    "Changes",
    "Snapshot",
    "TcpAddress",
    "TickerStore",
    "Update",
    "WriteResult",
    "WriteStatus",
    "parse_update_id",
]

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


@attrs.frozen
class WriteResult:
    symbol: str
    status: WriteStatus | None  # None: Redis refused this one command (see error)
    stored_event_time: int | None  # what Redis holds after the write
    error: str | None = None
    update_id: str | None = None  # the `tickers:updates` entry of a STORED write


class TickerStore(HashStreamStore):
    """`ticker:{SYMBOL}` hashes and `tickers:updates`: see HashStreamStore for the client."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        client_name: str = "marketd",
        max_connections: int | None = None,
    ) -> None:
        super().__init__(
            url,
            key=ticker_key,
            stream=UPDATES_KEY,
            stream_maxlen=UPDATES_MAXLEN,
            script=CONDITIONAL_WRITE,
            page=1000,
            timeout_s=timeout_s,
            client_name=client_name,
            max_connections=max_connections,
        )

    def write(
        self, records: Sequence[TickerRecord], updated_at_ms: int, ttl_s: int
    ) -> list[WriteResult]:
        """Conditionally write one record per symbol in one pipeline (EVALSHA each)."""
        calls = [
            ScriptCall(
                rec.symbol,
                [
                    rec.event_time,
                    ttl_s,
                    self.stream_maxlen,
                    rec.symbol,
                    *hash_fields(rec, updated_at_ms),
                ],
            )
            for rec in records
        ]
        replies = self._write_each(calls)
        return [_result(rec.symbol, reply) for rec, reply in zip(records, replies, strict=True)]


def _result(symbol: str, reply: Any) -> WriteResult:
    if isinstance(reply, RedisError):
        return WriteResult(symbol, None, None, f"{type(reply).__name__}: {reply}")
    status, stored, update_id = reply
    return WriteResult(
        symbol, WriteStatus(int(status)), int(stored), update_id=as_text(update_id) or None
    )
