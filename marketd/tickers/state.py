"""The ticker consumer's live state and metrics, shared with the API's health endpoint.

One `TickerState` per Runtime (keyed by its MetricsFactory, so a supervisor restart of the consumer
reuses the same metric families instead of registering them twice). The consumer marks it running
while it runs; the API reads lag and last-message age from it, and reports null when the consumer
is not running in this process.
"""

from __future__ import annotations

import weakref

import attrs

from marketd.metrics import FastCounter, FastHistogramCollector, MetricsFactory
from marketd.runtime import Runtime

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@attrs.define
class TickerMetrics:
    consumed: FastCounter  # by topic
    stored: FastCounter  # by symbol
    skipped: FastCounter  # by reason: untracked, watermark, future, older_than_stored, ...
    invalid: FastCounter  # by reason code (also the DLQ reason)
    store_errors: FastCounter  # by kind: Redis refused one command (not an outage)
    dlq: FastCounter  # by outcome: sent, failed
    redis_write: FastHistogramCollector  # seconds per pipeline, thread hop included
    event_to_stored: FastHistogramCollector  # exchange event_time -> written to Redis
    ingested_to_stored: FastHistogramCollector  # our receipt (ingested_at) -> written to Redis
    batch_size: FastHistogramCollector  # messages per consumed batch

    @classmethod
    def create(cls, m: MetricsFactory, state: TickerState) -> TickerMetrics:
        g = m.gauge("tickers_consumer_lag", "raw_tickers messages not yet consumed (assigned)")
        g.set_function(lambda: state.consumer_lag if state.consumer_lag is not None else 0)
        up = m.gauge("tickers_redis_up", "1 while the ticker consumer can write to Redis")
        up.set_function(lambda: 1.0 if state.redis_up else 0.0)
        return cls(
            m.fast_counter("tickers_consumed", "raw_tickers messages consumed", "topic"),
            m.fast_counter("tickers_stored", "ticker hashes written to Redis", "symbol"),
            m.fast_counter("tickers_skipped", "valid tickers not written, per rule", "reason"),
            m.fast_counter("tickers_invalid", "raw_tickers values rejected to the DLQ", "reason"),
            m.fast_counter("tickers_store_errors", "Redis refused a ticker write", "kind"),
            m.fast_counter("tickers_dlq", "ticker dead letters per outcome", "outcome"),
            m.fast_histogram("tickers_redis_write_seconds", "one conditional write pipeline"),
            m.fast_histogram(
                "tickers_event_to_stored_seconds", "exchange event time to readable in Redis"
            ),
            m.fast_histogram(
                "tickers_ingested_to_stored_seconds", "marketd receipt to readable in Redis"
            ),
            m.fast_histogram(
                "tickers_batch_size", "messages per consumed batch", buckets=BATCH_BUCKETS
            ),
        )


@attrs.define(eq=False)
class TickerState:
    running: bool = False
    redis_up: bool = False
    consumer_lag: int | None = None  # None: not known yet (no assignment or no fetch)
    last_message_ms: int | None = None  # wall clock when the consumer last received a message
    # symbol -> newest event_time known to be in Redis (a lower bound: other instances write too).
    stored: dict[str, int] = attrs.field(factory=dict)
    metrics: TickerMetrics | None = None


_STATES: weakref.WeakKeyDictionary[MetricsFactory, TickerState] = weakref.WeakKeyDictionary()


def attach(rt: Runtime) -> tuple[TickerState, TickerMetrics]:
    """The state of this runtime's ticker consumer, created (with its metrics) on first use."""
    state = _STATES.get(rt.metrics)
    if state is None:
        state = _STATES[rt.metrics] = TickerState()
    if state.metrics is None:
        state.metrics = TickerMetrics.create(rt.metrics, state)
    return state, state.metrics


def running_state(rt: Runtime) -> TickerState | None:
    """The consumer's state if it is running in this process, else None."""
    state = _STATES.get(rt.metrics)
    return state if state is not None and state.running else None
