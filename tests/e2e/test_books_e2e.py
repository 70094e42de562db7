"""Order books through the real daemon, checked the way an acceptance check would: one
`marketd run` subprocess with the default components and the shipped marketd.toml plus depth
streams (a diff stream at 100 ms for two symbols, a partial 5-level book for a third), against a
`marketd fake-exchange` subprocess that knows its own book at every update id.

While it runs the exchange withholds one diff event on the WebSocket (a gap), drops the depth
connection without a close frame, and serves one stale REST snapshot. Then every output is
compared with the exchange's book at the update id it claims, level by level:
- every in-sync `book_snapshots` record (Kafka), within its depth;
- a book rebuilt by a consumer from one snapshot plus the `raw_depth` events after it
  (docs/books.md §8, "Rebuilding a book from Kafka"), at every checked id up to the last;
- Redis `book:{SYMBOL}`, `GET /api/v1/book/{symbol}` (polled all along, and once with a plain
  HTTP/1.0 client): never a wrong book, 503 `out_of_sync` with its reason while resyncing;
- a `raw_gaps` record of kind `depth` per fault, repaired (`gap` from the first id withheld;
  `reconnect` for each book of the dropped connection), and the books in sync again. A stale
  snapshot is no gap of its own (docs/books.md §3: it is refused and fetched again): it is served
  to a rebuild after the disconnect, whose gap record must end at a newer snapshot id;
- `/readyz` has a healthy `books` entry; `raw_depth_partial` records carry depth 5 and the
  symbol of the stream name, and equal the exchange's top 5 at their id.

The services are the outside world the daemon is configured for: a mock Kafka cluster in its own
process (fresh, so the shipped topic names can be used), a private redis-server, no PostgreSQL
(the analytics endpoints are not what is checked here). Real clock, fail_after guards.
"""

from __future__ import annotations

import itertools
import json
import socket
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import attrs
import confluent_kafka
import httpx
import msgspec
import pytest
import redis
import trio

from marketd.records import (
    BookSnapshotRecord,
    DepthPartialRecord,
    DepthRecord,
    DlqRecord,
    GapRecord,
)
from marketd.testing.kafka_cluster import KafkaClusterProcess
from marketd.tickers.redis_server import RedisProcess
from tests.support.daemon import Daemon
from tests.support.exchange import Exchange, fake_exchange
from tests.support.sse import Event, SSEClient
from tests.support.tape import ExchangeAdmin, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.redis]

SHIPPED_TOML = Path(__file__).resolve().parents[2] / "marketd.toml"
BOOKS = ("BTCUSDT", "ETHUSDT")
DIFF_STREAMS = ("btcusdt@depth@100ms", "ethusdt@depth@100ms")
PARTIAL_STREAM = "bnbusdt@depth5@100ms"
PARTIAL_SYMBOL = "BNBUSDT"
# Shipped topic names (marketd.toml [topics]); the cluster is this test's own.
TOPICS = {
    "snapshots": "book_snapshots",
    "depth": "raw_depth",
    "partial": "raw_depth_partial",
    "gaps": "raw_gaps",
    "dlq": "raw_dlq",
}
# The stale snapshot is this many book steps (100 ms each) old: older than anything a resync can
# have buffered at the shipped pacing, so marketd must notice it (docs/books.md §3).
STALE_STEPS = 100
DEPTH_DROP_AFTER = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shipped_streams() -> list[str]:
    with SHIPPED_TOML.open("rb") as f:
        streams: list[str] = tomllib.load(f)["binance"]["streams"]
    return streams


Level = tuple[str, str]


def levels(raw: Any) -> list[Level]:
    return [(str(p), str(q)) for p, q in raw]


# -- Kafka: every record of the book topics, in partition order, while the daemon runs ----------


