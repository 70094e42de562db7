"""Hot storage: the latest values per symbol in Redis, for the API.

Each job supplies `(key, order, fields)` triples; a Lua script writes a hash only when its `order`
(window start or open time, epoch ms) is not older than the stored one, so a replayed or late batch
never replaces newer values. Keys are documented in spark/README.md. Anomalies go to a capped
sorted set per symbol (score = window start; the member is the JSON row, so a replay re-adds the
same member).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import redis

from marketd_spark.sinks import Row

# KEYS[1] = hash; ARGV[1] = order; ARGV[2..] = field, value pairs.
SET_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], '_order')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_order', ARGV[1], unpack(ARGV, 2))
return 1
"""

Latest = tuple[str, int, dict[str, Any]]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RedisSink:
    def __init__(
        self,
        url: str,
        latest: Callable[[list[Row]], Iterable[Latest]] | None = None,
        events: Callable[[list[Row]], Iterable[tuple[str, int, Row]]] | None = None,
        events_cap: int = 500,
    ) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10)
        self.script = self.client.register_script(SET_IF_NEWER)
        self.latest = latest
        self.events = events
        self.events_cap = events_cap

    def write(self, batch_id: int, rows: list[Row]) -> None:
        if not rows:
            return
        pipe = self.client.pipeline(transaction=False)
        if self.latest is not None:
            newest: dict[str, Latest] = {}
            for key, order, fields in self.latest(rows):
                if key not in newest or order >= newest[key][1]:
                    newest[key] = (key, order, fields)
            for key, order, fields in newest.values():
                flat: list[str] = []
                for name, value in fields.items():
                    flat += [name, _text(value)]
                self.script(keys=[key], args=[order, *flat], client=pipe)
        if self.events is not None:
            touched = set()
            for key, score, row in self.events(rows):
                member = json.dumps(row, sort_keys=True, default=str, separators=(",", ":"))
                pipe.zadd(key, {member: score})
                touched.add(key)
            for key in touched:
                pipe.zremrangebyrank(key, 0, -self.events_cap - 1)
        pipe.execute()

    def close(self) -> None:
        self.client.close()
