"""The ingest component: WebSocket -> decode + tape + batch -> Kafka, as one supervised unit.

Each connection's task does the whole path for the frames it reads, with no task hop: it takes
every frame trio-websocket has parsed (`source.py`), decodes the chunk, runs it through the shared
tape keeper (`tape.py`: continuity gates, backfill requests; synchronous) and hands the keeper's
output to the sink in batches (`intake.py`: the ordered outbox). The sink is `KafkaSink` (embedded
Kafka: `produce()` directly) or, with the outage spool armed, `SpoolingProducer`, which produces
directly too while its delivery state machine is live and hands batches to its own task only
while spooling or when librdkafka's queue is full. Backpressure: a task whose sink is full waits,
so trio-websocket's bounded queue fills and its reader stops reading the socket.

Beside the connections: the REST backfill worker applies its results through the keeper itself;
a tick task runs the keeper's gap-grace timers every TICK_S (a periodic task, not "whoever comes
first": a tape with a gap and no traffic still gets its timers); the producer or spooling stage
serves delivery reports; the health watch. Order: a keeper call and the append of its output to
the outbox happen without an await in between (trio is single-threaded), so the outbox carries
the tape in keeper order whichever task called; a reconnect notice is taken before the new
socket's first frame, by the same task.

Shutdown (`rt.draining`): the connections stop reading; running backfills get a short grace;
the keeper flushes what it holds (behind gap records); the outbox drains to the sink; the batch
channel closes and the producer flushes (what Kafka cannot take goes to the spool when armed).
`run_ingest` returns once everything accepted was handed to Kafka or the spool (or the flush bound
passed, which is logged with the count).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from marketd.books.board import BookBoard
from marketd.books.intake import DEPTH_KINDS, BookIntake
from marketd.books.keeper import BookKeeper
from marketd.books.writer import run_book_writer
from marketd.errors import KafkaUnavailable
from marketd.ingest.backfill import BackfillResult, run_backfill
from marketd.ingest.batch import Batch
from marketd.ingest.decode import Decoder, Outgoing, Topics
from marketd.ingest.intake import Outbox, Sink, TapeIntake
from marketd.ingest.limits import TokenBucket
from marketd.ingest.produce import KafkaSink, ProduceStats, run_producer
from marketd.ingest.source import ConnectionState, FrameIntake, SourceMetrics, run_connection
from marketd.ingest.spooling import SpoolingProducer, spool_trade_tail
from marketd.ingest.streams import StreamSpec, parse_streams, shard_streams, split_connections
from marketd.ingest.tape import Request, TapeKeeper
from marketd.ingest.watch import BACKFILL, KafkaCheck, RestWatch, watch_ingest
from marketd.kafka.client import consumer_settings, is_embedded, producer_settings
from marketd.kafka.tail import trade_tail
from marketd.logs import get_logger
from marketd.records import AggTradeRecord, KlineRecord, TradeRecord
from marketd.rest.budget import WeightBudget
from marketd.rest.client import BinanceRest
from marketd.runtime import Runtime
from marketd.spool import Spool

log = get_logger(__name__)

# The tape keeper's clock (gap grace timers): one wake-up every TICK_S, nothing per frame.
TICK_S = 0.25
# Reading the trades topic's tail at start-up (to continue the tape) may take this long; past it
# marketd starts without (Kafka down at start: the spool catches what cannot be delivered).
TAIL_READ_TIMEOUT_S = 5.0


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
    deliver: Callable[[BackfillResult], Awaitable[None]],
    scope: trio.CancelScope,
    budget: WeightBudget,
) -> None:
    """The REST backfill worker; it applies its results through the tape keeper itself
    (`TapeIntake.deliver_backfill`). Binance REST's reachability (calls and a periodic ping) is
    reported as the `backfill` entry."""
    cfg = rt.config
    with scope:
        async with requests_rx:
            if not cfg.backfill.enabled:
                await trio.sleep_forever()
            watch = RestWatch(rt)
            try:
                async with _rest(rt, budget) as rest, trio.open_nursery() as nursery:
                    nursery.start_soon(watch.probe_forever, rest.ping)
                    await run_backfill(
                        requests_rx,
                        rest,
                        deliver,
                        give_up_after_s=cfg.backfill.give_up_after_s,
                        concurrency=cfg.backfill.concurrency,
                        metrics=rt.metrics,
                        on_rest=watch.observe,
                    )
                    nursery.cancel_scope.cancel()
            finally:
                rt.health.forget(BACKFILL)


def _rest(rt: Runtime, budget: WeightBudget) -> BinanceRest:
    """A Binance REST client on the process's shared weight budget (backfill, book snapshots)."""
    cfg = rt.config
    return BinanceRest(
        cfg.binance.rest_url, budget, timeout_s=cfg.backfill.request_timeout_s, metrics=rt.metrics
    )


