"""The dashboard in a real browser: Debian's chromium driven by Playwright (sync API).

`marketd fake-exchange` → `marketd run` (all components; Kafka is the tests' mock cluster, Redis
a private redis-server) → http://127.0.0.1:<port>/ in headless chromium. The browser comes from
the system package (scripts/bootstrap --dev installs `chromium`); Playwright never downloads one.
A plain (non-trio) test: Playwright's sync API runs its own event loop.

Saves screenshots under the test's tmp dir (and $MARKETD_ARTIFACTS when set).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from marketd.tickers.redis_server import RedisProcess, free_port
from tests.support.exchange import fake_exchange
from tests.support.kafka import TestKafka, unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.redis]

CHROMIUM = shutil.which("chromium")
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Resolves with (now - event_time) in ms at the moment the row shows a newer ticker than it
# showed when called: the page's own clock against the exchange's send time (same machine).
NEXT_UPDATE_LAG_JS = """
(symbol) => new Promise((resolve) => {
  const row = document.querySelector(`#tickers tbody tr[data-symbol="${symbol}"]`);
  const before = row.dataset.eventTime;
  const observer = new MutationObserver(() => {
    if (row.dataset.eventTime !== before) {
      observer.disconnect();
      resolve(Date.now() - Number(row.dataset.eventTime));
    }
  });
  observer.observe(row, { attributes: true, attributeFilter: ["data-event-time"] });
})
"""


def _env(
    kafka: TestKafka, redis_server: RedisProcess, ws_url: str, rest_url: str, port: int
) -> dict[str, str]:
    topic = unique_topic("tickers")
    return {
        **os.environ,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "BINANCE_WS_URL": ws_url,
        "BINANCE_REST_URL": rest_url,
        "BINANCE_STREAMS": ",".join(f"{s.lower()}@ticker,{s.lower()}@trade" for s in SYMBOLS),
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "REDIS_URL": redis_server.url,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "TICKER_SYMBOLS": ",".join(SYMBOLS),
        "TOPIC_RAW_TICKERS": topic,
        "KAFKA_TICKER_TOPIC": topic,
        "TOPIC_RAW_TRADES": unique_topic("trades"),
        "TOPIC_RAW_KLINES": unique_topic("klines"),
        "TOPIC_DLQ": unique_topic("dlq"),
        "TICKER_CONSUMER_GROUP": f"browser-{uuid.uuid4().hex[:8]}",
    }


@contextmanager
def daemon(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "marketd.cli", "run"],
            env={**env, "SPOOL_DIR": str(log.parent / f"spool-{uuid.uuid4().hex[:6]}")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"daemon did not answer {url}: {log.read_text()[-3000:]}")


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("MARKETD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)


def test_dashboard_live_market_health_and_reconnect(
    kafka: TestKafka, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Fails loudly, like every other missing binary: scripts/test installs it.
    assert CHROMIUM is not None, "chromium not found: scripts/bootstrap --dev installs it"
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "daemon.log"
    symbols = ",".join(s.lower() for s in SYMBOLS)
    with (
        fake_exchange("--rate", "30", "--symbols", symbols) as exchange,
        sync_playwright() as pw,
    ):
        env = _env(kafka, redis_server, exchange.ws_url, exchange.http_url, port)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            console_errors: list[str] = []
            page.on(
                "console",
                lambda m: console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            expect.set_options(timeout=30_000)

            with daemon(env, log) as proc:
                wait_http(f"{base}/healthz", proc, log)
                response = page.goto(base + "/")
                assert response is not None and response.status == 200
                csp = response.headers["content-security-policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp

                # Every tracked symbol, with a price from the stream.
                for symbol in SYMBOLS:
                    row = page.locator(f'#tickers tbody tr[data-symbol="{symbol}"]')
                    expect(row).to_have_attribute("data-event-time", re.compile(r"\d+"))
                expect(page.locator("#conn")).to_have_attribute("data-state", "live")

                # A new ticker frame is on screen within 2 s of leaving the fake exchange
                # (its E is the send time: frames are built when sent).
                lags = [page.evaluate(NEXT_UPDATE_LAG_JS, "BTCUSDT") for _ in range(3)]
                assert all(0 <= lag <= 2000 for lag in lags), lags
                expect(page.locator('#health li[data-component="tickers"]')).to_have_attribute(
                    "data-healthy", "true"
                )
                assert console_errors == [], console_errors
                page.wait_for_timeout(1500)  # let the chart and the ingest rates fill in
                shot(page, tmp_path, "dashboard")

                # A component's outage and recovery: Redis goes away and comes back.
                redis_server.stop()
                tickers = page.locator('#health li[data-component="tickers"]')
                expect(tickers).to_have_attribute("data-healthy", "false")
                expect(tickers.locator(".reason")).to_contain_text("redis")
                expect(page.locator('#health li[data-component="push stream"]')).to_have_attribute(
                    "data-healthy", "false"
                )
                expect(page.locator("#banner")).to_be_visible()
                shot(page, tmp_path, "dashboard-redis-down")
                redis_server.start()
                expect(tickers).to_have_attribute("data-healthy", "true")
                expect(page.locator('#health li[data-component="push stream"]')).to_have_attribute(
                    "data-healthy", "true"
                )
                expect(page.locator("#banner")).to_be_hidden()
                page.evaluate(NEXT_UPDATE_LAG_JS, "ETHUSDT")  # prices flow again

            # The daemon stopped: the page says so; it reconnects by itself after a restart.
            stopped_at_ms = time.time_ns() // 1_000_000
            expect(page.locator("#conn")).not_to_have_attribute("data-state", "live")
            with daemon(env, log) as proc:
                wait_http(f"{base}/healthz", proc, log)
                expect(page.locator("#conn")).to_have_attribute("data-state", "live")
                # Prices the new daemon stored reach the page (the first ones may be a few
                # seconds old while its Kafka consumer joins the group: no lag bound here).
                row = page.locator('#tickers tbody tr[data-symbol="BTCUSDT"]')
                page.wait_for_function(
                    "([sel, t]) => Number(document.querySelector(sel).dataset.eventTime) > t",
                    arg=['#tickers tbody tr[data-symbol="BTCUSDT"]', stopped_at_ms],
                    timeout=90_000,  # the new daemon joins the consumer group first
                )
                assert int(row.get_attribute("data-event-time") or 0) > stopped_at_ms
                shot(page, tmp_path, "dashboard-reconnected")
        finally:
            browser.close()


# -- the order-book panel (API only, books written straight into Redis) --------------------------


@contextmanager
def api_thread(rt: Any) -> Iterator[None]:
    """The real API component (Hypercorn + Quart-Trio) in its own trio loop on a thread, so the
    sync Playwright API can drive the browser from this one; drained on exit."""
    import threading

    import trio

    from marketd.api.server import run_api

    started = threading.Event()
    token: list[Any] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_api, rt)
            token.append(trio.lowlevel.current_trio_token())
            started.set()

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=main, name="api", daemon=True)
    thread.start()
    assert started.wait(30), "the API did not start"
    assert not failure, failure
    try:
        yield
    finally:
        trio.from_thread.run_sync(rt.draining.set, trio_token=token[0])
        thread.join(30)
        assert not thread.is_alive() and not failure, failure


def test_order_book_panel_follows_the_book_stream(
    redis_server: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert CHROMIUM is not None, "chromium not found: scripts/bootstrap --dev installs it"
    from playwright.sync_api import expect, sync_playwright

    from marketd.api import book
    from marketd.books.board import BookView
    from marketd.books.store import BookStore, BookWrite
    from marketd.tickers.store import TickerStore
    from tests.tickers.records import now_ms, runtime, ticker

    # Books for BTCUSDT only (whatever depth streams the configuration accepts).
    monkeypatch.setattr(book, "book_symbols", lambda _cfg: ("BTCUSDT",))
    port = free_port()
    rt = runtime(
        redis_url=redis_server.url,
        env={"API_PORT": str(port), "TICKER_SYMBOLS": "BTCUSDT,ETHUSDT"},
    )
    tickers, books = TickerStore(redis_server.url), BookStore(redis_server.url)

    def put_book(last: int, bid: str, *, in_sync: bool = True) -> None:
        v = BookView(
            symbol="BTCUSDT",
            last_update_id=last,
            event_time=now_ms(),
            bids=((bid, "1.5"), ("99.00", "2"), ("98.00", "3")),
            asks=(("101.00", "0.5"), ("102.00", "4")),
            in_sync=in_sync,
            reason=None if in_sync else "gap",
        )
        books.write([BookWrite(v)], now_ms(), 60, 20)

    try:
        tickers.write([ticker("BTCUSDT"), ticker("ETHUSDT")], now_ms(), 60)
        put_book(10, "100.00")
        with (
            api_thread(rt),
            sync_playwright() as pw,
        ):
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 1100})
                console_errors: list[str] = []
                page.on(
                    "console",
                    lambda m: console_errors.append(m.text) if m.type == "error" else None,
                )
                page.on("pageerror", lambda exc: console_errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/")
                page.locator('#tickers tbody tr[data-symbol="BTCUSDT"]').click()
                panel = page.locator("#book")
                expect(panel).to_be_visible(timeout=10_000)
                expect(page.locator("#book-symbol")).to_have_text("BTCUSDT")
                expect(page.locator("#book-badge")).to_have_text("in sync")
                bids = page.locator("#book-bids tbody tr")
                expect(bids).to_have_count(3)
                expect(bids.first).to_contain_text("100")
                expect(page.locator("#book-asks tbody tr")).to_have_count(2)
                # A stored update reaches the page through books:updates.
                put_book(11, "100.25")
                expect(bids.first).to_contain_text("100.25", timeout=5_000)
                put_book(11, "100.25", in_sync=False)
                expect(page.locator("#book-badge")).to_have_text("out of sync: gap")
                shot(page, tmp_path, "dashboard-book")
                # A symbol without a book says so.
                page.locator('#tickers tbody tr[data-symbol="ETHUSDT"]').click()
                expect(page.locator("#book-empty")).to_contain_text("no order book")
                expect(page.locator("#book-bids")).to_be_hidden()
                assert console_errors == [], console_errors
            finally:
                browser.close()
    finally:
        tickers.close()
        books.close()
