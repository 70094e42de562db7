"""Binance stream names: the grammar lives in `marketd.streams` (the configuration validates
`binance.streams` with it and must not import the ingest package); re-exported here for ingest."""

from marketd.streams import (
    KLINE_INTERVALS,
    MAX_STREAMS_PER_CONNECTION,
    ROLLING_WINDOWS,
    ROUTED_KINDS,
    Shard,
    StreamKind,
    StreamSpec,
    interval_ms,
    parse_stream,
    parse_streams,
    shard_streams,
    split_connections,
)

__all__ = [
    "KLINE_INTERVALS",
    "MAX_STREAMS_PER_CONNECTION",
    "ROLLING_WINDOWS",
    "ROUTED_KINDS",
    "Shard",
    "StreamKind",
    "StreamSpec",
    "interval_ms",
    "parse_stream",
    "parse_streams",
    "shard_streams",
    "split_connections",
]