class BookTopics:
    """Reads the book topics from their beginning as they appear (auto-created by the daemon's
    first produce); keeps the decoded records per topic in arrival order (per symbol: the
    daemon's order, the key being the symbol)."""

    DECODERS: ClassVar[dict[str, msgspec.json.Decoder[Any]]] = {
        "snapshots": msgspec.json.Decoder(BookSnapshotRecord),
        "depth": msgspec.json.Decoder(DepthRecord),
        "partial": msgspec.json.Decoder(DepthPartialRecord),
        "gaps": msgspec.json.Decoder(GapRecord),
        "dlq": msgspec.json.Decoder(DlqRecord),
    }

    def __init__(self, bootstrap_servers: str) -> None:
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"books-e2e-{uuid.uuid4().hex[:8]}",  # assignment only
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "fetch.queue.backoff.ms": 10,
            }
        )
        self.names = {topic: name for name, topic in TOPICS.items()}
        self.records: dict[str, list[Any]] = {name: [] for name in TOPICS}
        self.assigned: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                if len(self.assigned) < len(TOPICS):
                    await trio.to_thread.run_sync(self._assign_new)
                for msg in await trio.to_thread.run_sync(self.consumer.consume, 1000, 0.1):
                    if msg.error() is not None:
                        continue  # partition EOF and the like
                    name = self.names[msg.topic()]
                    self.records[name].append(self.DECODERS[name].decode(msg.value()))
        finally:
            self.consumer.close()

    def _assign_new(self) -> None:
        md = self.consumer.list_topics(timeout=5)
        new: list[confluent_kafka.TopicPartition] = []
        for topic, name in self.names.items():
            tmd = md.topics.get(topic)
            if name in self.assigned or tmd is None or tmd.error is not None or not tmd.partitions:
                continue
            self.assigned.add(name)
            new += [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in tmd.partitions
            ]
        if new:
            self.consumer.incremental_assign(new)

    # -- views ------------------------------------------------------------------------------

    def snapshots(self, symbol: str) -> list[BookSnapshotRecord]:
        return [r for r in self.records["snapshots"] if r.symbol == symbol]

    def diffs(self, symbol: str) -> list[DepthRecord]:
        return [r for r in self.records["depth"] if r.symbol == symbol]

    def depth_gaps(self, symbol: str | None = None) -> list[GapRecord]:
        return [
            g
            for g in self.records["gaps"]
            if g.kind == "depth" and (symbol is None or g.symbol == symbol)
        ]

    def resynced_after_every_gap(self, symbol: str) -> bool:
        """In sync again after the last gap: a (re)synced snapshot per rebuild (the core
        publishes the gap record and the `resynced` snapshot together) and the newest snapshot
        record in sync."""
        snaps = self.snapshots(symbol)
        rebuilt = sum(s.reason == "resynced" for s in snaps)
        return bool(snaps) and snaps[-1].in_sync and rebuilt >= len(self.depth_gaps(symbol))


# -- the exchange's truth ------------------------------------------------------------------------


