"""Kafka adapter of the ticker consumer: raw_tickers in batches, offsets committed on demand.

Every blocking consumer call (poll, consume, final commit, close) runs in a worker thread under
this feed's own CapacityLimiter(1), so the consumer is never used by two threads at once; the
trio side gets whole batches back. Non-blocking calls (async commit, pause, position) run on the
trio thread between fetches. `close()` commits nothing by itself and leaves the group cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import confluent_kafka
import trio

from marketd.errors import KafkaUnavailable
from marketd.kafka.client import is_retriable
from marketd.logs import Throttle, get_logger

log = get_logger(__name__)

# Latency tuning (docs/performance.md §4 and §7). The loop is poll(timeout) then
# consume(N, timeout=0): poll returns as soon as one message is there, the drain takes what is
# already queued, and consume(N, timeout=T) -- which waits for N messages or T -- is never used
# on the hot path.
MAX_BATCH: Final = 1000  # messages per drain; ~1 ms of consumer work at 1M msgs/s
POLL_TIMEOUT_S: Final = 0.1  # an idle poll; also bounds how long a drain request waits
# librdkafka's mock broker answers a fetch only when fetch.wait.max.ms expires, so on the
# embedded cluster it is the latency floor: 1 ms (p50 1.7 ms end to end, docs/performance.md
# §7). A real broker answers as soon as data arrives (fetch.min.bytes=1); there the wait only
# paces empty fetches on an idle topic, so 100 ms saves the broker ~1000 empty fetches/s per
# consumer.
FETCH_WAIT_MAX_MS_EMBEDDED: Final = 1
FETCH_WAIT_MAX_MS_BROKER: Final = 100
# The default 1 s backoff stalls a consumer that drains faster than it refills
# (docs/performance.md §4).
FETCH_QUEUE_BACKOFF_MS: Final = 10

TopicPartition = tuple[str, int]


def tuning(embedded: bool) -> dict[str, Any]:
    """Consumer properties for the hot path; `[kafka.consumer]` still overrides them."""
    return {
        "fetch.wait.max.ms": FETCH_WAIT_MAX_MS_EMBEDDED if embedded else FETCH_WAIT_MAX_MS_BROKER,
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        "client.id": "marketd-tickers",
        "socket.nagle.disable": True,
    }


class TickerFeed:
    """One confluent_kafka.Consumer subscribed to the ticker topic."""

    def __init__(
        self,
        settings: dict[str, Any],
        topic: str,
        *,
        max_batch: int = MAX_BATCH,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        consumer_factory: Callable[[dict[str, Any]], Any] = confluent_kafka.Consumer,
    ) -> None:
        self.topic = topic
        self.max_batch = max_batch
        self.poll_timeout_s = poll_timeout_s
        settings = {**settings, "on_commit": self._on_commit, "error_cb": self._on_error}
        self._consumer = consumer_factory(settings)
        self._limiter = trio.CapacityLimiter(1)
        self._throttle = Throttle(60.0)
        self._closed = False
        # Partitions owned right now; updated by the rebalance callbacks, which librdkafka runs
        # inside poll()/consume() (so in the worker thread, never concurrently with trio's use).
        self.assigned: set[TopicPartition] = set()
        self.paused = False
        # The last client-level error (librdkafka's error_cb: "Connect to ... failed: Connection
        # refused", "all brokers down"), to name the cause when a probe finds Kafka unreachable.
        self.last_error: str | None = None

    # -- rebalance callbacks (worker thread, inside poll) ---------------------------------------

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("tickers.assigned", partitions=_names(partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        log.info("tickers.revoked", partitions=_names(partitions))

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        log.warning("tickers.partitions_lost", partitions=_names(partitions))

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        failed = [p for p in partitions or () if p.error is not None]
        if err is None and not failed:
            return
        reason = err.str() if err is not None else failed[0].error.str()
        if self._throttle.should_log(f"commit:{reason}", time.monotonic()) is not None:
            # After a rebalance the new owner re-reads from the last committed offset: at worst
            # duplicates, which the conditional write skips.
            log.warning("tickers.commit_failed", reason=reason, partitions=_names(partitions))

    def _on_error(self, err: confluent_kafka.KafkaError) -> None:
        self.last_error = err.str()
        if self._throttle.should_log(f"client:{err.code()}", time.monotonic()) is not None:
            log.warning("tickers.kafka_client_error", error=err.str(), fatal=err.fatal())

    # -- trio side -------------------------------------------------------------------------------

    def subscribe(self) -> None:
        self._consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    async def fetch(self) -> list[Any]:
        """The next batch of messages (possibly empty after the poll timeout)."""
        return await trio.to_thread.run_sync(self._fetch_blocking, limiter=self._limiter)

    def _fetch_blocking(self) -> list[Any]:
        first = self._consumer.poll(self.poll_timeout_s)
        if first is None:
            return []
        batch = [first]
        if self.max_batch > 1:
            batch += self._consumer.consume(self.max_batch - 1, 0)
        good = [m for m in batch if m.error() is None]
        if len(good) != len(batch):
            for m in batch:
                if m.error() is not None:
                    self._kafka_error(m.error())
        return good

    def _kafka_error(self, err: confluent_kafka.KafkaError) -> None:
        if err.fatal():
            raise KafkaUnavailable(f"fatal consumer error: {err.str()}")
        if self._throttle.should_log(f"error:{err.code()}", time.monotonic()) is not None:
            log.warning(
                "tickers.kafka_error",
                error=err.str(),
                retriable=is_retriable(err),
            )

    async def probe(self, timeout_s: float) -> None:
        """Raise KafkaUnavailable unless a broker answers a metadata request for the topic
        within `timeout_s` (worker thread, between fetches: same limiter as poll)."""

        def ask() -> None:
            try:
                self._consumer.list_topics(self.topic, timeout=timeout_s)
            except confluent_kafka.KafkaException as exc:
                err = exc.args[0] if exc.args else None
                text = err.str() if isinstance(err, confluent_kafka.KafkaError) else str(exc)
                if self.last_error:
                    text = f"{text} (last client error: {self.last_error})"
                raise KafkaUnavailable(f"no metadata answer in {timeout_s:g}s: {text}") from exc
            self.last_error = None

        if not self._closed:
            await trio.to_thread.run_sync(ask, limiter=self._limiter)

    def commit(self, next_offsets: Mapping[TopicPartition, int]) -> int:
        """Asynchronous commit of the owned partitions; returns how many were committed."""
        offsets = [
            confluent_kafka.TopicPartition(topic, partition, offset)
            for (topic, partition), offset in next_offsets.items()
            if (topic, partition) in self.assigned
        ]
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        return len(offsets)

    def pause(self) -> None:
        """Stop fetching (Redis is down) while staying in the group; idempotent."""
        owned = self._owned()
        if owned:
            self._consumer.pause(owned)
        self.paused = True

    def resume(self) -> None:
        owned = self._owned()
        if owned:
            self._consumer.resume(owned)
        self.paused = False

    def _owned(self) -> list[confluent_kafka.TopicPartition]:
        return [confluent_kafka.TopicPartition(t, p) for t, p in sorted(self.assigned)]

    def lag(self) -> int | None:
        """Messages in the owned partitions not consumed yet, from librdkafka's cached marks."""
        owned = self._owned()
        if not owned:
            return None
        total = 0
        for tp in self._consumer.position(owned):
            _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                total += max(0, high - tp.offset)
        return total

    async def close(self, final_offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit `final_offsets` synchronously (bounded by the session), then leave the group."""
        if self._closed:
            return
        self._closed = True
        offsets = [
            confluent_kafka.TopicPartition(t, p, o)
            for (t, p), o in (final_offsets or {}).items()
            if (t, p) in self.assigned
        ]

        def finish() -> None:
            try:
                if offsets:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
            except confluent_kafka.KafkaException as exc:
                log.warning("tickers.final_commit_failed", reason=str(exc))
            finally:
                self._consumer.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(finish, limiter=self._limiter)


def next_offsets(messages: Iterable[Any], into: dict[TopicPartition, int]) -> None:
    """Record, per partition, the offset after the last message (what a commit stores)."""
    for m in messages:
        key = (m.topic(), m.partition())
        nxt = m.offset() + 1
        if nxt > into.get(key, -1):
            into[key] = nxt


def _names(partitions: Iterable[Any]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions)
