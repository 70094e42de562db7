"""The ingest component: WebSocket connections -> decode + batch -> Kafka, as one supervised unit.

Stages are started downstream-first (producer, decoder, then the connections), joined by bounded
channels. The decode stage also cuts its output into the producer's batches (no batcher task in
between: one wake-up less per chunk); without a spool it also hands them to librdkafka itself
(no task hop per batch), and the producer stage only serves delivery reports and flushes at the
end. Shutdown is by closing channels: on `rt.draining` the
connections stop reading and close their channel clones; the decoder and the producer drain in
turn; the producer flushes. `run_ingest` returns once everything accepted was handed to Kafka,
or to the on-disk spool when Kafka could not take it (or the flush bound passed, which is logged
with the count).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from marketd.errors import KafkaUnavailable
from marketd.ingest.backfill import BackfillResult, run_backfill
from marketd.ingest.batch import Batch, split_batches
from marketd.ingest.decode import Decoder, Frame, Outgoing, Topics
from marketd.ingest.limits import TokenBucket
from marketd.ingest.produce import KafkaSink, ProduceStats, run_producer
from marketd.ingest.source import ConnectionState, SourceMetrics, run_connection
from marketd.ingest.spooling import SpoolingProducer, spool_trade_tail
from marketd.ingest.streams import StreamSpec, parse_streams, shard_streams, split_connections
from marketd.ingest.tape import Reconnected, Request, TapeKeeper
from marketd.ingest.watch import BACKFILL, KafkaCheck, RestWatch, watch_ingest
from marketd.kafka.client import consumer_settings, is_embedded, producer_settings
from marketd.kafka.tail import trade_tail
from marketd.logs import get_logger
from marketd.metrics import FastHistogramCollector
from marketd.records import AggTradeRecord, KlineRecord, TradeRecord
from marketd.rest.budget import WeightBudget
from marketd.rest.client import BinanceRest
from marketd.runtime import Runtime
from marketd.spool import Spool

log = get_logger(__name__)

# How many frames the decoder takes in one go before handing its batches on (bounds latency).
DECODE_CHUNK = 4096
# Coalesce when a wake-up found this many frames waiting. Measured with bench/ingest.py against
# the fake exchange: 2 -> 32k frames/s at max rate and keeps up at 10k/s; 16 -> 13.5k frames/s
# and falls behind at 10k/s (a frame handled alone costs every stage a wake-up and the scheduler
# an epoll round: ~110 us of CPU per frame instead of ~33 us).
COALESCE_WHEN_BACKLOG = 2
# Reading the trades topic's tail at start-up (to continue the tape) may take this long; past it
# marketd starts without (Kafka down at start: the spool catches what cannot be delivered).
TAIL_READ_TIMEOUT_S = 5.0


Inbound = Frame | Reconnected | BackfillResult


async def run_decoder(
    frames_rx: trio.MemoryReceiveChannel[Inbound],
    batches_tx: trio.MemorySendChannel[Batch],
    decoder: Decoder,
    keeper: TapeKeeper,
    *,
    batch_size: int = 100,
    batch_sizes: FastHistogramCollector | None = None,
    produce: Callable[[Batch], Awaitable[object]] | None = None,
    coalesce_s: float = 0.001,
    tick_s: float = 0.25,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Decode frames in chunks, keep the tape in order, hand batches of at most `batch_size`
    records to the producer.

    Everything a wake-up produced goes out at its end, cut into batches (split_batches): nothing
    is held back waiting for more, so a batch's age is bounded by one wake-up (within the
    `batch.timeout_ms` bound) and an idle pipeline adds no latency. A full batch channel blocks
    the decoder, which then stops taking frames: backpressure reaches the WebSocket readers.
    With `produce` (no spool: KafkaSink.produce_batch) the stage hands each batch to librdkafka
    itself, without a task hop (produce() is non-blocking on the trio thread; a full local
    queue makes `produce` wait, which is the same backpressure); `batches_tx` then only
    signals the end of input to the producer stage, which flushes.

    Adaptive coalescing: when the previous wake-up found a backlog (COALESCE_WHEN_BACKLOG frames
    or more: frames arrive faster than they are handled one by one), wait `coalesce_s` before
    draining, so the decoder and the producer each wake once per chunk instead of once per
    frame (measured here: 21k -> 36k frames/s on one core). A stream the decoder keeps
    up with is never delayed.
    Reconnect notices and backfill results arrive on the same channel, in order with the frames.
    At end of input the keeper releases whatever it still holds (behind gap records).
    """
    decode = decoder.decode
    sizes = batch_sizes.labels() if batch_sizes is not None else None
    hand_over = batches_tx.send if produce is None else produce

    async def emit(records: list[Outgoing]) -> None:
        for batch in split_batches(records, batch_size):
            if sizes is not None:
                sizes.observe(len(batch))
            await hand_over(batch)

    busy = False
    next_tick = trio.current_time() + tick_s
    async with frames_rx, batches_tx:
        task_status.started()
        while True:
            received = False
            with trio.move_on_at(next_tick):
                try:
                    item = await frames_rx.receive()
                    received = True
                except trio.EndOfChannel:
                    break
            now = trio.current_time()
            decoded: list[Outgoing] = []  # decoded, not yet through the keeper
            chunk: list[Outgoing] = []  # in tape order, ready for the producer
            ended = False
            taken = 0
            if now >= next_tick:
                chunk += keeper.tick(now)
                next_tick = now + tick_s
            # Not `else`: a receive that completed can still return after the deadline (the
            # decoder was handed the item, then waited a scheduler round), and the item must
            # not be dropped: a lost backfill page becomes a not_on_rest gap in the tape.
            if received:
                _take(item, decode, decoded, chunk, keeper, now)
                taken = 1
                if busy and coalesce_s > 0:
                    await trio.sleep(coalesce_s)
                for _ in range(DECODE_CHUNK - 1):
                    try:
                        item = frames_rx.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        ended = True
                        break
                    _take(item, decode, decoded, chunk, keeper, now)
                    taken += 1
            busy = taken >= COALESCE_WHEN_BACKLOG
            if decoded:
                chunk += keeper.admit(decoded, now)
            if chunk:
                await emit(chunk)
            if ended:
                break
        await emit(keeper.flush("shutdown"))


