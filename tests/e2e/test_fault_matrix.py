"""The fault matrix: each outside service down at start, dying mid-run and coming back, against
one `marketd run` with its default components (ingest, tickers, api) in one subprocess.

For every dependency -- Redis, Kafka, Binance WebSocket, Binance REST, PostgreSQL -- one test
walks the three phases on one daemon: down at start -> comes back -> dies mid-run -> comes back.
In each outage the other components keep working (trades keep arriving in Kafka, the API keeps
answering), the affected entry of /readyz turns unhealthy with a reason naming the dependency
within 10 s, and everything is healthy again within 15 s of the service returning, with no
restart. Nothing accepted is lost: each test ends with the trade tape equal to the fake
exchange's ledger (no gap, no duplicate: ingest spooled what Kafka could not take), and while
Redis is down the ticker group's committed offsets do not move.

The faults are real: redis-server is killed with SIGKILL and restarted on the same port; the
Kafka broker (a mock cluster in its own process) is frozen with SIGSTOP; PostgreSQL is stopped
(immediate mode) and started again; Binance is reached through two TCP proxies (WebSocket and
REST) that this test closes -- listener and open connections -- and opens again on the same port.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import confluent_kafka
import httpx
import pytest
import redis
import trio

from marketd.testing.kafka_cluster import KafkaClusterProcess
from tests.support.daemon import Daemon
from tests.support.exchange import Exchange, fake_exchange
from tests.support.postgres import PostgresProcess
from tests.support.tape import ExchangeAdmin, TapeFollower, tape_defects, verify_tape, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.redis]

SYMBOLS = ("btcusdt", "ethusdt")
TICKERS = tuple(s.upper() for s in SYMBOLS)
UNHEALTHY_WITHIN_S = 10.0
RECOVERED_WITHIN_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the outside world, with switches -------------------------------------------------------


class RedisServer:
    """redis-server on a fixed port, no persistence: `kill()` is SIGKILL, `start()` on the same
    port (an empty Redis, as after a crash without persistence)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="marketd-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.dir]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    trio_free_sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def trio_free_sleep(seconds: float) -> None:
    """A blocking wait for the synchronous start-up helpers above (run in worker threads)."""
    import time

    time.sleep(seconds)


class Postgres(PostgresProcess):
    """The test PostgreSQL server with stop/start on the same port and data directory."""

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop")
        self.started = False

    def restart(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.datadir), "-o", options, "-w", "-t", "60",
            "-l", str(self.datadir.parent / "server.log"), "start",
        )  # fmt: skip
        self.started = True


