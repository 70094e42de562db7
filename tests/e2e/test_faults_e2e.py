"""No trade lost, under faults: the fake exchange drops, rotates, shuts down and skips ids, Kafka
hangs, the daemon is killed; every scenario ends with `marketd verify tape` clean AND the tape's
per-symbol id range equal to the fake exchange's ledger (every id it emitted is on the topic).

Exactness: before stopping the daemon, the exchange is frozen (every connection stalls, the
ledger stops moving), the test waits until the topic has reached the ledger's last ids, then
stops the daemon; so the ledger compared is final and nothing is in flight. A passive avgPrice
subscriber keeps the exchange trading while the daemon is disconnected or dead (it trades only
subscribed symbols), so a disconnect or a restart leaves a real hole to backfill.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from marketd.spool.segment import HEADER_BYTES, iter_frames, scan, segment_seq
from marketd.testing.fake_exchange.observer import keep_market_trading
from marketd.testing.kafka_cluster import KafkaClusterProcess
from tests.support.daemon import Daemon
from tests.support.exchange import Exchange, fake_exchange
from tests.support.kafka import TestKafka, unique_topic
from tests.support.tape import (
    ExchangeAdmin,
    IdRange,
    TapeFollower,
    tape_defects,
    verify_tape,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]

# On distinct partitions of a 4-partition topic (librdkafka's default partitioner: CRC32 of the
# key), so no partition holds more than a third of a run: the mock cluster keeps only ~4-5 MB
# per partition, and `marketd verify tape` must see each tape from its first id.
SYMBOLS = ("btcusdt", "ethusdt", "bnbusdt")


@attrs.define
class Rig:
    """One scenario's world: exchange, Kafka, topics, spool directory, a follower on the tape."""

    fx: Exchange
    admin: ExchangeAdmin
    bootstrap_servers: str
    topic: str
    gaps_topic: str
    spool_dir: Path
    follower: TapeFollower
    nursery: trio.Nursery

    def daemon(self, *args: str) -> Daemon:
        return Daemon(
            {
                "BINANCE_WS_URL": self.fx.ws_url,
                "BINANCE_REST_URL": self.fx.http_url,
                "BINANCE_STREAMS": ",".join(f"{s}@trade" for s in SYMBOLS),
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
                "MARKETD_COMPONENTS": "ingest",
                "TOPIC_RAW_TRADES": self.topic,
                "TOPIC_GAPS": self.gaps_topic,
                "RECONNECT_MAX_DELAY_SECONDS": "1",
                "SPOOL_DIR": str(self.spool_dir),
            },
            list(args),
        )

    async def start_daemon(self, *args: str) -> Daemon:
        daemon = self.daemon(*args)
        await daemon.start(self.nursery)
        await daemon.wait_for("ws.connected")
        return daemon

    async def trades_flow(self, at_least: int, timeout_s: float = 30.0) -> None:
        """Wait until the topic has `at_least` more trades than now."""
        target = self.follower.count + at_least
        await wait_until(
            lambda: self.follower.count >= target,
            f"{at_least} more trades on {self.topic}",
            timeout_s,
            lambda: f"read {self.follower.count}",
        )

    async def settle(
        self, daemon: Daemon, catch_up_s: float = 60.0
    ) -> tuple[int, dict[str, Any], dict[str, IdRange]]:
        """Freeze the exchange, wait for the tape to reach the ledger, stop the daemon, verify:
        `marketd verify tape`'s exit code and report, and the final ledger."""
        ledger = await self.admin.freeze()
        assert ledger, "the exchange sent no trades"
        await wait_until(
            lambda: self.follower.reached(ledger),
            "the tape to reach the ledger's last ids",
            catch_up_s,
            lambda: f"ledger {ledger}, tape last {self.follower.last}\n{daemon.tail()}",
        )
        assert await daemon.stop() == 0, daemon.tail()
        assert await self.admin.ledger() == ledger, "the exchange sent more after the freeze"
        code, report = await trio.to_thread.run_sync(
            verify_tape, self.bootstrap_servers, self.topic
        )
        return code, report, ledger

    async def finish(self, daemon: Daemon, catch_up_s: float = 60.0) -> dict[str, Any]:
        """`settle()`, then: no gap, no duplicate, and the tape's id range is the ledger's."""
        code, report, ledger = await self.settle(daemon, catch_up_s)
        problems = tape_defects(report, ledger)
        assert not problems, "\n".join([*problems, daemon.tail()])
        assert code == 0, report
        return report