class Truth:
    """The fake exchange's own book at an update id (`GET /fake/book`), cached."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self._cache: dict[tuple[str, int, int | None], tuple[list[Level], list[Level]]] = {}

    async def book(
        self, symbol: str, update_id: int, limit: int | None = None
    ) -> tuple[list[Level], list[Level]]:
        key = (symbol, update_id, limit)
        if key not in self._cache:
            params: dict[str, Any] = {"symbol": symbol, "update_id": update_id}
            if limit is not None:
                params["limit"] = limit
            r = await self.http.get("/fake/book", params=params)
            assert r.status_code == 200, f"{symbol}@{update_id}: {r.text}"
            body = r.json()
            self._cache[key] = (levels(body["bids"]), levels(body["asks"]))
        return self._cache[key]


# -- the API, polled all along -------------------------------------------------------------------


@attrs.define
class ApiPoller:
    """GET /api/v1/book/{symbol} for each kept book every 0.2 s: (status, body) as answered."""

    http: httpx.AsyncClient
    api: str
    answers: list[tuple[str, int, dict[str, Any]]] = attrs.field(factory=list)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            for symbol in BOOKS:
                try:
                    r = await self.http.get(f"{self.api}/api/v1/book/{symbol}")
                except httpx.TransportError:
                    continue  # not listening yet
                self.answers.append((symbol, r.status_code, r.json()))
            await trio.sleep(0.2)


@attrs.define
class BookStream:
    """Follows `GET /api/v1/stream/book/{symbol}` from the start: every event received."""

    api: str
    symbol: str
    events: list[Event] = attrs.field(factory=list)
    ended: int = 0  # streams the server ended (at the daemon's drain, or a bug)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        host, port = self.api.removeprefix("http://").rsplit(":", 1)
        while True:
            try:
                client = await SSEClient.connect(
                    host, int(port), f"/api/v1/stream/book/{self.symbol}"
                )
            except OSError:
                await trio.sleep(0.2)  # not listening yet
                continue
            try:
                while True:
                    self.events.append(await client.next(timeout=30))
            except EOFError:
                self.ended += 1
            finally:
                await client.aclose()


@attrs.define
class World:
    fx: Exchange
    admin: ExchangeAdmin
    kafka: KafkaClusterProcess
    redis_url: str
    api: str
    topics: BookTopics
    truth: Truth
    http: httpx.AsyncClient
    nursery: trio.Nursery

    def daemon(self) -> Daemon:
        env = {
            # Where the outside world is; everything else as shipped.
            "BINANCE_WS_URL": self.fx.ws_url,
            "BINANCE_REST_URL": self.fx.http_url,
            "BINANCE_STREAMS": ",".join(
                dict.fromkeys([*shipped_streams(), *DIFF_STREAMS, PARTIAL_STREAM])
            ),
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "REDIS_URL": self.redis_url,
            "POSTGRES_DSN": "",
            "API_HOST": "127.0.0.1",
            "API_PORT": self.api.rsplit(":", 1)[1],
        }
        return Daemon(env, ["--config", str(SHIPPED_TOML)])  # default components

    async def readyz(self) -> dict[str, Any]:
        try:
            r = await self.http.get(f"{self.api}/readyz")
        except httpx.TransportError:
            return {}
        body: dict[str, Any] = r.json()
        return body


@asynccontextmanager
async def world() -> AsyncIterator[World]:
    with (
        KafkaClusterProcess() as kafka,
        RedisProcess() as server,
        fake_exchange("--seed", "31", "--rate", "100") as fx,
    ):
        async with (
            httpx.AsyncClient(timeout=5, trust_env=False) as http,
            httpx.AsyncClient(base_url=fx.http_url, timeout=10, trust_env=False) as fx_http,
            trio.open_nursery() as nursery,
        ):
            topics = BookTopics(kafka.bootstrap_servers)
            await nursery.start(topics.run)
            yield World(
                fx,
                ExchangeAdmin(fx.http_url),
                kafka,
                server.url,
                f"http://127.0.0.1:{free_port()}",
                topics,
                Truth(fx_http),
                http,
                nursery,
            )
            nursery.cancel_scope.cancel()


# -- a consumer's own book, rebuilt from one snapshot and the diffs after it ---------------------


class Side:
    """One side of a rebuilt book: levels by exact price, and the horizon beyond which nothing
    is known (a snapshot of `depth` levels was cut there; docs/books.md §4)."""

    def __init__(self, snapshot: list[Level], depth: int, *, bids: bool) -> None:
        self.bids = bids
        self.levels = {Decimal(p): (p, q) for p, q in snapshot}
        self.horizon = Decimal(snapshot[-1][0]) if len(snapshot) >= depth else None

    def known(self, price: Decimal) -> bool:
        if self.horizon is None:
            return True
        return price >= self.horizon if self.bids else price <= self.horizon

    def apply(self, changes: list[Level]) -> None:
        for p, q in changes:
            price = Decimal(p)
            if not self.known(price):
                continue  # beyond the horizon: stays unknown
            if Decimal(q) == 0:
                self.levels.pop(price, None)
            else:
                self.levels[price] = (p, q)

    def top(self) -> list[Level]:
        return [self.levels[p] for p in sorted(self.levels, reverse=self.bids)]

    def truth(self, exchange: list[Level]) -> list[Level]:
        """The exchange's side within what this side knows."""
        return [(p, q) for p, q in exchange if self.known(Decimal(p))]


