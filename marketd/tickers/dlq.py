"""Dead letters of the ticker consumer: invalid raw_tickers values to the DLQ topic.

Receives the rejected Kafka message and its reason code; emits a DlqRecord (marketd/records.py)
keyed like the original. produce()/poll(0) run on the trio thread (non-blocking); `flush()` runs
in a thread and is awaited before the offsets of a batch with dead letters are committed, so a
committed invalid record is in the DLQ (or its failure logged). Closing flushes what is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import confluent_kafka
import msgspec
import trio

from marketd.ingest.decode import dlq_record
from marketd.logs import Throttle, get_logger
from marketd.metrics import FastCounter

log = get_logger(__name__)
_encode = msgspec.json.Encoder().encode


class DeadLetters:
    def __init__(
        self,
        settings: dict[str, Any],
        topic: str,
        *,
        outcomes: FastCounter,
        max_raw_bytes: int = 8192,
        flush_timeout_s: float = 5.0,
        producer_factory: Callable[[dict[str, Any]], Any] = confluent_kafka.Producer,
    ) -> None:
        self.topic = topic
        self.max_raw_bytes = max_raw_bytes
        self.flush_timeout_s = flush_timeout_s
        self._outcomes = outcomes
        self._producer = producer_factory({**settings, "client.id": "marketd-tickers-dlq"})
        self._throttle = Throttle(60.0)
        self._limiter = trio.CapacityLimiter(1)
        self.unflushed = 0

    def send(self, msg: Any, reason: str, detail: str) -> None:
        """Queue one dead letter; never raises (a DLQ failure is logged and counted)."""
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        record = dlq_record(
            msg.value() or b"",
            reason,
            f"{where}: {detail}",
            None,
            int(time.time() * 1000),
            self.max_raw_bytes,
        )
        try:
            try:
                self._producer.produce(
                    self.topic, _encode(record), msg.key(), on_delivery=self._on_delivery
                )
            except BufferError:
                # Local queue full: serve delivery reports once and try again; the batch is
                # flushed before commit anyway, so this only happens with Kafka far behind.
                self._producer.poll(0)
                self._producer.produce(
                    self.topic, _encode(record), msg.key(), on_delivery=self._on_delivery
                )
        except (BufferError, confluent_kafka.KafkaException) as exc:
            self._failed(f"produce: {exc}")
            return
        self.unflushed += 1

    def _on_delivery(self, err: confluent_kafka.KafkaError | None, _msg: Any) -> None:
        if err is None:
            self._outcomes.inc("sent")
        else:
            self._failed(err.str())

    def _failed(self, reason: str) -> None:
        self._outcomes.inc("failed")
        if self._throttle.should_log(reason, time.monotonic()) is not None:
            log.error("tickers.dlq_failed", topic=self.topic, reason=reason)

    async def flush(self) -> None:
        """Wait (bounded) until every queued dead letter was acknowledged or failed."""
        if not self.unflushed:
            self._producer.poll(0)
            return
        remaining: int = await trio.to_thread.run_sync(
            self._producer.flush, self.flush_timeout_s, limiter=self._limiter
        )
        self.unflushed = 0
        if remaining:
            self._failed(f"{remaining} dead letters unacknowledged after {self.flush_timeout_s}s")

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.flush()
