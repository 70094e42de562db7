"""Fault-test helpers: follow a trade topic while the daemon runs, drive and read the fake exchange.

`TapeFollower` reads the topic along (by assignment, from the beginning) and keeps per symbol the
highest trade id seen, so a test knows when the tape has caught up with the exchange's ledger.
(The subscriber that keeps the exchange trading while the daemon is away lives in
marketd/testing/fake_exchange/observer.py, shared with bench/faults.py.)
`ExchangeAdmin` talks to the exchange's `/fake/*` endpoints; `freeze()` stops every connection's
sending (a stall until cleared) and returns the ledger once it stopped moving, so a test can
compare exactly "what the exchange emitted" with "what reached Kafka".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import confluent_kafka
import httpx
import trio

# How long the ledger must stand still before it counts as final: longer than the daemon's
# reconnect delay in these tests (RECONNECT_MAX_DELAY_SECONDS=1), so a reconnect that would send
# one more frame before stalling happens inside the window.
LEDGER_STILL_S = 1.5


@attrs.frozen
class IdRange:
    first: int
    last: int


class TapeFollower:
    """Reads a trade topic from the beginning while it grows; `last[symbol]` = highest id."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"follow-{uuid.uuid4().hex[:8]}",  # assignment only, nothing committed
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "fetch.queue.backoff.ms": 10,
            }
        )
        self.last: dict[str, int] = {}
        self.count = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._assign()
            while True:
                for msg in await trio.to_thread.run_sync(self.consumer.consume, 1000, 0.1):
                    if msg.error() is None:
                        rec = json.loads(msg.value())
                        sym, tid = rec["symbol"], rec["trade_id"]
                        self.last[sym] = max(tid, self.last.get(sym, tid))
                        self.count += 1
        finally:
            self.consumer.close()

    async def _assign(self) -> None:
        # The topic appears with the daemon's first produce (auto-created).
        while True:
            md = await trio.to_thread.run_sync(self.consumer.list_topics, self.topic, 5)
            tmd = md.topics.get(self.topic)
            if tmd is not None and tmd.error is None and tmd.partitions:
                self.consumer.assign(
                    [
                        confluent_kafka.TopicPartition(
                            self.topic, p, confluent_kafka.OFFSET_BEGINNING
                        )
                        for p in tmd.partitions
                    ]
                )
                return
            await trio.sleep(0.1)

    def reached(self, ledger: dict[str, IdRange]) -> bool:
        return all(self.last.get(sym, -1) >= r.last for sym, r in ledger.items())


class ExchangeAdmin:
    """The fake exchange's admin API (`/fake/stats`, `/fake/faults`, ...)."""

    def __init__(self, http_url: str) -> None:
        self.http_url = http_url

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.http_url, timeout=10) as client:
            response = await client.request(method, path, json=body)
            response.raise_for_status()
            return response.json()

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/fake/stats")
        return result

    async def faults(self, **changes: Any) -> None:
        await self._call("POST", "/fake/faults", changes)

    async def server_shutdown(self, close_after_s: float) -> int:
        return int(
            (await self._call("POST", "/fake/server-shutdown", {"close_after_s": close_after_s}))[
                "connections"
            ]
        )

    async def advance_clock(self, seconds: float) -> None:
        await self._call("POST", "/fake/clock", {"advance_s": seconds})

    async def counter(self, name: str) -> int:
        return int((await self.stats())["faults_injected"].get(name, 0))

    async def ledger(self) -> dict[str, IdRange]:
        return ledger_ranges(await self.stats())

    async def freeze(self, timeout_s: float = 20.0) -> dict[str, IdRange]:
        """Stop all sending (faults that would close a connection cleared) and return the ledger
        once it has not moved for LEDGER_STILL_S."""
        await self.faults(
            stall_after=1,
            stall_repeat=True,
            stall_for_s=None,
            drop_after=None,
            shutdown_after=None,
            max_connection_age_s=None,
        )
        with trio.fail_after(timeout_s):
            before = await self.stats()
            while True:
                await trio.sleep(LEDGER_STILL_S)
                now = await self.stats()
                if now["ledger"] == before["ledger"]:
                    return ledger_ranges(now)
                before = now


def ledger_ranges(stats: dict[str, Any]) -> dict[str, IdRange]:
    """Per symbol the first and last trade id the exchange sent on any WebSocket."""
    return {
        sym: IdRange(s["trade_ids"]["first"], s["trade_ids"]["last"])
        for sym, s in stats["ledger"]["symbols"].items()
        if s.get("trade_ids")
    }


async def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float, detail: Callable[[], str] = str
) -> None:
    """Poll `condition` (the system under test making progress) until true, or fail naming it."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; {detail()}")


def verify_tape(bootstrap_servers: str, topic: str) -> tuple[int, dict[str, Any]]:
    """`marketd verify tape --json`: exit code and report."""
    result = subprocess.run(
        [sys.executable, "-m", "marketd.cli", "verify", "tape", "--topic", topic, "--json"],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, f"verify tape printed nothing (exit {result.returncode}): {result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, report


def tape_defects(report: dict[str, Any], ledger: dict[str, IdRange]) -> list[str]:
    """What keeps the tape from being exactly the ledger: gaps, duplicates, a different range."""
    problems: list[str] = []
    for part in report["partitions"]:
        if part["low"] > 0:
            problems.append(
                f"partition {part['partition']}: offsets before {part['low']} were deleted by "
                "retention (too much data for the mock cluster): the tape's head is not checked"
            )
    symbols = report["symbols"]
    if set(symbols) != set(ledger):
        problems.append(f"symbols on the tape {sorted(symbols)} != ledger {sorted(ledger)}")
    for sym, r in sorted(ledger.items()):
        s = symbols.get(sym)
        if s is None:
            continue
        if s["gaps"]:
            problems.append(f"{sym}: {s['missing']} ids missing in gaps {s['gaps'][:10]}")
        if s["duplicates"]:
            problems.append(
                f"{sym}: {s['duplicates']} duplicates, e.g. {s['duplicate_ids_sample']}"
            )
        if (s["first_id"], s["last_id"]) != (r.first, r.last):
            problems.append(
                f"{sym}: tape ids {s['first_id']}..{s['last_id']} != ledger {r.first}..{r.last}"
            )
    return problems