async def _run_books(
    rt: Runtime, books: BookKeeper, board: BookBoard, outbox: Outbox, budget: WeightBudget
) -> None:
    """The order books' own tasks: REST snapshots, periodic book_snapshots and the audit
    (`BookKeeper.run`, through the weight budget shared with backfill), and the Redis writer
    of `book:{SYMBOL}`, which takes the board's conflated views: Redis down is the `books`
    health entry and never slows ingest (docs/books.md)."""
    cfg = rt.config

    async def sink(records: list[Outgoing]) -> None:
        outbox.add(records)
        await outbox.drain()

    async with _rest(rt, budget) as rest, trio.open_nursery() as nursery:
        if rt.redis_url is not None:
            nursery.start_soon(
                functools.partial(run_book_writer, rt, board, redis_depth=cfg.book.redis_depth)
            )
        else:
            log.warning(
                "books.no_redis",
                detail="no Redis resolved for this process: books go to Kafka only",
            )
        await books.run(rest, sink)


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
    # Batches for the producer stage's task: with the spool, only what `offer` could not take
    # (spooling, or librdkafka's queue full); without, nothing (its closing ends the input).
    batches_tx, batches_rx = trio.open_memory_channel[Batch](cfg.ingest.batch_buffer)
    batch_sizes = rt.metrics.fast_histogram(
        "batch_size", "records per produced batch", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
    )
    spooling: SpoolingProducer | None = None
    target: Sink = sink
    if spool is not None:
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
        spooling.connect(batches_tx)
        target = spooling
    outbox = Outbox(target, cfg.batch.size, batch_sizes=batch_sizes)
    tape = TapeIntake(make_decoder(rt), keeper, outbox)
    # One REST weight budget for backfill and book snapshots (Binance counts them together).
    budget = WeightBudget(cfg.backfill.weight_budget_per_min, metrics=rt.metrics)
    board = BookBoard()
    books = (
        BookKeeper.from_config(cfg, specs, board=board, metrics=rt.metrics)
        if any(spec.kind in DEPTH_KINDS for spec in specs)
        else None
    )
    fill = rt.metrics.gauge("channel_fill", "items buffered between stages", ["channel"])
    # "outbox": records through the tape keeper, waiting for the producer (it replaces the
    # frames channel of the former decode stage); "batches": the producer stage's channel.
    fill.labels("outbox").set_function(outbox.__len__)
    fill.labels("batches").set_function(functools.partial(_buffered, batches_tx))

    source_metrics = SourceMetrics.create(rt.metrics)
    attempts = TokenBucket(cfg.binance.connect_attempts_per_5min, 300.0)
    stop_reading = trio.Event()
    links = [ConnectionState() for _ in connections]
    kafka_check = KafkaCheck(sink, rt.kafka_bootstrap, spooling=spool is not None)
    watch_scope = trio.CancelScope()
    tick_scope = trio.CancelScope()
    backfill_scope = trio.CancelScope()
    books_scope = trio.CancelScope()

    async with trio.open_nursery() as nursery:
        if spooling is None:
            await nursery.start(run_producer, batches_rx, sink)
        else:
            await nursery.start(spooling.run, batches_rx)
        nursery.start_soon(_in_scope, tick_scope, functools.partial(tape.run_ticks, TICK_S))
        nursery.start_soon(
            _run_backfill, rt, requests_rx, tape.deliver_backfill, backfill_scope, budget
        )
        if books is not None:
            nursery.start_soon(
                _in_scope,
                books_scope,
                functools.partial(_run_books, rt, books, board, outbox, budget),
            )
        async with trio.open_nursery() as sources:
            for conn_id, streams in enumerate(connections):
                sources.start_soon(
                    functools.partial(
                        run_connection,
                        conn_id,
                        streams,
                        cfg.binance,
                        cfg.rotation,
                        _intake_for(streams, tape, books, outbox, cfg.binance.max_frame_bytes),
                        attempts,
                        source_metrics,
                        stop_reading,
                        links[conn_id],
                        coalesce_s=cfg.ingest.coalesce_ms / 1000,
                    )
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
        # fetching (their results and the keeper's ticks still flow); what is still missing
        # then becomes gap records when the keeper flushes.
        with trio.move_on_after(min(5.0, cfg.shutdown.drain_timeout_s / 3)):
            while keeper.trades.held():  # noqa: ASYNC110 - state of a pure object, no event
                await trio.sleep(0.05)
        backfill_scope.cancel()
        tick_scope.cancel()
        books_scope.cancel()
        tape.flush("shutdown")
        await tape.settle(complete=True)  # everything through the keeper is with the sink now
        await batches_tx.aclose()  # end of input: the producer stage flushes
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


def _intake_for(
    streams: Sequence[StreamSpec],
    tape: TapeIntake,
    books: BookKeeper | None,
    outbox: Outbox,
    max_frame_bytes: int,
) -> FrameIntake:
    """Where a connection's frames go, by the kinds of its streams: the tape (decode -> tape
    keeper -> Kafka), and on connections with depth streams their frames to the book keeper
    first (marketd/books/intake.py), on the same task, into the same outbox."""
    if books is None or not any(s.kind in DEPTH_KINDS for s in streams):
        return tape
    return BookIntake(books, tape, outbox, streams, max_frame_bytes=max_frame_bytes)


async def _in_scope(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()