def _take(
    item: Inbound,
    decode: Callable[[Frame, list[Outgoing]], None],
    decoded: list[Outgoing],
    chunk: list[Outgoing],
    keeper: TapeKeeper,
    now: float,
) -> None:
    if isinstance(item, Frame):
        decode(item, decoded)
        return
    # Records decoded so far came first: take them through the keeper before the notice.
    chunk += keeper.admit(decoded, now)
    decoded.clear()
    if isinstance(item, Reconnected):
        keeper.on_reconnect(item)
    else:
        chunk += keeper.on_backfill(item, now)


def make_decoder(rt: Runtime) -> Decoder:
    cfg = rt.config
    m = rt.metrics
    topics = Topics(
        cfg.topics.raw_trades,
        cfg.topics.raw_klines,
        cfg.topics.raw_tickers,
        cfg.topics.dlq,
        {k: cfg.route_for(k) for k in cfg.routes},
    )
    return Decoder(
        topics,
        max_frame_bytes=cfg.binance.max_frame_bytes,
        dlq_max_raw_bytes=cfg.dlq.max_raw_bytes,
        time_unit=cfg.binance.time_unit,
        records_total=m.fast_counter("decode_records", "records decoded per kind", "kind"),
        rejected_total=m.fast_counter("decode_rejected", "frames rejected per reason", "reason"),
        control_total=m.fast_counter("ws_control_frames", "control replies and errors", "kind"),
        frames_by_stream=m.fast_counter(
            "ws_stream_frames",
            'combined-stream frames received per configured stream (any other: stream="other")',
            "stream",
        ),
        streams=[spec.name for spec in parse_streams(cfg.binance.streams)],
        max_future_ms=cfg.ingest.max_future_ms,
    )


def _requester(requests_tx: trio.MemorySendChannel[Request]) -> Callable[[Request], bool]:
    def request(req: Request) -> bool:
        try:
            requests_tx.send_nowait(req)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    return request