async def rebuild_and_check(
    truth: Truth, snap: BookSnapshotRecord, diffs: list[DepthRecord]
) -> tuple[int, int]:
    """Rebuild the book from `snap` plus `diffs` (in the topic's order) as docs/books.md §8 says,
    comparing it with the exchange's at every 10th applied id and at the last one. Returns
    (applied events, last update id)."""
    assert snap.in_sync and snap.last_update_id is not None
    bids = Side(levels(snap.bids), snap.depth, bids=True)
    asks = Side(levels(snap.asks), snap.depth, bids=False)
    book_id = snap.last_update_id
    applied = 0
    pending = False
    for d in diffs:
        if d.last_update_id <= book_id:
            continue
        if applied == 0:
            assert d.first_update_id <= book_id + 1, (
                f"{snap.symbol}: the first diff after the snapshot at {book_id} starts at "
                f"{d.first_update_id}: the diffs straddling the snapshot are not on raw_depth"
            )
        else:
            assert d.first_update_id == book_id + 1, (
                f"{snap.symbol}: raw_depth has a gap after the last resync: {book_id} -> "
                f"{d.first_update_id}"
            )
        bids.apply(levels(d.bids))
        asks.apply(levels(d.asks))
        book_id = d.last_update_id
        applied += 1
        pending = True
        if applied % 10 == 0:
            await check_rebuilt(truth, snap.symbol, book_id, bids, asks)
            pending = False
    if pending:
        await check_rebuilt(truth, snap.symbol, book_id, bids, asks)
    return applied, book_id


async def check_rebuilt(truth: Truth, symbol: str, update_id: int, bids: Side, asks: Side) -> None:
    t_bids, t_asks = await truth.book(symbol, update_id)
    for name, side, exchange in (("bids", bids, t_bids), ("asks", asks, t_asks)):
        want = side.truth(exchange)
        assert side.top() == want, f"{symbol} rebuilt {name} at {update_id} differ"
        assert len(want) >= 5, f"{symbol}: the rebuilt {name} know only {len(want)} levels"


# -- small clients -------------------------------------------------------------------------------


async def http10_get(api: str, path: str) -> tuple[int, dict[str, Any]]:
    """A plain HTTP/1.0 request (no Host, no keep-alive): the server must answer and close."""
    host, port = api.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1."), status_line
    return int(status_line.split()[1]), json.loads(body)


def redis_books() -> Callable[[str], dict[str, dict[str, str]]]:
    def read(url: str) -> dict[str, dict[str, str]]:
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        try:
            return {s: client.hgetall(f"book:{s}") for s in (*BOOKS, PARTIAL_SYMBOL)}
        finally:
            client.close()

    return read


async def check_view(truth: Truth, where: str, view: dict[str, Any], depth: int) -> None:
    """An in-sync book as served (Redis hash decoded, or API body) equals the exchange's top
    `depth` levels at its own last_update_id."""
    symbol, update_id = view["symbol"], int(view["last_update_id"])
    t_bids, t_asks = await truth.book(symbol, update_id, depth)
    assert levels(view["bids"]) == t_bids, f"{where}: {symbol} bids at {update_id} differ"
    assert levels(view["asks"]) == t_asks, f"{where}: {symbol} asks at {update_id} differ"
    assert len(t_bids) == len(t_asks) == depth


async def check_event_time(t: BookTopics, item: BookSnapshotRecord | dict[str, Any]) -> None:
    """The event time published with a book is the `E` of the diff that brought it to its id
    (none, or 0 in Redis and the API, when it comes straight from a REST snapshot)."""
    if isinstance(item, BookSnapshotRecord):
        symbol, update_id, event_time = item.symbol, item.last_update_id, item.event_time
    else:
        symbol, update_id = item["symbol"], int(item["last_update_id"])
        event_time = item["event_time"] or None
    if event_time is None:
        return
    # raw_depth may lag the book's other outputs by a moment.
    await wait_until(
        lambda: any(d.last_update_id >= (update_id or 0) for d in t.diffs(symbol)),
        f"raw_depth reaching {symbol}@{update_id}",
        10,
    )
    times = {d.event_time for d in t.diffs(symbol) if d.last_update_id == update_id}
    assert times == {event_time}, f"{symbol}@{update_id}: event_time {event_time}, diffs {times}"


