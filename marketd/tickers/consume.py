"""The ticker consumer component: Kafka raw_tickers -> rules -> Redis `ticker:{SYMBOL}` hashes.

Receives batches from the feed (a worker thread blocking in poll), validates each value (invalid
-> DLQ), keeps the tracked symbols, collapses the batch to the newest acceptable record per symbol
(rules.py) and writes it with one conditional pipeline (store.py). At-least-once: offsets are
committed only after the write succeeded; while Redis is down the partitions are paused and the
held batch is retried with backoff. It reports started at once and waits for Redis (forever,
capped backoff) before subscribing; Redis or Kafka out of reach is reported in `rt.health` with
the reason, never raised. On drain it commits what it stored, closes the consumer and returns.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec
import trio

from marketd.backoff import Backoff
from marketd.errors import ConfigError, KafkaUnavailable, StoreUnavailable
from marketd.health import Dependency, address, error_text
from marketd.kafka.client import consumer_settings, is_embedded, producer_settings
from marketd.logs import Throttle, get_logger
from marketd.records import TickerRecord
from marketd.runtime import Runtime
from marketd.tickers import state as ticker_state
from marketd.tickers.dlq import DeadLetters
from marketd.tickers.feed import TickerFeed, TopicPartition, next_offsets, tuning
from marketd.tickers.rules import Invalid, Limits, Plan, parse_ticker, plan_batch, tracked_symbols
from marketd.tickers.store import TickerStore, WriteResult, WriteStatus

log = get_logger(__name__)

COMPONENT: Final = "tickers"
# Commits are batched in time, not per batch: at 1,000 tickers/s every message is its own batch,
# and 1,000 OffsetCommit requests/s would load the broker for nothing. Committing later than
# storing only widens the window of duplicates after a crash, which the conditional write skips.
COMMIT_INTERVAL_S: Final = 0.2
LAG_INTERVAL_S: Final = 1.0
REDIS_TIMEOUT_S: Final = 2.0  # connect and per-reply bound: a hung Redis becomes an outage
OUTAGE_BACKOFF_INITIAL_S: Final = 0.1
OUTAGE_BACKOFF_MAX_S: Final = 5.0
# Idle checks: with no successful write (Redis) or no message (Kafka) for this long, ask the
# service directly, so an outage shows in /readyz within seconds even when no ticker flows.
REDIS_CHECK_S: Final = 2.0
KAFKA_CHECK_S: Final = 3.0
KAFKA_PROBE_TIMEOUT_S: Final = 2.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TickerConsumer:
    """The consume -> rules -> store loop. Owns nothing: run_tickers builds and closes the parts."""

    def __init__(
        self,
        rt: Runtime,
        feed: TickerFeed,
        store: TickerStore,
        dlq: DeadLetters,
    ) -> None:
        cfg = rt.config.tickers
        self.rt = rt
        self.feed = feed
        self.store = store
        self.dlq = dlq
        self.state, self.metrics = ticker_state.attach(rt)
        self.tracked = tracked_symbols(cfg.symbols)
        self.limits = Limits(cfg.watermark_delay_ms, cfg.max_future_ms)
        self.ttl_s = cfg.ttl_s
        self._redis_limiter = trio.CapacityLimiter(1)
        self._throttle = Throttle(60.0)
        self._pending: list[TickerRecord] = []  # tracked, valid, not yet written
        self._offsets: dict[TopicPartition, int] = {}  # of the messages behind _pending
        self._uncommitted: dict[TopicPartition, int] = {}  # stored, commit due
        self.stored_offsets: dict[TopicPartition, int] = {}  # stored, all partitions
        self._next_commit = 0.0
        self._next_lag = 0.0
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self._backoff = Backoff(OUTAGE_BACKOFF_INITIAL_S, OUTAGE_BACKOFF_MAX_S)
        self.redis_at = address(rt.redis_url or "")
        self.kafka_at = rt.kafka_bootstrap
        self._redis_ok_at = trio.current_time()  # last successful Redis call
        self._kafka_ok_at = trio.current_time()  # last message or answered metadata request
        self._kafka_error: str | None = None  # why Kafka is out of reach, None while it answers
        self._consumed = self.metrics.consumed
        self._batch_size = self.metrics.batch_size.labels()
        self._write_latency = self.metrics.redis_write.labels()
        self._event_latency = self.metrics.event_to_stored.labels()
        self._ingest_latency = self.metrics.ingested_to_stored.labels()

    async def redis_call(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._redis_limiter)

    async def run(self) -> None:
        """Consume until `rt.draining`; then commit what was stored (close() does it)."""
        draining = self.rt.draining
        while not draining.is_set():
            messages = await self.feed.fetch()
            if messages:
                self.accept(messages)
            if (self._pending or self._offsets) and not await self.store_pending():
                return  # drain requested during a Redis outage: nothing more is committed
            now = trio.current_time()
            if self._uncommitted and now >= self._next_commit:
                self.commit(now)
            # While unknown (no assignment yet), ask on every pass: /api/v1/ticker/health should
            # report a number as soon as partitions are assigned, not up to a second later.
            # lag() is local (cached positions and watermarks), so asking often costs nothing.
            if now >= self._next_lag or self.state.consumer_lag is None:
                self.state.consumer_lag = self.feed.lag()
                self._next_lag = now + LAG_INTERVAL_S
            if now - self._redis_ok_at >= REDIS_CHECK_S:
                await self.check_redis()
            if now - self._kafka_ok_at >= KAFKA_CHECK_S:
                await self.check_kafka()

    # -- health --------------------------------------------------------------------------------

    def report(self) -> None:
        """Healthy while Redis takes writes and Kafka answers; the reason names what does not."""
        if self._outage_since is not None:
            return  # _outage() reported Redis
        if self._kafka_error is not None:
            self.rt.health.set(COMPONENT, healthy=False, reason=self._kafka_error)
        else:
            self.rt.health.set(
                COMPONENT, healthy=True, reason=f"consuming {self.feed.topic} into redis"
            )

    def redis_unreachable(self, exc: BaseException) -> str:
        return f"redis unreachable at {self.redis_at}: {error_text(exc)}"

    async def check_redis(self) -> None:
        """Idle: no write succeeded lately. A failed PING is an outage like a failed write."""
        try:
            await self.redis_call(self.store.ping)
        except StoreUnavailable as exc:
            await self._outage(exc)
            return
        self._redis_ok_at = trio.current_time()
        if self._outage_since is not None:
            self._recovered()

    async def check_kafka(self) -> None:
        """No message lately: does a broker answer a metadata request for the topic?"""
        try:
            await self.feed.probe(KAFKA_PROBE_TIMEOUT_S)
        except KafkaUnavailable as exc:
            reason = f"kafka unreachable at {self.kafka_at}: {exc}"
            if self._kafka_error is None:
                log.warning("tickers.kafka_down", reason=reason)
            self._kafka_error = reason
            self.rt.health.dependency(Dependency.KAFKA, up=False, reason=reason)
            self._kafka_ok_at = trio.current_time() - KAFKA_CHECK_S + 1.0  # ask again in 1 s
            self.report()
            return
        self._kafka_seen()

    def _kafka_seen(self) -> None:
        self._kafka_ok_at = trio.current_time()
        if self._kafka_error is not None:
            log.info("tickers.kafka_back", topic=self.feed.topic)
            self._kafka_error = None
            self.rt.health.dependency(Dependency.KAFKA, up=True, reason="answering")
            self.report()

    def accept(self, messages: list[Any]) -> None:
        """Validate and filter one fetched batch into the pending records."""
        self.state.last_message_ms = _now_ms()
        self._kafka_seen()
        self._consumed.inc(self.feed.topic, len(messages))
        self._batch_size.observe(len(messages))
        tracked = self.tracked
        pending = self._pending
        for msg in messages:
            try:
                record = parse_ticker(msg.value())
            except Invalid as exc:
                self._invalid(msg, exc)
                continue
            if record.symbol not in tracked:
                upper = record.symbol.upper()
                if upper not in tracked:
                    self.metrics.skipped.inc("untracked")
                    continue
                record = msgspec.structs.replace(record, symbol=upper)
            pending.append(record)
        next_offsets(messages, self._offsets)

    def _invalid(self, msg: Any, exc: Invalid) -> None:
        self.metrics.invalid.inc(exc.reason)
        suppressed = self._throttle.should_log(exc.reason, trio.current_time())
        if suppressed is not None:
            log.warning(
                "tickers.invalid",
                reason=exc.reason,
                detail=exc.detail[:300],
                partition=msg.partition(),
                offset=msg.offset(),
                sample=(msg.value() or b"")[:160],
                suppressed_since_last=suppressed,
            )
        self.dlq.send(msg, exc.reason, exc.detail)

    async def store_pending(self) -> bool:
        """Write the pending batch, retrying through Redis outages. False: drained meanwhile."""
        while True:
            plan = plan_batch(self._pending, _now_ms(), self.state.stored, self.limits)
            results: list[WriteResult] = []
            if plan.writes:
                try:
                    results = await self._write(plan)
                except StoreUnavailable as exc:
                    if not await self._outage(exc):
                        return False
                    continue
            if plan.writes:
                self._redis_ok_at = trio.current_time()
                if self._outage_since is not None:
                    self._recovered()
            elif self._outage_since is not None:
                # Nothing to write (every held record was skipped by the rules) proves nothing
                # about Redis: ask it before calling the outage over.
                await self.check_redis()
            self._account(plan, results)
            if self.dlq.unflushed:
                await self.dlq.flush()  # dead letters are acknowledged before their commit
            for key, offset in self._offsets.items():
                self._uncommitted[key] = max(offset, self._uncommitted.get(key, -1))
                self.stored_offsets[key] = max(offset, self.stored_offsets.get(key, -1))
            self._pending = []
            self._offsets = {}
            return True

    async def _write(self, plan: Plan) -> list[WriteResult]:
        records = list(plan.writes.values())
        started = time.perf_counter()
        updated_at = _now_ms()
        results: list[WriteResult] = await self.redis_call(
            self.store.write, records, updated_at, self.ttl_s
        )
        done_ns = time.time_ns()
        self._write_latency.observe(time.perf_counter() - started)
        for record, result in zip(records, results, strict=True):
            if result.status is WriteStatus.STORED:
                self._event_latency.observe(max(0.0, done_ns / 1e9 - record.event_time / 1e3))
                self._ingest_latency.observe(max(0.0, done_ns / 1e9 - record.ingested_at / 1e3))
        return results

    def _account(self, plan: Plan, results: list[WriteResult]) -> None:
        m = self.metrics
        for verdict, n in plan.skipped.items():
            m.skipped.inc(verdict.value, n)
        stored = self.state.stored
        for result in results:
            if result.status is None:
                m.store_errors.inc("refused")
                if self._throttle.should_log("refused", trio.current_time()) is not None:
                    log.error("tickers.write_refused", symbol=result.symbol, error=result.error)
                continue
            if result.stored_event_time is not None:
                stored[result.symbol] = max(result.stored_event_time, stored.get(result.symbol, 0))
            if result.status is WriteStatus.STORED:
                m.stored.inc(result.symbol)
            elif result.status is WriteStatus.OLDER:
                m.skipped.inc("older_than_stored")
            else:
                m.skipped.inc("duplicate")

    def commit(self, now: float) -> None:
        self.feed.commit(self._uncommitted)
        self._uncommitted = {}
        self._next_commit = now + COMMIT_INTERVAL_S

    # -- Redis outages -----------------------------------------------------------------------

    async def _outage(self, exc: StoreUnavailable) -> bool:
        """Pause, wait one backoff step (still serving the group), True to retry."""
        if self._outage_since is None:
            self._outage_since = trio.current_time()
            self._backoff.reset()
            self._outage_attempts = 0
            self.state.redis_up = False
            reason = self.redis_unreachable(exc)
            self.rt.health.set(COMPONENT, healthy=False, reason=reason[:300])
            self.rt.health.dependency(Dependency.REDIS, up=False, reason=reason[:300])
            log.warning(
                "tickers.redis_down",
                reason=reason,
                held=len(self._pending),
                detail="consumption paused; retrying with backoff; nothing is committed",
            )
        self._outage_attempts += 1
        self.feed.pause()
        deadline = trio.current_time() + self._backoff.delay()
        while trio.current_time() < deadline:
            if self.rt.draining.is_set():
                log.warning(
                    "tickers.drained_during_outage",
                    held=len(self._pending),
                    detail="uncommitted; redelivered to the next consumer",
                )
                return False
            # Paused partitions return nothing, but polling keeps the group membership
            # (max.poll.interval.ms) and serves rebalances; a new assignment is not paused,
            # so whatever it delivers joins the held batch and the partitions pause again.
            messages = await self.feed.fetch()
            if messages:
                self.accept(messages)
                self.feed.pause()
        return not self.rt.draining.is_set()

    def _recovered(self) -> None:
        assert self._outage_since is not None
        down_s = trio.current_time() - self._outage_since
        self._outage_since = None
        self.state.redis_up = True
        self.feed.resume()
        self.rt.health.dependency(Dependency.REDIS, up=True, reason=f"answering at {self.redis_at}")
        self.report()
        log.info(
            "tickers.redis_back",
            down_s=round(down_s, 3),
            attempts=self._outage_attempts,
            held=len(self._pending),
        )


async def _wait_for_redis(rt: Runtime, consumer: TickerConsumer) -> bool:
    """Ping until Redis answers (True) or a drain is requested (False): no give-up, an
    unreachable Redis is reported in rt.health for as long as it lasts."""
    backoff = Backoff(OUTAGE_BACKOFF_INITIAL_S * 2, OUTAGE_BACKOFF_MAX_S)
    logged = False
    while True:
        try:
            await consumer.redis_call(consumer.store.ping)
            rt.health.dependency(
                Dependency.REDIS, up=True, reason=f"answering at {consumer.redis_at}"
            )
            return True
        except StoreUnavailable as exc:
            reason = consumer.redis_unreachable(exc)
            rt.health.set(COMPONENT, healthy=False, reason=reason[:300])
            rt.health.dependency(Dependency.REDIS, up=False, reason=reason[:300])
            if not logged:
                logged = True
                log.warning(
                    "tickers.redis_waiting",
                    reason=reason,
                    detail="not consuming until Redis answers; retrying with backoff",
                )
            with trio.move_on_after(backoff.delay()):
                await rt.draining.wait()
            if rt.draining.is_set():
                return False


async def run_tickers(
    rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Component entry point: started() at once; consumes once Redis answers; returns on drain."""
    cfg = rt.config
    if rt.redis_url is None:
        raise ConfigError("redis.url", "runtime", "the ticker consumer needs Redis; none resolved")
    rt.health.set(COMPONENT, started=True, healthy=False, reason="starting")
    task_status.started()
    state, metrics = ticker_state.attach(rt)
    embedded = is_embedded(cfg.kafka.bootstrap_servers)
    settings = consumer_settings(
        cfg.kafka, rt.kafka_bootstrap, cfg.tickers.group, **tuning(embedded)
    )
    store = TickerStore(rt.redis_url, timeout_s=REDIS_TIMEOUT_S, client_name="marketd-tickers")
    try:
        dlq = DeadLetters(
            producer_settings(cfg.kafka, rt.kafka_bootstrap),
            cfg.topics.dlq,
            outcomes=metrics.dlq,
            max_raw_bytes=cfg.dlq.max_raw_bytes,
        )
        feed = TickerFeed(settings, cfg.tickers.topic)
        consumer = TickerConsumer(rt, feed, store, dlq)
        try:
            if not await _wait_for_redis(rt, consumer):
                return
            feed.subscribe()
            state.running = True
            state.redis_up = True
            consumer.report()
            log.info(
                "tickers.started",
                topic=feed.topic,
                group=cfg.tickers.group,
                symbols=len(consumer.tracked),
                fetch_wait_max_ms=settings["fetch.wait.max.ms"],
            )
            await consumer.run()
        finally:
            state.running = False
            await feed.close(consumer.stored_offsets)
            await dlq.close()
            stored = sum(metrics.stored.values.values())
            log.info("tickers.stopped", stored_total=stored, draining=rt.draining.is_set())
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
        rt.health.set(COMPONENT, healthy=False, reason="stopped")