async def _run_backfill(
    rt: Runtime,
    requests_rx: trio.MemoryReceiveChannel[Request],
    results_tx: trio.MemorySendChannel[Inbound],
    scope: trio.CancelScope,
) -> None:
    """The REST backfill worker; its results go back to the decoder in frame order. Binance
    REST's reachability (calls and a periodic ping) is reported as the `backfill` entry."""
    cfg = rt.config
    with scope:
        async with results_tx, requests_rx:
            if not cfg.backfill.enabled:
                await trio.sleep_forever()
            watch = RestWatch(rt)
            budget = WeightBudget(cfg.backfill.weight_budget_per_min, metrics=rt.metrics)
            try:
                async with (
                    BinanceRest(
                        cfg.binance.rest_url,
                        budget,
                        timeout_s=cfg.backfill.request_timeout_s,
                        metrics=rt.metrics,
                    ) as rest,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(watch.probe_forever, rest.ping)
                    await run_backfill(
                        requests_rx,
                        rest,
                        results_tx.send,
                        give_up_after_s=cfg.backfill.give_up_after_s,
                        concurrency=cfg.backfill.concurrency,
                        metrics=rt.metrics,
                        on_rest=watch.observe,
                    )
                    nursery.cancel_scope.cancel()
            finally:
                rt.health.forget(BACKFILL)


def _buffered(channel: trio.MemorySendChannel[Any]) -> int:
    return channel.statistics().current_buffer_used


async def _read_trade_tail(rt: Runtime, timeout_s: float = 15.0) -> dict[str, int]:
    settings = consumer_settings(rt.config.kafka, rt.kafka_bootstrap, "marketd-tail")
    return await trio.to_thread.run_sync(
        functools.partial(trade_tail, settings, rt.config.topics.raw_trades, timeout_s=timeout_s),
        abandon_on_cancel=True,
    )


async def _topic_tail(rt: Runtime) -> dict[str, int] | None:
    """The trades topic's last id per symbol at start-up; None when not wanted or not readable
    (the spooling stage then reads it itself if a crashed run's spool needs it)."""
    cfg = rt.config
    if not (
        cfg.backfill.enabled
        and cfg.backfill.resume_from_topic
        and not is_embedded(cfg.kafka.bootstrap_servers)
    ):
        return None
    try:
        with trio.fail_after(TAIL_READ_TIMEOUT_S + 1):
            return await _read_trade_tail(rt, timeout_s=TAIL_READ_TIMEOUT_S)
    except (KafkaUnavailable, trio.TooSlowError) as exc:
        log.warning(
            "ingest.tape_tail_unavailable",
            topic=cfg.topics.raw_trades,
            error=str(exc) or type(exc).__name__,
            detail="starting each symbol's tape afresh: trades missed while down stay a gap",
        )
        return None


async def _published_trade_ids(
    rt: Runtime, spool: Spool | None, topic_tail: dict[str, int] | None
) -> dict[str, int]:
    """Per symbol the last trade id already published: the topic's tail and the spool's."""
    last = dict(topic_tail or {})
    if spool is not None and spool.pending:
        spooled = await trio.to_thread.run_sync(
            spool_trade_tail, spool, rt.config.topics.raw_trades
        )
        for symbol, trade_id in spooled.items():
            last[symbol] = max(trade_id, last.get(symbol, -1))
    return last


async def _open_spool(rt: Runtime) -> Spool | None:
    """The Kafka-outage spool, recovered from disk; None when disabled or Kafka is embedded (the
    in-process mock cluster lives and dies with us: there is no outage to outlast)."""
    cfg = rt.config
    if not cfg.spool.enabled or is_embedded(cfg.kafka.bootstrap_servers):
        return None
    spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes, metrics=rt.metrics)
    await trio.to_thread.run_sync(spool.open)
    return spool