# -- the test ------------------------------------------------------------------------------------


async def test_books_through_the_daemon_equal_the_exchange_through_drop_disconnect_stale() -> None:
    with trio.fail_after(150):  # ~40 s when all goes well
        async with world() as w:
            t = w.topics
            daemon = w.daemon()
            await daemon.start(w.nursery)
            poller = ApiPoller(w.http, w.api)
            await w.nursery.start(poller.run)
            sse = BookStream(w.api, BOOKS[0])
            await w.nursery.start(sse.run)

            def tail() -> str:
                gaps = [(g.symbol, g.reason, g.from_id, g.to_id) for g in t.depth_gaps()]
                return f"gaps {gaps}\n{daemon.tail()}"

            # 1. Both books synced from their first REST snapshot.
            await wait_until(
                lambda: all(any(s.in_sync for s in t.snapshots(b)) for b in BOOKS),
                "both books in sync (book_snapshots)",
                45,
                tail,
            )

            # 2. One diff event withheld on the WebSocket: a gap, a rebuild.
            await w.admin.faults(depth_drop_after=DEPTH_DROP_AFTER)
            await wait_until(
                lambda: any(g.reason == "gap" for g in t.depth_gaps()), "a gap record", 20, tail
            )
            await wait_until(
                lambda: all(t.resynced_after_every_gap(b) for b in BOOKS),
                "the books in sync again after the dropped diff",
                30,
                tail,
            )

            # 3. The depth connection dropped (no close frame), and the next REST snapshot stale.
            await w.admin.faults(stale_depth_snapshot=STALE_STEPS)
            r = await w.truth.http.post("/fake/disconnect", json={"stream": DIFF_STREAMS[0]})
            assert r.json() == {"connections": 1}, r.text
            await wait_until(
                lambda: all(any(g.reason == "reconnect" for g in t.depth_gaps(b)) for b in BOOKS),
                "a reconnect gap record per book",
                30,
                tail,
            )
            await wait_until(
                lambda: all(t.resynced_after_every_gap(b) for b in BOOKS),
                "the books in sync again after the disconnect",
                40,
                tail,
            )

            # 4. The books live on: diffs to rebuild from, periodic snapshots.
            def settled(symbol: str) -> bool:
                snaps = [s for s in t.snapshots(symbol) if s.reason == "resynced"]
                last = snaps[-1].last_update_id if snaps else None
                after = [d for d in t.diffs(symbol) if last is not None and d.last_update_id > last]
                periodic = [s for s in t.snapshots(symbol)[-3:] if s.reason == "periodic"]
                return len(after) >= 30 and len(periodic) >= 2

            def enough_snapshots() -> bool:
                return sum(s.in_sync for s in t.records["snapshots"]) >= 20

            await wait_until(
                lambda: all(settled(b) for b in BOOKS) and enough_snapshots(),
                "30 diffs after the last resync, 20 in-sync snapshots",
                30,
                tail,
            )
            stats = await w.admin.stats()
            readyz = await w.readyz()
            stored = await trio.to_thread.run_sync(redis_books(), w.redis_url)
            api_body = {}
            for symbol in BOOKS:
                r = await w.http.get(f"{w.api}/api/v1/book/{symbol}", params={"depth": 5})
                assert r.status_code == 200, r.text
                api_body[symbol] = r.json()
            status10, body10 = await http10_get(w.api, f"/api/v1/book/{BOOKS[1]}")
            untracked = await w.http.get(f"{w.api}/api/v1/book/{PARTIAL_SYMBOL}")
            metrics = (await w.http.get(f"{w.api}/metrics")).text

            # -- the checks, against the exchange's truth (still running) ----------------------

            # (c) one gap record per fault, with its reason, repaired; the drop's gap starts at
            # the first id withheld.
            withheld = {s: b["withheld"] for s, b in stats["books"].items() if b["withheld"]}
            assert len(withheld) == 1 and len(next(iter(withheld.values()))) == 1, withheld
            ((dropped_symbol, [(first_withheld, last_withheld)]),) = withheld.items()
            gaps = t.depth_gaps()
            assert all(g.repaired and g.from_id <= g.to_id for g in gaps), gaps
            drop_gaps = [g for g in gaps if g.reason == "gap"]
            assert [(g.symbol, g.from_id) for g in drop_gaps] == [
                (dropped_symbol, first_withheld)
            ], gaps
            for symbol in BOOKS:
                (reconnect,) = [g for g in t.depth_gaps(symbol) if g.reason == "reconnect"]
                assert reconnect.stream == DIFF_STREAMS[BOOKS.index(symbol)], reconnect
            assert {g.reason for g in gaps} <= {"gap", "reconnect", "stale_snapshot"}, gaps
            faults = stats["faults_injected"]
            assert faults.get("depth_drop") == 1 and faults.get("disconnect") == 1, faults
            # The stale snapshot went to one of the rebuilds after the disconnect: marketd did
            # not take the book from it (it asked again; the rebuild's gap ends at a newer id).
            assert faults.get("stale_depth_snapshot") == 1, faults
            stale = {
                s: b["stale_snapshots"] for s, b in stats["books"].items() if b["stale_snapshots"]
            }
            ((stale_symbol, [stale_id]),) = stale.items()
            (rebuilt,) = [g for g in t.depth_gaps(stale_symbol) if g.reason == "reconnect"]
            assert rebuilt.to_id > stale_id, (rebuilt, stale_id)
            for symbol in BOOKS:
                assert f'marketd_book_in_sync{{symbol="{symbol}"}} 1.0' in metrics
                assert t.snapshots(symbol)[-1].in_sync

            # (a) every in-sync book_snapshots record equals the exchange at its id.
            checked = 0
            for snap in t.records["snapshots"]:
                if not snap.in_sync:
                    assert snap.bids == snap.asks == (), snap
                    continue
                assert snap.last_update_id is not None and snap.depth == 20, snap
                t_bids, t_asks = await w.truth.book(snap.symbol, snap.last_update_id, snap.depth)
                assert levels(snap.bids) == t_bids, f"snapshot {snap} bids differ"
                assert levels(snap.asks) == t_asks, f"snapshot {snap} asks differ"
                await check_event_time(t, snap)
                checked += 1
            reasons = {s.reason for s in t.records["snapshots"]}
            assert reasons == {"synced", "resynced", "periodic"}, reasons
            assert checked >= 20

            # (b) one snapshot + the raw_depth events after it = the exchange's book.
            for symbol in BOOKS:
                diffs = t.diffs(symbol)
                assert all(d.stream == DIFF_STREAMS[BOOKS.index(symbol)] for d in diffs)
                start = [s for s in t.snapshots(symbol) if s.reason == "resynced"][-1]
                applied, last_id = await rebuild_and_check(w.truth, start, diffs)
                assert applied >= 30 and last_id == diffs[-1].last_update_id, (applied, last_id)

            # raw_depth has every diff as sent, once: per symbol its ids continue each other
            # except where the exchange withheld an event and across the disconnect.
            for symbol in BOOKS:
                diffs = t.diffs(symbol)
                jumps = [
                    (a.last_update_id, b.first_update_id)
                    for a, b in itertools.pairwise(diffs)
                    if b.first_update_id != a.last_update_id + 1
                ]
                assert all(b > a + 1 for a, b in jumps), f"{symbol}: ids go back {jumps}"
                # The reconnect's jump: the events while no connection was open (none when the
                # new connection came within the same 100 ms step).
                if symbol == dropped_symbol:
                    assert (first_withheld - 1, last_withheld + 1) in jumps, jumps
                    assert len(jumps) <= 2, f"{symbol}: raw_depth jumps {jumps}"
                else:
                    assert len(jumps) <= 1, f"{symbol}: raw_depth jumps {jumps}"

            # (d) Redis and the API serve the exchange's book at their update id.
            for symbol in BOOKS:
                h = stored[symbol]
                assert h["in_sync"] == "true" and h["reason"] == "" and h["depth"] == "20", h
                view = {
                    "symbol": symbol,
                    "last_update_id": h["last_update_id"],
                    "bids": json.loads(h["bids"]),
                    "asks": json.loads(h["asks"]),
                }
                await check_view(w.truth, "redis", view, 20)
                await check_event_time(t, {**view, "event_time": int(h["event_time"])})
                body = api_body[symbol]
                assert body["in_sync"] is True and body["age_ms"] >= 0, body
                await check_view(w.truth, "GET depth=5", body, 5)
                await check_event_time(t, body)
            assert stored[PARTIAL_SYMBOL] == {}  # no book kept: a partial stream only
            assert status10 == 200, body10
            await check_view(w.truth, "HTTP/1.0 GET", body10, 20)
            assert untracked.status_code == 404
            assert untracked.json()["error"] == "unknown_symbol"
            served = out_of_sync = 0
            slow: list[dict[str, Any]] = []
            seen_ok: set[str] = set()
            for symbol, status, body in poller.answers:
                if status == 200:
                    seen_ok.add(symbol)
                    await check_view(w.truth, "GET (polled)", body, 20)
                    await check_event_time(t, body)
                    served += 1
                elif status == 503 and body["error"] == "out_of_sync":
                    assert body["reason"], body
                    out_of_sync += 1
                elif status == 503 and body["error"] == "redis_unavailable":
                    # The API's own 2 s bound on a read, tripped when the daemon's loop was
                    # starved (seen once in ~10 runs on the shared 2-core box): a truthful
                    # answer, never a wrong book. Tolerated when rare, and shown.
                    slow.append(body)
                else:  # before the first write only
                    assert status == 404 and symbol not in seen_ok, (symbol, status, body)
            assert served >= 20 and out_of_sync >= 1, poller.answers[-5:]
            assert len(slow) <= 2, slow

            # The book stream: a snapshot, then book events, each the exchange's at its id.
            assert sse.ended == 0, "the book stream ended while the daemon ran"
            assert sse.events and sse.events[0].event == "snapshot", sse.events[:1]
            streamed = [e.data for e in sse.events if e.event == "book"]
            in_sync_streamed = [b for b in streamed if b["in_sync"]]
            for b in in_sync_streamed[:: max(1, len(in_sync_streamed) // 30)]:
                await check_view(w.truth, "SSE book", b, 20)
            assert all(b["reason"] for b in streamed if not b["in_sync"]), streamed
            assert len(in_sync_streamed) >= 20 and any(not b["in_sync"] for b in streamed)

            # (e) /readyz: the books entry is healthy.
            books_entry = readyz["components"]["books"]
            assert books_entry["healthy"] and books_entry["started"], readyz
            assert "redis" in books_entry["reason"], books_entry

            # (f) partial books: depth 5, the symbol from the stream name, the exchange's top 5.
            partials = t.records["partial"]
            assert len(partials) >= 20
            for p in partials:
                assert (p.symbol, p.depth, p.stream) == (PARTIAL_SYMBOL, 5, PARTIAL_STREAM), p
                assert len(p.bids) == len(p.asks) == 5 and p.event_time is None, p
            for p in partials[:: max(1, len(partials) // 20)]:
                t_bids, t_asks = await w.truth.book(PARTIAL_SYMBOL, p.last_update_id, 5)
                assert (levels(p.bids), levels(p.asks)) == (t_bids, t_asks), p

            # Nothing of the depth streams was refused.
            refused = [r for r in t.records["dlq"] if r.stream and "@depth" in r.stream]
            assert not refused, refused[:3]

            assert await daemon.stop() == 0, daemon.tail()
    print(  # shown with -s: what the run went through
        f"snapshots checked {checked}, API answers {served} in sync / {out_of_sync} out_of_sync, "
        f"gaps {[(g.symbol, g.reason) for g in gaps]}, stale snapshot to {stale_symbol}, "
        f"API 503 redis_unavailable {len(slow)}"
    )