class Proxy:
    """A TCP forwarder to the fake exchange: `down()` closes the listener and every connection
    (clients see refused connects), `up()` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._scope: trio.CancelScope | None = None

    async def up(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def down(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            await trio.serve_listeners(self._forward, listeners, task_status=task_status)

    async def _forward(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    async for chunk in src:
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)


@attrs.define
class World:
    fx: Exchange
    admin: ExchangeAdmin
    kafka: KafkaClusterProcess
    redis: RedisServer
    ws: Proxy
    rest: Proxy
    pg: Postgres | None
    topic: str
    group: str
    api: str
    follower: TapeFollower
    nursery: trio.Nursery
    http: httpx.AsyncClient

    def daemon(self) -> Daemon:
        env = {
            "BINANCE_WS_URL": f"ws://127.0.0.1:{self.ws.port}/stream",
            "BINANCE_REST_URL": f"http://127.0.0.1:{self.rest.port}",
            "BINANCE_STREAMS": ",".join(
                [f"{s}@trade" for s in SYMBOLS] + [f"{s}@ticker" for s in SYMBOLS]
            ),
            "TICKER_SYMBOLS": ",".join(TICKERS),
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "REDIS_URL": self.redis.url,
            "API_HOST": "127.0.0.1",
            "API_PORT": self.api.rsplit(":", 1)[1],
            "TOPIC_RAW_TRADES": self.topic,
            "TICKER_CONSUMER_GROUP": self.group,
            "RECONNECT_MAX_DELAY_SECONDS": "1",
        }
        if self.pg is not None:
            env["POSTGRES_DSN"] = self.pg.dsn()
        return Daemon(env)  # no MARKETD_COMPONENTS: the default, every component

    def follow(self) -> None:
        """Start reading the trades topic (its metadata request fails while Kafka is frozen)."""
        self.nursery.start_soon(self.follower.run)

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        try:
            response = await self.http.get(f"{self.api}/readyz")
        except httpx.TransportError:
            return 0, {}
        return response.status_code, response.json()

    async def get(self, path: str) -> tuple[int, Any]:
        response = await self.http.get(f"{self.api}{path}")
        return response.status_code, response.json()

    async def dependency_up(self, name: str) -> float | None:
        response = await self.http.get(f"{self.api}/metrics")
        for line in response.text.splitlines():
            if line.startswith(f'marketd_dependency_up{{dependency="{name}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return None


@contextmanager
def services(
    with_postgres: bool,
) -> Iterator[tuple[KafkaClusterProcess, RedisServer, Postgres | None]]:
    kafka = KafkaClusterProcess()
    server = RedisServer()
    pg = Postgres() if with_postgres else None
    try:
        server.start()
        if pg is not None:
            pg.start()
        yield kafka, server, pg
    finally:
        kafka.close()
        server.close()
        if pg is not None:
            pg.close()


@asynccontextmanager
async def world(with_postgres: bool = False, follow: bool = True) -> AsyncIterator[World]:
    """Every service up; `follow`: read the trades topic from now (else call w.follow())."""
    with (
        services(with_postgres) as (kafka, server, pg),
        fake_exchange("--symbols", ",".join(SYMBOLS), "--seed", "29", "--rate", "100") as fx,
    ):
        fx_port = int(fx.http_url.rsplit(":", 1)[1])
        topic = f"trades-{uuid.uuid4().hex[:8]}"
        follower = TapeFollower(kafka.bootstrap_servers, topic)
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http, trio.open_nursery() as n:
            ws, rest = Proxy(fx_port), Proxy(fx_port)
            await ws.up(n)
            await rest.up(n)
            if follow:
                n.start_soon(follower.run)
            yield World(
                fx,
                ExchangeAdmin(fx.http_url),
                kafka,
                server,
                ws,
                rest,
                pg,
                topic,
                f"tickers-{uuid.uuid4().hex[:8]}",
                f"http://127.0.0.1:{free_port()}",
                follower,
                n,
                http,
            )
            n.cancel_scope.cancel()


# -- what the tests wait for -----------------------------------------------------------------


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float, tail: Callable[[], str]
) -> float:
    """Poll `check` until true; returns how long it took, fails naming `what` otherwise."""
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        while not await check():
            await trio.sleep(0.1)
        return trio.current_time() - started
    raise AssertionError(f"not within {timeout_s:g} s: {what}\n{tail()}")


async def unhealthy(w: World, d: Daemon, entry: str, words: tuple[str, ...], dep: str) -> str:
    """The entry turns unhealthy with a reason naming the dependency, within 10 s; the
    dependency gauge says 0. Returns the reason."""
    found: dict[str, str] = {}

    async def check() -> bool:
        status, body = await w.readyz()
        e = body.get("components", {}).get(entry)
        if status != 503 or e is None or e["healthy"]:
            return False
        if not all(word in e["reason"] for word in words):
            return False
        found["reason"] = e["reason"]
        return True

    await until(check, f"/readyz {entry} unhealthy naming {words}", UNHEALTHY_WITHIN_S, d.tail)
    assert await w.dependency_up(dep) == 0.0
    assert found["reason"].rstrip().endswith("Z"), found  # "..., since 12:48:06Z"
    assert d.proc is not None and d.proc.returncode is None, "the daemon must not exit"
    return found["reason"]


async def all_healthy(w: World, d: Daemon, dep: str | None) -> None:
    """Everything healthy again (readyz 200) within 15 s, without a restart."""

    async def check() -> bool:
        status, _ = await w.readyz()
        return status == 200

    await until(check, "/readyz 200 (every component healthy)", RECOVERED_WITHIN_S, d.tail)
    if dep is not None:
        assert await w.dependency_up(dep) == 1.0


async def others_healthy(w: World, d: Daemon, *names: str) -> None:
    """The components that do not need the missing service are (or become) healthy."""

    async def check() -> bool:
        _, body = await w.readyz()
        entries = body.get("components", {})
        return all(entries.get(n, {}).get("healthy") for n in names)

    await until(check, f"{names} healthy", RECOVERED_WITHIN_S, d.tail)


async def trades_keep_arriving(w: World, d: Daemon, n: int = 20) -> None:
    target = w.follower.count + n
    await wait_until(lambda: w.follower.count >= target, f"{n} more trades in Kafka", 15, d.tail)


async def api_answers(w: World, *, redis_up: bool) -> None:
    status, body = await w.get("/healthz")
    assert status == 200 and body == {"status": "alive"}
    status, body = await w.get("/api/v1/tickers")
    if redis_up:
        assert status == 200, body
    else:
        assert status == 503 and body["error"] == "redis_unavailable", body


async def tickers_served(w: World, d: Daemon) -> None:
    """Both tracked tickers readable from Redis through the API (with their age)."""

    async def check() -> bool:
        status, body = await w.get("/api/v1/tickers")
        rows = body.get("tickers", []) if status == 200 else []
        have = {r["symbol"] for r in rows if r.get("event_time") is not None}
        return have >= set(TICKERS) and all("age_ms" in r for r in rows)

    await until(check, "both tickers served from Redis", RECOVERED_WITHIN_S, d.tail)


def committed(w: World) -> list[int]:
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": w.kafka.bootstrap_servers, "group.id": w.group}
    )
    try:
        md = consumer.list_topics("raw_tickers", timeout=10).topics["raw_tickers"]
        parts = [confluent_kafka.TopicPartition("raw_tickers", p) for p in sorted(md.partitions)]
        return [tp.offset for tp in consumer.committed(parts, timeout=10)]
    finally:
        consumer.close()


async def start(w: World) -> Daemon:
    daemon = w.daemon()
    await daemon.start(w.nursery)

    async def api_up() -> bool:
        status, _ = await w.readyz()
        return status in (200, 503)

    # Generous: the start-up of a Python process on a busy CI box is not what is measured here.
    await until(api_up, "the API answering /readyz", 60, daemon.tail)
    return daemon


async def finish(w: World, daemon: Daemon) -> None:
    """Nothing accepted is lost: the trade tape equals what the exchange sent, then a clean
    drain (exit 0)."""
    ledger = await w.admin.freeze()
    assert ledger, "the exchange sent no trades"
    await wait_until(
        lambda: w.follower.reached(ledger),
        "the tape to reach the ledger's last ids",
        60,
        lambda: f"ledger {ledger}, tape {w.follower.last}\n{daemon.tail()}",
    )
    assert await daemon.stop() == 0, daemon.tail()
    code, report = await trio.to_thread.run_sync(verify_tape, w.kafka.bootstrap_servers, w.topic)
    problems = tape_defects(report, ledger)
    assert not problems, "\n".join([*problems, daemon.tail()])
    assert code == 0, report


# -- the matrix --------------------------------------------------------------------------------


async def test_redis(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with world() as w:
            w.redis.kill()  # down at start
            daemon = await start(w)
            words = ("redis unreachable at", f"127.0.0.1:{w.redis.port}")
            reason = await unhealthy(w, daemon, "tickers", words, "redis")
            assert "Connection refused" in reason
            await trades_keep_arriving(w, daemon)  # ingest does not wait for Redis
            await api_answers(w, redis_up=False)

            await trio.to_thread.run_sync(w.redis.start)  # comes back
            await all_healthy(w, daemon, "redis")
            await tickers_served(w, daemon)
            await api_answers(w, redis_up=True)

            await trades_keep_arriving(w, daemon)
            w.redis.kill()  # dies mid-run (SIGKILL)
            await unhealthy(w, daemon, "tickers", words, "redis")
            before = await trio.to_thread.run_sync(committed, w)
            await trades_keep_arriving(w, daemon)
            await api_answers(w, redis_up=False)
            # Offsets never move past what Redis stored: tickers keep coming, none is stored.
            assert await trio.to_thread.run_sync(committed, w) == before

            await trio.to_thread.run_sync(w.redis.start)  # comes back, empty
            await all_healthy(w, daemon, "redis")
            await tickers_served(w, daemon)
            after = await trio.to_thread.run_sync(committed, w)
            assert all(a >= b for a, b in zip(after, before, strict=True)) and after != before
            await finish(w, daemon)


async def test_kafka(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with world(follow=False) as w:
            await trio.to_thread.run_sync(w.kafka.pause)  # down at start: frozen broker
            daemon = await start(w)
            words = ("kafka unreachable at", w.kafka.bootstrap_servers)
            await unhealthy(w, daemon, "tickers", words, "kafka")
            await unhealthy(w, daemon, "ingest", (*words, "disk spool"), "kafka")
            await api_answers(w, redis_up=True)

            await trio.to_thread.run_sync(w.kafka.resume)
            w.follow()
            await all_healthy(w, daemon, "kafka")
            await trades_keep_arriving(w, daemon)
            await tickers_served(w, daemon)

            await trio.to_thread.run_sync(w.kafka.pause)  # dies mid-run
            await unhealthy(w, daemon, "ingest", (*words, "disk spool"), "kafka")
            await unhealthy(w, daemon, "tickers", words, "kafka")
            # The API keeps serving what Redis holds, with its age.
            await tickers_served(w, daemon)
            await api_answers(w, redis_up=True)

            await trio.to_thread.run_sync(w.kafka.resume)
            await all_healthy(w, daemon, "kafka")
            await trades_keep_arriving(w, daemon)
            await finish(w, daemon)  # what was spooled meanwhile is on the tape, in order


async def test_binance_websocket(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with world() as w:
            w.ws.down()  # down at start
            daemon = await start(w)
            words = ("binance websocket at", f"127.0.0.1:{w.ws.port}", "connect_failed")
            reason = await unhealthy(w, daemon, "ingest", words, "binance_ws")
            assert "refused" in reason.lower(), reason
            await others_healthy(w, daemon, "tickers", "api")
            await api_answers(w, redis_up=True)

            await w.ws.up(w.nursery)
            await all_healthy(w, daemon, "binance_ws")
            await trades_keep_arriving(w, daemon)
            await tickers_served(w, daemon)

            w.ws.down()  # dies mid-run: every connection cut, reconnects refused
            await unhealthy(w, daemon, "ingest", words, "binance_ws")
            _status, body = await w.readyz()
            assert body["components"]["tickers"]["healthy"], body
            await api_answers(w, redis_up=True)
            await tickers_served(w, daemon)

            await w.ws.up(w.nursery)
            await all_healthy(w, daemon, "binance_ws")
            await trades_keep_arriving(w, daemon)
            await finish(w, daemon)  # the hole of the outage was backfilled over REST
    disconnects = daemon.find("ws.disconnected")
    assert disconnects and all(e["detail"] for e in disconnects), disconnects[:3]


async def test_binance_rest(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with world() as w:
            w.rest.down()  # down at start
            daemon = await start(w)
            words = ("binance rest unreachable at", f"127.0.0.1:{w.rest.port}")
            await unhealthy(w, daemon, "backfill", words, "binance_rest")
            await others_healthy(w, daemon, "ingest", "tickers", "api")
            await trades_keep_arriving(w, daemon)
            await api_answers(w, redis_up=True)

            await w.rest.up(w.nursery)
            await all_healthy(w, daemon, "binance_rest")

            w.rest.down()  # dies mid-run
            await unhealthy(w, daemon, "backfill", words, "binance_rest")
            await trades_keep_arriving(w, daemon)
            await tickers_served(w, daemon)

            await w.rest.up(w.nursery)
            await all_healthy(w, daemon, "binance_rest")
            await finish(w, daemon)


@pytest.mark.postgres
async def test_postgresql(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with world(with_postgres=True) as w:
            assert w.pg is not None
            await trio.to_thread.run_sync(w.pg.stop)  # down at start
            daemon = await start(w)
            words = ("postgres unreachable at", f"127.0.0.1:{w.pg.port}")
            await unhealthy(w, daemon, "analytics", words, "postgres")
            status, body = await w.get("/api/v1/market/BTCUSDT/klines")
            assert status == 503 and "postgres unreachable" in body["detail"], body
            await trades_keep_arriving(w, daemon)
            await tickers_served(w, daemon)

            await trio.to_thread.run_sync(w.pg.restart)
            await all_healthy(w, daemon, "postgres")

            await trio.to_thread.run_sync(w.pg.stop)  # dies mid-run
            await unhealthy(w, daemon, "analytics", words, "postgres")
            await trades_keep_arriving(w, daemon)
            await tickers_served(w, daemon)

            await trio.to_thread.run_sync(w.pg.restart)
            await all_healthy(w, daemon, "postgres")
            await finish(w, daemon)