@asynccontextmanager
async def rig(bootstrap_servers: str, tmp_path: Path, *exchange_args: str) -> AsyncIterator[Rig]:
    with fake_exchange("--symbols", ",".join(SYMBOLS), "--seed", "23", *exchange_args) as fx:
        topic = unique_topic("trades")
        follower = TapeFollower(bootstrap_servers, topic)
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            await nursery.start(keep_market_trading, fx.ws_url, SYMBOLS)
            yield Rig(
                fx,
                ExchangeAdmin(fx.http_url),
                bootstrap_servers,
                topic,
                unique_topic("gaps"),
                tmp_path / "spool",
                follower,
                nursery,
            )
            nursery.cancel_scope.cancel()


def backfilled(report: dict[str, Any]) -> int:
    return sum(s["backfilled"] for s in report["symbols"].values())


@pytest.fixture
def cluster() -> Iterator[KafkaClusterProcess]:
    """A mock cluster in its own process, so a test can hang the broker (SIGSTOP)."""
    with KafkaClusterProcess() as c:
        yield c


# -- exchange faults --------------------------------------------------------------------------


async def test_disconnects_mid_burst_lose_nothing(kafka: TestKafka, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with rig(
            kafka.bootstrap_servers,
            tmp_path,
            "--rate",
            "2000",
            "--drop-after",
            "1500",
            "--drop-repeat",
        ) as r:
            daemon = await r.start_daemon()
            await wait_until(
                lambda: len(daemon.find("ws.disconnected")) >= 3,
                "three disconnects",
                60,
                daemon.tail,
            )
            report = await r.finish(daemon)
    assert len(daemon.find("ws.connected")) >= 4
    assert backfilled(report) > 0


async def test_rotation_before_the_24h_mark_loses_nothing(kafka: TestKafka, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with rig(kafka.bootstrap_servers, tmp_path, "--rate", "1000") as r:
            daemon = await r.start_daemon(
                "--set", "rotation.max_age_s=2", "--set", "rotation.jitter_s=0"
            )
            await wait_until(
                lambda: len(daemon.find("ws.rotated")) >= 2, "two rotations", 30, daemon.tail
            )
            await r.finish(daemon)
    assert {e["reason"] for e in daemon.find("ws.rotated")} == {"max_age"}
    assert not daemon.find("ws.disconnected"), "a rotation is not a disconnect"


async def test_the_exchanges_24h_close_loses_nothing(kafka: TestKafka, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with rig(
            kafka.bootstrap_servers, tmp_path, "--rate", "1000", "--max-connection-age", "86400"
        ) as r:
            # The exchange's clock jumps a day ahead (and its trade times with it): marketd
            # must take times that far ahead of its own clock here (the largest bound allowed).
            daemon = await r.start_daemon("--set", "ingest.max_future_ms=86400000")
            await r.trades_flow(1000)
            await r.admin.advance_clock(86400)  # the connection is now 24 h old
            await wait_until(
                lambda: len(daemon.find("ws.connected")) >= 2, "a reconnect", 30, daemon.tail
            )
            await r.trades_flow(1000)
            report = await r.finish(daemon)
            assert await r.admin.counter("max_age_close") >= 1
    assert backfilled(report) > 0


async def test_server_shutdown_loses_nothing(kafka: TestKafka, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with rig(kafka.bootstrap_servers, tmp_path, "--rate", "1000") as r:
            daemon = await r.start_daemon()
            for n in (1, 2):
                await r.trades_flow(1000)
                assert await r.admin.server_shutdown(close_after_s=1.0) >= 1
                await wait_until(
                    lambda n=n: len(daemon.find("ws.rotated")) >= n,
                    f"rotation {n} after serverShutdown",
                    30,
                    daemon.tail,
                )
            await r.trades_flow(500)
            await r.finish(daemon)
    assert {e["reason"] for e in daemon.find("ws.rotated")} == {"server_shutdown"}


async def test_skipped_ids_are_backfilled_to_the_ledger(kafka: TestKafka, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with rig(
            kafka.bootstrap_servers,
            tmp_path,
            "--rate",
            "1000",
            "--skip-every",
            "200",
            "--skip-count",
            "4",
        ) as r:
            daemon = await r.start_daemon()
            await r.trades_flow(4000)
            stats = await r.admin.stats()
            report = await r.finish(daemon)
    skipped = sum(b - a + 1 for s in stats["ledger"]["symbols"].values() for a, b in s["skipped"])
    assert skipped > 0
    assert backfilled(report) >= skipped


# -- restarts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_restart_continues_the_tape_from_the_topic(
    kafka: TestKafka, tmp_path: Path, stop: str
) -> None:
    # The exchange keeps trading while no marketd runs; the next one continues each symbol's
    # tape from the topic's last id and backfills the downtime (and, after a kill -9 with Kafka
    # healthy, whatever librdkafka still held in memory).
    with trio.fail_after(150):
        async with rig(kafka.bootstrap_servers, tmp_path, "--rate", "1000") as r:
            first = await r.start_daemon()
            await r.trades_flow(2000)
            if stop == "sigterm":
                assert await first.stop() == 0, first.tail()
            else:
                first.signal(signal.SIGKILL)
                assert first.proc is not None
                assert await first.proc.wait() == -signal.SIGKILL
            await trio.sleep(2)  # downtime: the exchange trades on (the passive subscriber)
            second = await r.start_daemon()
            await r.trades_flow(2000)
            report = await r.finish(second)
    assert second.find("ingest.resumed_tape")
    assert backfilled(report) > 0
    assert all(s["out_of_order"] == 0 for s in report["symbols"].values()), report


# -- Kafka faults (need the spool) ------------------------------------------------------------


async def test_kafka_outage_is_spooled_and_replayed(
    cluster: KafkaClusterProcess, tmp_path: Path
) -> None:
    with trio.fail_after(150):
        async with rig(cluster.bootstrap_servers, tmp_path, "--rate", "500") as r:
            daemon = await r.start_daemon("--set", "spool.outage_after_s=2")
            await r.trades_flow(2000)
            paused_at = trio.current_time()
            cluster.pause()
            try:
                await daemon.wait_for("spool.outage", timeout=15)
                await trio.sleep_until(paused_at + 8.0)  # the outage lasts ~8 s
            finally:
                cluster.resume()
            await daemon.wait_for("spool.recovered", timeout=60)
            await r.trades_flow(1000)
            await r.finish(daemon)
    assert daemon.find("spool.outage")[0]["ts"] <= daemon.find("spool.recovered")[-1]["ts"]


async def test_kill_9_with_a_non_empty_spool_then_restart_loses_nothing(
    cluster: KafkaClusterProcess, tmp_path: Path
) -> None:
    with trio.fail_after(180):
        async with rig(cluster.bootstrap_servers, tmp_path, "--rate", "500") as r:
            first = await r.start_daemon("--set", "spool.outage_after_s=2")
            await r.trades_flow(2000)
            cluster.pause()
            try:
                await first.wait_for("spool.outage", timeout=15)
                await wait_until(
                    lambda: spooled_entries(r.spool_dir) >= 1000,
                    "1000 records in the spool",
                    30,
                    lambda: f"spool {spooled_entries(r.spool_dir)}\n{first.tail()}",
                )
                first.signal(signal.SIGKILL)
                assert first.proc is not None
                assert await first.proc.wait() == -signal.SIGKILL
            finally:
                cluster.resume()
            spooled = spooled_trades(r.spool_dir)
            assert spooled, "kill -9 left an empty spool"
            second = await r.start_daemon("--set", "spool.outage_after_s=2")
            await r.trades_flow(3000)
            code, report, ledger = await r.settle(second)
    # What the first daemon made durable survived the kill: every spooled id is on the tape.
    for sym, ids in spooled.items():
        tape = report["symbols"][sym]
        holes = [(a, b) for a, b in tape["gaps"] if any(a <= i <= b for i in ids)]
        assert tape["first_id"] <= min(ids) and max(ids) <= tape["last_id"] and not holes, (
            f"{sym}: spooled ids {min(ids)}..{max(ids)} not all on the tape {tape}"
        )
    # And the restart repaired what the first daemon had not made durable, and what the
    # exchange sent while no daemon ran (backfilled), with the backlog published first: ids
    # never go back on the topic.
    problems = tape_defects(report, ledger)
    assert not problems, "\n".join(
        [*problems, "first daemon:", first.tail(15), "second daemon:", second.tail(15)]
    )
    assert code == 0, report
    assert backfilled(report) > 0
    assert all(s["out_of_order"] == 0 for s in report["symbols"].values()), report


def spooled_entries(spool_dir: Path) -> int:
    """Records in the spool's segment files (read-only; a torn tail still being written is not
    counted)."""
    total = 0
    for path in _segments(spool_dir):
        try:
            total += scan(path).entries
        except FileNotFoundError:  # a segment fully acked and deleted meanwhile
            continue
    return total


def spooled_trades(spool_dir: Path) -> dict[str, list[int]]:
    """Per symbol the trade ids in the spool's segment files."""
    out: dict[str, list[int]] = {}
    for path in _segments(spool_dir):
        end = scan(path).valid_end
        for item in iter_frames(path, HEADER_BYTES, end):
            if isinstance(item, tuple):
                entry, _ = item
                rec = json.loads(entry.value)
                if "trade_id" in rec:
                    out.setdefault(rec["symbol"], []).append(rec["trade_id"])
    return out


def _segments(spool_dir: Path) -> list[Path]:
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.iterdir() if segment_seq(p) is not None)