async def run_ingest(
    rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    cfg = rt.config
    specs = shard_streams(parse_streams(cfg.binance.streams), cfg.shard)
    connections = split_connections(specs, cfg.binance.max_streams_per_connection)
    if not connections:
        log.warning(
            "ingest.no_streams",
            shard=str(cfg.shard),
            detail="this shard owns none of the configured streams",
        )
    # Started now: what follows may wait on Kafka (the topic's tail), which is health, not start.
    rt.health.set("ingest", started=True, healthy=False, reason="starting")
    task_status.started()
    spool = await _open_spool(rt)
    sink = KafkaSink(
        producer_settings(cfg.kafka, rt.kafka_bootstrap),
        dlq_topic=cfg.topics.dlq,
        stats=ProduceStats.create(rt.metrics),
        flush_timeout_s=cfg.kafka.flush_timeout_s,
        dlq_max_raw_bytes=cfg.dlq.max_raw_bytes,
    )
    try:
        await _run_ingest(rt, connections, specs, spool, sink)
    finally:
        # Also after a failure: a restarted component must not leave a producer behind that
        # keeps its connections and retries.
        sink.close()
        if spool is not None:
            spool.close()


async def _run_ingest(
    rt: Runtime,
    connections: list[tuple[StreamSpec, ...]],
    specs: tuple[StreamSpec, ...],
    spool: Spool | None,
    sink: KafkaSink,
) -> None:
    cfg = rt.config
    stats = sink.stats
    frames_tx, frames_rx = trio.open_memory_channel[Inbound](cfg.ingest.frame_buffer)
    # Backfill requests from the keeper; bounded: a full queue records the range as a gap.
    requests_tx, requests_rx = trio.open_memory_channel[Request](1024)
    keeper = TapeKeeper(
        gaps_topic=cfg.topics.gaps,
        backfill_topics={
            TradeRecord: cfg.topics.raw_trades,
            KlineRecord: cfg.topics.raw_klines,
            AggTradeRecord: cfg.route_for("aggTrade"),
        },
        request=_requester(requests_tx) if cfg.backfill.enabled else lambda _r: False,
        gap_grace_s=cfg.backfill.gap_grace_s,
        max_held=cfg.backfill.max_held_per_symbol,
        metrics=rt.metrics,
        dlq_topic=cfg.topics.dlq,
        dlq_max_raw_bytes=cfg.dlq.max_raw_bytes,
    )
    rt.health.set(
        "ingest",
        started=True,
        healthy=False,
        reason=f"starting: reading the trades topic's tail from kafka at {rt.kafka_bootstrap}",
    )
    topic_tail = await _topic_tail(rt)
    seeds = await _published_trade_ids(rt, spool, topic_tail)
    if seeds:
        # The gate continues each symbol's tape from the last id published before this process
        # (the topic's tail, or the spool of a crashed run, which goes out first): what the
        # exchange traded while marketd was down is backfilled as a "restart" gap.
        keeper.seed_trades(seeds)
        log.info("ingest.resumed_tape", symbols=len(seeds))
    batches_tx, batches_rx = trio.open_memory_channel[Batch](cfg.ingest.batch_buffer)
    fill = rt.metrics.gauge("channel_fill", "items buffered between stages", ["channel"])
    channels: tuple[tuple[str, trio.MemorySendChannel[Any]], ...] = (
        ("frames", frames_tx),
        ("batches", batches_tx),
    )
    for name, ch in channels:
        fill.labels(name).set_function(functools.partial(_buffered, ch))
    batch_sizes = rt.metrics.fast_histogram(
        "batch_size", "records per produced batch", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
    )

    source_metrics = SourceMetrics.create(rt.metrics)
    attempts = TokenBucket(cfg.binance.connect_attempts_per_5min, 300.0)
    stop_reading = trio.Event()
    links = [ConnectionState() for _ in connections]
    kafka_check = KafkaCheck(sink, rt.kafka_bootstrap, spooling=spool is not None)
    watch_scope = trio.CancelScope()

    async with trio.open_nursery() as nursery:
        if spool is None:
            await nursery.start(run_producer, batches_rx, sink)
        else:
            spooling = SpoolingProducer(
                sink,
                spool,
                cfg.spool,
                trades_topic=cfg.topics.raw_trades,
                topic_tail=topic_tail,
                read_tail=functools.partial(_read_trade_tail, rt),
                replay_deadline_s=cfg.kafka.flush_timeout_s,
                metrics=rt.metrics,
            )
            await nursery.start(spooling.run, batches_rx)
        await nursery.start(
            functools.partial(
                run_decoder,
                batch_size=cfg.batch.size,
                batch_sizes=batch_sizes,
                # Without a spool the decoder produces itself (no task hop per batch); the
                # spooling stage keeps its channel: it decides per batch between Kafka and disk.
                produce=sink.produce_batch if spool is None else None,
                coalesce_s=cfg.ingest.coalesce_ms / 1000,
            ),
            frames_rx,
            batches_tx,
            make_decoder(rt),
            keeper,
        )
        backfill_scope = trio.CancelScope()
        nursery.start_soon(_run_backfill, rt, requests_rx, frames_tx.clone(), backfill_scope)
        async with frames_tx, trio.open_nursery() as sources:
            for conn_id, streams in enumerate(connections):
                sources.start_soon(
                    run_connection,
                    conn_id,
                    streams,
                    cfg.binance,
                    cfg.rotation,
                    frames_tx.clone(),
                    attempts,
                    source_metrics,
                    stop_reading,
                    links[conn_id],
                )
            nursery.start_soon(
                _in_scope,
                watch_scope,
                functools.partial(
                    watch_ingest,
                    rt,
                    links,
                    kafka_check,
                    f"{len(specs)} streams on {len(connections)} connections delivering to kafka",
                ),
            )
            log.info(
                "ingest.started",
                streams=len(specs),
                connections=len(connections),
                shard=str(cfg.shard),
                kafka=rt.kafka_bootstrap,
            )
            await rt.draining.wait()
            log.info("ingest.draining", detail="stopped reading; flushing what was accepted")
            watch_scope.cancel()
            rt.health.set("ingest", healthy=False, reason="draining")
            stop_reading.set()
        # Sources are done. Running backfills get a short grace to repair what they are
        # fetching; what is still missing then becomes gap records when the keeper flushes.
        with trio.move_on_after(min(5.0, cfg.shutdown.drain_timeout_s / 3)):
            while keeper.trades.held():  # noqa: ASYNC110 - state of a pure object, no event
                await trio.sleep(0.05)
        backfill_scope.cancel()
    summary = stats.summary()
    latency = stats.latency.labels()
    log.info(
        "ingest.stopped",
        **{t: f"{c['accepted']}/{c['delivered']}/{c['failed']}" for t, c in summary.items()},
        legend="accepted/delivered/failed",
        ack_latency_p50_ms=round(latency.quantile(0.5) * 1000, 3),
        ack_latency_p99_ms=round(latency.quantile(0.99) * 1000, 3),
        acked=latency.count,
    )
    rt.health.set("ingest", healthy=False, reason="stopped")


async def _in_scope(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()
