"""Typed configuration: defaults < marketd.toml < .env < environment < CLI flags.

Every setting is declared once, as an attrs field carrying its environment variable, its help text,
its converter (from a TOML value or an environment string; by default the one for its type) and its
check. `load_config` merges the layers without knowing any particular key, remembers where each
value came from (for `marketd config show` and for error messages) and structures the result with
cattrs. A bad value raises ConfigError: one line naming the key, its source (file:line or the
variable), the value (truncated) and what is allowed.

Importing this module imports no component (ingest, tickers, api, kafka): the stream-name grammar it
checks `binance.streams` with lives in the pure `marketd.streams`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints
from urllib.parse import urlsplit, urlunsplit

import attrs
import cattrs

from marketd.errors import ConfigError, StreamNameError
from marketd.streams import ROUTED_KINDS, Shard, StreamKind, parse_streams

T = TypeVar("T")

# -- setting declarations -------------------------------------------------------------------------

_META = "marketd"

Converter = Callable[[Any, bool], Any]  # (raw value, came as text?) -> typed value, or ValueError
Merge = Literal["replace", "over_layers", "over_default"]


@attrs.frozen
class _Meta:
    env: str | None
    help: str
    check: Callable[[Any], Any] | None
    secret: bool
    convert: Converter | None  # None: the converter of the field's type (_BY_TYPE)
    merge: Merge  # tables: key by key over earlier layers ("over_layers") or over the default too
    echo: bool  # whether an error line repeats the value (False when the check names the culprit)
    deprecated: str | None  # accepted but ignored: why (logged once as config.deprecated if set)


def setting(
    default: Any,
    *,
    env: str | None = None,
    help: str = "",
    check: Callable[[Any], Any] | None = None,
    secret: bool = False,
    convert: Converter | None = None,
    merge: Merge = "replace",
    echo: bool = True,
    deprecated: str | None = None,
) -> Any:
    """Declare one setting: its default, env var, help line, converter and check.

    `check` gets the converted value and raises ValueError saying what is allowed.
    `deprecated`: the setting no longer does anything and says why; old configs that set it
    still load (`LoadedConfig.deprecated()` lists where it was set, for one warning).
    """
    meta = {_META: _Meta(env, help, check, secret, convert, merge, echo, deprecated)}
    if isinstance(default, dict):
        # A fresh copy per instance: a mutable default must never be shared.
        return attrs.field(factory=functools.partial(dict, default), metadata=meta)
    if isinstance(default, list | tuple):
        return attrs.field(default=tuple(default), metadata=meta)
    return attrs.field(default=default, metadata=meta)


def shorten(value: Any, limit: int = 80) -> str:
    """repr() of a value for an error line, cut to about `limit` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str | bytes):
        return f"{text[: limit - 3]}... ({len(value):,} characters)"
    if isinstance(value, list | tuple | dict):
        return f"{text[: limit - 3]}... ({len(value):,} items)"
    return f"{text[: limit - 3]}..."


# -- converters: raw TOML values or environment strings -> typed values ---------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_TEXT = 4096  # characters of one string setting (URLs, DSNs, hosts, names)
MAX_TABLE_VALUE = 65_536  # one librdkafka passthrough property (a PEM certificate chain fits)


def _to_bool(value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def _to_int(value: Any, from_text: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if from_text and isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,30}\s*", value):
        return int(value)
    raise ValueError("must be an integer")


def _to_float(value: Any, from_text: bool) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif from_text and isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ValueError("must be a number")
    if not math.isfinite(number):
        raise ValueError("must be a finite number (not nan or inf)")
    return number


def _to_str(value: Any, from_text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"must be at most {MAX_TEXT} characters")
    return value


def _to_str_or_int(value: Any, from_text: bool) -> str:
    """A string that TOML users may write as a bare integer (`acks = 1` means "1")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _to_str(value, from_text)


def _to_str_list(value: Any, from_text: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError("must be a list of strings (comma-separated in an env var)")
    for item in items:
        if len(item) > MAX_TEXT:
            raise ValueError(f"{shorten(item)}: an item must be at most {MAX_TEXT} characters")
    return tuple(v for v in items if v)


def _to_upper_list(value: Any, from_text: bool) -> tuple[str, ...]:
    return tuple(v.upper() for v in _to_str_list(value, from_text))


def _to_number_table(value: Any, from_text: bool) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    out: dict[str, float] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{shorten(k)}: must be a number")
        if not math.isfinite(v):
            raise ValueError(f"{shorten(k)}: must be a finite number (not nan or inf)")
        out[k] = float(v)
    return out


def _to_text_table(value: Any, from_text: bool) -> dict[str, str]:
    """librdkafka properties are strings; TOML scalars are accepted for convenience."""
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, dict | list):
            raise ValueError(f"{shorten(k)}: must be a scalar")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if len(text) > MAX_TABLE_VALUE:
            raise ValueError(f"{shorten(k)}: must be at most {MAX_TABLE_VALUE} characters")
        out[k] = text
    return out


# The converter of each declared type; a field may name its own with `convert=`.
_BY_TYPE: dict[Any, Converter] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    tuple[str, ...]: _to_str_list,
    dict[str, float]: _to_number_table,
    dict[str, str]: _to_text_table,
}


# -- checks: a converted value -> itself, or ValueError saying what is allowed ---------------------


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@attrs.frozen
class Range:
    """`low <= value <= high` (or `low < value` when `low_open`): every number has both bounds."""

    low: float
    high: float
    low_open: bool = False

    def __call__(self, value: Any) -> Any:
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            raise ValueError(self.allowed())
        return value

    def allowed(self) -> str:
        low = f"> {_number(self.low)}" if self.low_open else f">= {_number(self.low)}"
        return f"must be {low} and <= {_number(self.high)}"


def _positive(high: float) -> Range:
    return Range(0, high, low_open=True)


@attrs.frozen
class EachValue:
    """A Range for every value of a number table."""

    range: Range

    def __call__(self, value: Any) -> Any:
        for k, v in value.items():
            try:
                self.range(v)
            except ValueError as exc:
                raise ValueError(f"{shorten(k)}: {exc}") from None
        return value


def _one_of(*allowed: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return check


MINUTE_S = 60.0
HOUR_S = 3600.0
DAY_S = 86_400.0
DAY_MS = 86_400_000
MAX_STREAMS = 65_536  # 64 connections of Binance's 1024 streams
_STREAM_SYMBOL_RE = re.compile(r"[A-Z0-9]{2,30}")


def _check_streams(value: Any) -> Any:
    if len(value) > MAX_STREAMS:
        raise ValueError(f"{len(value):,} streams: at most {MAX_STREAMS:,}")
    for name in value:
        if len(name) > 100:
            raise ValueError(f"{shorten(name)}: not a stream name (at most 100 characters)")
    try:
        specs = parse_streams(value)
    except StreamNameError as exc:
        raise ValueError(str(exc)) from None
    diff_depth: dict[str, str] = {}
    for spec in specs:
        if spec.kind is StreamKind.DEPTH and spec.symbol is not None:
            # One local book per symbol follows one diff stream: the 1000 ms events merge the
            # 100 ms ones, so the two streams do not continue each other (docs/books.md §1.1).
            if spec.symbol in diff_depth:
                raise ValueError(
                    f"{diff_depth[spec.symbol]!r} and {spec.name!r}: one diff depth stream per "
                    "symbol (@depth or @depth@100ms, not both)"
                )
            diff_depth[spec.symbol] = spec.name
        # Binance lists a few non-ASCII symbols, but nothing downstream (tickers.symbols, the
        # Redis keys, the API's symbol routes) takes them: refuse them here, as upper case is.
        if spec.symbol is not None and not _STREAM_SYMBOL_RE.fullmatch(spec.symbol):
            raise ValueError(
                f"{shorten(spec.name)}: symbols in stream names are ASCII lower-case letters "
                "and digits, 2 to 30 characters"
            )
    return value


def _url_parts(value: str, allowed: str) -> Any:
    """urlsplit, with a bad port (`:99999`, `:x`) refused here rather than by a client later."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- parses (and range-checks) the port
    except ValueError as exc:
        raise ValueError(f"{exc}; {allowed}") from None
    return parts


def _check_ws_url(value: Any) -> Any:
    allowed = "must be a ws:// or wss:// URL, e.g. wss://stream.binance.com:9443/stream"
    parts = _url_parts(value, allowed)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(allowed)
    return value


def _check_http_url(value: Any) -> Any:
    allowed = "must be an http:// or https:// URL"
    parts = _url_parts(value, allowed)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(allowed)
    return value


def _check_redis_url(value: Any) -> Any:
    if value == "embedded":
        return value
    allowed = "must be 'embedded' or a redis://, rediss:// or unix:// URL"
    if _url_parts(value, allowed).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(allowed)
    return value


def _check_symbols(value: Any) -> Any:
    for symbol in value:
        if not re.fullmatch(r"[A-Z0-9]{2,30}", symbol):
            raise ValueError(f"{shorten(symbol)} is not a symbol (A-Z, 0-9, 2 to 30 characters)")
    return value


def _check_shard(value: Any) -> Any:
    Shard.parse(value)
    return value


def _check_bootstrap(value: Any) -> Any:
    if not value.strip():
        raise ValueError("must be 'embedded' or host:port[,host:port...]")
    return value


def _check_host(value: Any) -> Any:
    # A name (at most 253 characters, RFC 1035) or an address; resolving it is the API's job.
    if not value or len(value) > 253 or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must be a host name or an IP address, e.g. 127.0.0.1 or 0.0.0.0")
    return value


def _check_routes(value: Any) -> Any:
    known = {k.value for k in ROUTED_KINDS}
    for kind, topic in value.items():
        if kind not in known:
            raise ValueError(
                f"unknown stream kind {shorten(kind)}; routable kinds: {', '.join(sorted(known))}"
            )
        _check_topic(topic)
    return value


def _check_topic(value: Any) -> Any:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", value):
        raise ValueError("must be a Kafka topic name (A-Z a-z 0-9 . _ -, at most 249 characters)")
    return value


def _check_group(value: Any) -> Any:
    # librdkafka aborts the whole process (an assertion in the client) on an empty group.id.
    if not value.strip():
        raise ValueError("must be a non-empty Kafka consumer group id")
    return value


DEFAULT_STREAMS = (
    "btcusdt@trade", "ethusdt@trade", "bnbusdt@trade",
    "btcusdt@kline_1m", "ethusdt@kline_1m", "btcusdt@ticker",
)  # fmt: skip
DEFAULT_TICKER_SYMBOLS = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "DOTUSDT", "MATICUSDT", "LINKUSDT", "LTCUSDT", "UNIUSDT", "ATOMUSDT", "SHIBUSDT",
)  # fmt: skip
DEFAULT_ROUTES = {
    "aggTrade": "raw_agg_trades",
    "bookTicker": "raw_book_tickers",
    "miniTicker": "raw_mini_tickers",
    "rollingTicker": "raw_rolling_tickers",
    "avgPrice": "raw_avg_prices",
    "referencePrice": "raw_reference_prices",
    "blockTrade": "raw_block_trades",
}
COMPONENTS = ("ingest", "tickers", "api")

# -- the configuration tree -----------------------------------------------------------------------


@attrs.frozen
class BinanceConfig:
    ws_url: str = setting(
        "wss://stream.binance.com:9443/stream",
        env="BINANCE_WS_URL",
        check=_check_ws_url,
        help="WebSocket endpoint for combined streams (/stream)",
    )
    streams: tuple[str, ...] = setting(
        DEFAULT_STREAMS,
        env="BINANCE_STREAMS",
        check=_check_streams,
        echo=False,
        help="streams to ingest (comma-separated in the env var)",
    )
    rest_url: str = setting(
        "https://api.binance.com",
        env="BINANCE_REST_URL",
        check=_check_http_url,
        help="REST base URL for backfill",
    )
    ping_interval_s: float = setting(
        180.0,
        env="PING_INTERVAL_SECONDS",
        check=_positive(HOUR_S),
        help="our keepalive ping interval",
    )
    pong_timeout_s: float = setting(
        20.0,
        check=_positive(10 * MINUTE_S),
        help="a ping unanswered this long marks the connection dead",
    )
    reconnect_max_delay_s: float = setting(
        60.0,
        env="RECONNECT_MAX_DELAY_SECONDS",
        check=_positive(HOUR_S),
        help="cap of the reconnect backoff",
    )
    reconnect_initial_delay_s: float = setting(
        0.5, check=_positive(HOUR_S), help="first reconnect delay"
    )
    healthy_after_s: float = setting(
        60.0,
        check=_positive(DAY_S),
        help="a connection up this long resets the reconnect backoff",
    )
    connection_timeout_s: float = setting(
        10.0,
        env="WS_CONNECTION_TIMEOUT",
        check=_positive(10 * MINUTE_S),
        help="connect + handshake timeout",
    )
    max_frame_bytes: int = setting(
        1_048_576,
        env="BINANCE_MAX_FRAME_BYTES",
        check=Range(1024, 64 << 20),
        help="largest frame accepted; larger ones are dead-lettered (truncated)",
    )
    max_streams_per_connection: int = setting(
        1024,
        check=Range(1, 1024),
        help="streams per connection (Binance allows 1024)",
    )
    silence_timeout_s: dict[str, float] = setting(
        {
            "kline": 30.0,
            "ticker": 30.0,
            "miniTicker": 30.0,
            "rollingTicker": 30.0,
            "avgPrice": 30.0,
            "bookTicker": 300.0,
            "trade": 0.0,
            "aggTrade": 0.0,
            "depth": 0.0,  # a diff event only when the book changed: a quiet book is silent
            "depthPartial": 30.0,  # sent every 1000 ms (or 100 ms) whatever happens
        },
        check=EachValue(Range(0, DAY_S)),
        merge="over_default",
        help="per stream kind: no data for this long marks a connection dead (0 = quiet is normal)",
    )
    subscribe_rate_per_s: float = setting(
        4.0,
        check=_positive(1000),
        help="control messages per second per connection (Binance: 5)",
    )
    connect_attempts_per_5min: int = setting(
        250,
        check=Range(1, 1_000_000),
        help="connection attempts per 5 minutes per IP (Binance: 300)",
    )
    backpressure_close_s: float = setting(
        40.0,
        check=_positive(HOUR_S),
        help="a reader blocked this long by the pipeline reconnects (Binance: pong within 60 s)",
    )
    time_unit: str = setting(
        "MILLISECOND",
        check=_one_of("MILLISECOND", "MICROSECOND"),
        help="stream time unit; MICROSECOND streams are normalised to ms",
    )


@attrs.frozen
class KafkaConfig:
    bootstrap_servers: str = setting(
        "localhost:9092",
        env="KAFKA_BOOTSTRAP_SERVERS",
        check=_check_bootstrap,
        help="brokers, or 'embedded' for librdkafka's in-process mock cluster (ephemeral)",
    )
    compression: str = setting(
        "snappy",
        env="KAFKA_COMPRESSION",
        check=_one_of("snappy", "gzip", "lz4", "zstd", "none"),
        help="producer compression",
    )
    acks: str = setting(
        "1",
        env="KAFKA_ACKS",
        check=_one_of("0", "1", "all"),
        convert=_to_str_or_int,
        help="producer acks",
    )
    linger_ms: float = setting(
        0.5,
        env="KAFKA_LINGER_MS",
        check=Range(0, 60_000),
        help="producer linger; 0.5 lets one wake-up of librdkafka's broker thread carry a whole "
        "receive chunk (a third less ingest CPU per message) for at most 0.5 ms per record; "
        "0 sends at once",
    )
    idempotence: bool = setting(True, help="idempotent producer (no duplicates on retry)")
    flush_timeout_s: float = setting(
        10.0,
        check=_positive(HOUR_S),
        help="bound on the final flush at shutdown",
    )
    producer: dict[str, str] = setting(
        {},
        merge="over_layers",
        help="extra librdkafka producer properties (security.protocol, sasl.*, ssl.*, ...)",
    )
    consumer: dict[str, str] = setting(
        {}, merge="over_layers", help="extra librdkafka consumer properties"
    )


@attrs.frozen
class TopicsConfig:
    raw_trades: str = setting("raw_trades", env="TOPIC_RAW_TRADES", check=_check_topic)
    raw_klines: str = setting("raw_klines", env="TOPIC_RAW_KLINES", check=_check_topic)
    raw_tickers: str = setting("raw_tickers", env="TOPIC_RAW_TICKERS", check=_check_topic)
    dlq: str = setting("raw_dlq", env="TOPIC_DLQ", check=_check_topic, help="dead-letter topic")
    gaps: str = setting("raw_gaps", env="TOPIC_GAPS", check=_check_topic, help="unrepaired gaps")
    raw_depth: str = setting(
        "raw_depth",
        env="TOPIC_RAW_DEPTH",
        check=_check_topic,
        help="diff depth events as received (<symbol>@depth[@100ms])",
    )
    raw_depth_partial: str = setting(
        "raw_depth_partial",
        env="TOPIC_RAW_DEPTH_PARTIAL",
        check=_check_topic,
        help="partial book frames (<symbol>@depth<5|10|20>[@100ms])",
    )
    book_snapshots: str = setting(
        "book_snapshots",
        env="TOPIC_BOOK_SNAPSHOTS",
        check=_check_topic,
        help="top levels of each local book, periodically and after each (re)sync",
    )


@attrs.frozen
class BatchConfig:
    size: int = setting(
        100, env="BATCH_SIZE", check=Range(1, 100_000), help="max messages per batch"
    )
    timeout_ms: float = setting(
        100.0,
        env="BATCH_TIMEOUT_MS",
        check=_positive(60_000),
        help="max age of a batch",
    )
    check_interval_ms: float = setting(
        10.0,
        env="BATCH_CHECK_INTERVAL_MS",
        check=_positive(60_000),
        help="granularity of the age check (deadlines are rounded up to it)",
    )


@attrs.frozen
class DlqConfig:
    max_raw_bytes: int = setting(
        8192,
        check=Range(64, 1 << 20),
        help="a dead-lettered frame is truncated to this many bytes",
    )


@attrs.frozen
class IngestConfig:
    shard: str = setting(
        "1/1",
        env="MARKETD_SHARD",
        check=_check_shard,
        help="this instance's slice of the streams, K/N",
    )
    frame_buffer: int = setting(
        8192,
        check=Range(1, 1_000_000),
        help="ignored (deprecated): there is no frames channel any more",
        deprecated="ignored since 2026-12-07: each connection's task decodes its own frames, "
        "there is no frames channel (trio-websocket's per-connection queue, 256 frames, and the "
        "outbox, 8192 records, bound what waits)",
    )
    coalesce_ms: float = setting(
        1.0,
        check=Range(0, 1000),
        help="under load, each connection's task lets frames gather this long before reading "
        "again (0 = never wait)",
    )
    record_buffer: int = setting(
        64,
        check=Range(1, 100_000),
        help="ignored (deprecated): there is no channel of decoded chunks",
        deprecated="ignored: there is no channel of decoded chunks (the batcher task is gone)",
    )
    batch_buffer: int = setting(
        16,
        check=Range(1, 10_000),
        help="batches buffered for the producer stage's task (with the spool: while spooling or "
        "while librdkafka's queue is full)",
    )
    max_future_ms: int = setting(
        10_000,
        env="INGEST_MAX_FUTURE_MS",
        check=Range(0, DAY_MS),
        help="a record's event time may be at most this far ahead of the local clock "
        "(further: dead-lettered)",
    )


@attrs.frozen
class TickersConfig:
    topic: str = setting("raw_tickers", env="KAFKA_TICKER_TOPIC", check=_check_topic)
    group: str = setting("ticker-consumer-group", env="TICKER_CONSUMER_GROUP", check=_check_group)
    symbols: tuple[str, ...] = setting(
        DEFAULT_TICKER_SYMBOLS,
        env="TICKER_SYMBOLS",
        check=_check_symbols,
        convert=_to_upper_list,
        help="symbols stored in Redis (case-insensitive)",
    )
    ttl_s: int = setting(60, env="TICKER_TTL_SECONDS", check=Range(1, 7 * 86_400), help="Redis TTL")
    watermark_delay_ms: int = setting(
        10_000,
        env="TICKER_WATERMARK_DELAY_MS",
        check=Range(0, DAY_MS),
        help="reject tickers older than now - this",
    )
    max_future_ms: int = setting(
        5_000,
        env="TICKER_MAX_FUTURE_MS",
        check=Range(0, DAY_MS),
        help="reject tickers further than this in the future",
    )
    stale_s: float = setting(
        30.0,
        env="TICKER_STALE_SECONDS",
        check=_positive(DAY_S),
        help="age after which a ticker is stale",
    )


@attrs.frozen
class RedisConfig:
    url: str = setting(
        "redis://localhost:6379/0",
        env="REDIS_URL",
        check=_check_redis_url,
        secret=True,
        help="redis://, rediss:// or 'embedded' (a private redis-server child process)",
    )


@attrs.frozen
class ApiConfig:
    host: str = setting(
        "127.0.0.1", env="API_HOST", check=_check_host, help="HTTP API bind address"
    )
    port: int = setting(8000, env="API_PORT", check=Range(1, 65535), help="HTTP API port")


@attrs.frozen
class ComponentsConfig:
    ingest: bool = setting(True, help="WebSocket -> Kafka")
    tickers: bool = setting(True, help="raw_tickers -> Redis")
    api: bool = setting(True, help="HTTP API")

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in COMPONENTS if getattr(self, name))


def parse_components(raw: str) -> dict[str, bool]:
    """`ingest,api` or `all` -> each component on or off (MARKETD_COMPONENTS, run --components)."""
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    if not names or names - set(COMPONENTS) - {"all"}:
        raise ValueError(f"comma-separated subset of {', '.join(COMPONENTS)} (or all)")
    return {name: "all" in names or name in names for name in COMPONENTS}


@attrs.frozen
class GroupEnv:
    """One environment variable that sets several settings of a section at once."""

    section: str
    parse: Callable[[str], dict[str, Any]]  # raises ValueError saying what is allowed


GROUP_ENVS: dict[str, GroupEnv] = {"MARKETD_COMPONENTS": GroupEnv("components", parse_components)}


@attrs.frozen
class LogConfig:
    level: str = setting(
        "INFO",
        env="LOG_LEVEL",
        check=_one_of("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    format: str = setting("text", env="LOG_FORMAT", check=_one_of("text", "json"))


@attrs.frozen
class SupervisorConfig:
    max_failures: int = setting(
        5,
        check=Range(1, 1000),
        help="failures within failure_window_s before the process exits 1",
    )
    failure_window_s: float = setting(300.0, check=_positive(DAY_S))
    backoff_initial_s: float = setting(0.5, check=_positive(HOUR_S))
    backoff_max_s: float = setting(30.0, check=_positive(HOUR_S))


@attrs.frozen
class ShutdownConfig:
    drain_timeout_s: float = setting(
        15.0,
        check=_positive(HOUR_S),
        help="graceful drain + flush bound; past it everything is cancelled",
    )


@attrs.frozen
class AnalyticsConfig:
    postgres_dsn: str = setting(
        "",
        env="POSTGRES_DSN",
        secret=True,
        help="PostgreSQL for the market/analytics API and the Spark jobs: a DSN, 'embedded' (a "
        "private, migrated PostgreSQL server) or '' (those endpoints answer 503)",
    )
    postgres_dir: str = setting(
        "",
        env="POSTGRES_EMBEDDED_DIR",
        help="data directory of the embedded PostgreSQL, kept across runs ('' = a temporary one)",
    )
    redis_prefix: str = setting("analytics", help="key prefix of the Spark jobs' Redis sink")
    spark_jobs: bool = setting(
        False,
        env="ANALYTICS_SPARK_JOBS",
        help="run the three Spark jobs (spark/*.py) as supervised child processes reading this "
        "process's Kafka and writing its PostgreSQL and Redis (marketd/analytics/jobs.py)",
    )
    spark_dir: str = setting("", help="the jobs' submit scripts ('' = spark/ of this checkout)")
    spark_python: str = setting("", help="Python that runs the jobs ('' = marketd's own)")
    spark_master: str = setting("local[1]", help="Spark master of each job")
    kafka_reader: str = setting(
        "auto",
        check=_one_of("auto", "jvm", "python"),
        help="the jobs' Kafka reader: auto = Spark's connector when on the classpath, else the "
        "Python source",
    )
    state_dir: str = setting(
        "analytics-state",
        env="ANALYTICS_STATE_DIR",
        help="the jobs' checkpoints, Parquet and logs (with the embedded Kafka: a temporary "
        "directory, since its topics die with the process)",
    )
    trade_aggregation_args: tuple[str, ...] = setting(
        [], help="extra flags for spark/trade_aggregation.py"
    )
    technical_indicators_args: tuple[str, ...] = setting(
        [], help="extra flags for spark/technical_indicators.py"
    )
    anomaly_detection_args: tuple[str, ...] = setting(
        [], help="extra flags for spark/anomaly_detection.py"
    )


@attrs.frozen
class SpoolConfig:
    """The on-disk spool that takes accepted records while Kafka cannot (ingest/spooling.py)."""

    enabled: bool = setting(
        True,
        env="SPOOL_ENABLED",
        help="spool to disk during a Kafka outage (not with the embedded Kafka: it cannot fail)",
    )
    dir: str = setting("spool", env="SPOOL_DIR", help="on-disk spool for a Kafka outage")
    max_bytes: int = setting(
        1 << 30,
        env="SPOOL_MAX_BYTES",
        check=Range(1 << 20, 1 << 44),
        help="spool size cap; when full the WebSocket gets backpressure (and backfill repairs)",
    )
    segment_bytes: int = setting(64 << 20, check=Range(1 << 16, 1 << 30), help="spool segment size")
    outage_after_s: float = setting(
        5.0,
        env="SPOOL_OUTAGE_AFTER_SECONDS",
        check=_positive(HOUR_S),
        help="records in flight and no ack this long (or the queue past the threshold) = outage",
    )
    probe_interval_s: float = setting(
        1.0,
        check=_positive(HOUR_S),
        help="while spooling, how often to ask Kafka whether it is back",
    )
    replay_window: int = setting(
        5000,
        check=Range(1, 1_000_000),
        help="spooled records in flight to Kafka at once while replaying",
    )
    queue_threshold: float = setting(
        0.5,
        check=_positive(1),
        help="fraction of the producer's local queue that triggers spooling",
    )


@attrs.frozen
class BackfillConfig:
    enabled: bool = setting(True, env="BACKFILL_ENABLED", help="repair trade/kline gaps over REST")
    resume_from_topic: bool = setting(
        True,
        env="BACKFILL_RESUME_FROM_TOPIC",
        help="at start, continue each symbol's tape from the trades topic's last id "
        "(what marketd missed while down is backfilled); not with the embedded Kafka",
    )
    weight_budget_per_min: int = setting(
        4800,
        check=Range(1, 6000),
        help="REST request weight we allow ourselves (Binance: 6000)",
    )
    give_up_after_s: float = setting(
        60.0,
        check=_positive(DAY_S),
        help="REST unavailable this long: publish the gap as unrepaired (the symbol's live "
        "trades wait behind an open gap, so this bounds their delay)",
    )
    request_timeout_s: float = setting(10.0, check=_positive(10 * MINUTE_S))
    gap_grace_s: float = setting(
        0.2,
        check=Range(0, HOUR_S),
        help="a trade-id jump is requested after this long (a rotation's overlap fills it first); "
        "live trades of that symbol wait meanwhile",
    )
    max_held_per_symbol: int = setting(
        50_000,
        check=Range(1, 10_000_000),
        help="live trades held behind a gap; past it the oldest gap is recorded unrepaired",
    )
    concurrency: int = setting(4, check=Range(1, 64), help="backfill requests in flight")


@attrs.frozen
class RotationConfig:
    max_age_s: float = setting(
        23 * 3600.0,
        check=_positive(DAY_S),
        help="open a replacement before Binance's 24 h disconnect",
    )
    jitter_s: float = setting(
        1800.0, check=Range(0, DAY_S), help="spread of rotations across shards"
    )
    overlap_timeout_s: float = setting(
        30.0,
        check=_positive(HOUR_S),
        help="how long a replacement may take to deliver before switching",
    )


@attrs.frozen
class BookConfig:
    """Local order books kept from the diff depth streams (docs/books.md)."""

    symbols: tuple[str, ...] = setting(
        [],
        env="BOOK_SYMBOLS",
        check=_check_symbols,
        convert=_to_upper_list,
        help="symbols whose local book is kept (each needs a diff depth stream in "
        "binance.streams); empty = every symbol with one",
    )
    snapshot_limit: int = setting(
        5000,
        env="BOOK_SNAPSHOT_LIMIT",
        check=Range(1, 5000),
        help="levels per side of the REST snapshot a book is built from (Binance: at most 5000; "
        "weight 5/25/50/250 for up to 100/500/1000/5000)",
    )
    max_levels: int = setting(
        5000,
        env="BOOK_MAX_LEVELS",
        check=Range(1, 100_000),
        help="levels kept per side; levels pushed beyond are dropped and counted",
    )
    snapshot_interval_s: float = setting(
        1.0,
        env="BOOK_SNAPSHOT_INTERVAL_SECONDS",
        check=Range(0.05, HOUR_S),
        help="period of the book_snapshots records per symbol",
    )
    snapshot_depth: int = setting(
        20,
        env="BOOK_SNAPSHOT_DEPTH",
        check=Range(1, 1000),
        help="levels per side in a book_snapshots record",
    )
    redis_depth: int = setting(
        20,
        env="BOOK_REDIS_DEPTH",
        check=Range(1, 1000),
        help="levels per side published to Redis book:{SYMBOL} (and the most the API serves)",
    )
    audit_interval_s: float = setting(
        60.0,
        env="BOOK_AUDIT_INTERVAL_SECONDS",
        check=_positive(DAY_S),
        help="every this often one book in turn is compared with a fresh REST snapshot",
    )
    snapshot_weight_per_min: int = setting(
        2400,
        check=Range(5, 6000),
        help="REST weight per minute the books' snapshots may use (paced evenly; part of "
        "backfill.weight_budget_per_min, which every REST call shares)",
    )


@attrs.frozen
class Config:
    binance: BinanceConfig = attrs.field(factory=BinanceConfig)
    kafka: KafkaConfig = attrs.field(factory=KafkaConfig)
    topics: TopicsConfig = attrs.field(factory=TopicsConfig)
    routes: dict[str, str] = setting(
        DEFAULT_ROUTES,
        check=_check_routes,
        merge="over_layers",
        help="topic per extra stream kind (trade, kline and ticker use [topics])",
    )
    batch: BatchConfig = attrs.field(factory=BatchConfig)
    dlq: DlqConfig = attrs.field(factory=DlqConfig)
    ingest: IngestConfig = attrs.field(factory=IngestConfig)
    tickers: TickersConfig = attrs.field(factory=TickersConfig)
    redis: RedisConfig = attrs.field(factory=RedisConfig)
    api: ApiConfig = attrs.field(factory=ApiConfig)
    components: ComponentsConfig = attrs.field(factory=ComponentsConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    supervisor: SupervisorConfig = attrs.field(factory=SupervisorConfig)
    shutdown: ShutdownConfig = attrs.field(factory=ShutdownConfig)
    analytics: AnalyticsConfig = attrs.field(factory=AnalyticsConfig)
    spool: SpoolConfig = attrs.field(factory=SpoolConfig)
    backfill: BackfillConfig = attrs.field(factory=BackfillConfig)
    rotation: RotationConfig = attrs.field(factory=RotationConfig)
    book: BookConfig = attrs.field(factory=BookConfig)

    @property
    def shard(self) -> Shard:
        return Shard.parse(self.ingest.shard)

    def route_for(self, kind: str) -> str:
        return self.routes.get(kind, DEFAULT_ROUTES[kind])


@attrs.frozen
class Rule:
    """A check across settings: `holds(values by key)`, else ConfigError naming `key` and the
    source of `source_of`."""

    key: str
    source_of: str
    holds: Callable[[Mapping[str, Any]], bool]
    problem: str


def _snapshot_weight(limit: int) -> int:
    """REST weight of one /api/v3/depth snapshot (docs/books.md §2)."""
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


def _book_symbols_have_streams(v: Mapping[str, Any]) -> bool:
    with_stream = set()
    for name in v["binance.streams"]:
        symbol, _, kind = name.partition("@")
        if kind in ("depth", "depth@100ms"):
            with_stream.add(symbol.upper())
    return set(v["book.symbols"]) <= with_stream


RULES: tuple[Rule, ...] = (
    Rule(
        "components",
        "components.ingest",
        lambda v: any(v[f"components.{name}"] for name in COMPONENTS),
        "no component enabled",
    ),
    Rule(
        "supervisor.backoff_max_s",
        "supervisor.backoff_max_s",
        lambda v: v["supervisor.backoff_max_s"] >= v["supervisor.backoff_initial_s"],
        "must be >= backoff_initial_s",
    ),
    Rule(
        "book.symbols",
        "book.symbols",
        _book_symbols_have_streams,
        "every symbol needs a diff depth stream (<symbol>@depth or @depth@100ms) in "
        "binance.streams",
    ),
    Rule(
        "book.snapshot_depth",
        "book.snapshot_depth",
        lambda v: v["book.snapshot_depth"] <= min(v["book.snapshot_limit"], v["book.max_levels"]),
        "must be <= book.snapshot_limit and <= book.max_levels (deeper levels are never known)",
    ),
    Rule(
        "book.redis_depth",
        "book.redis_depth",
        lambda v: v["book.redis_depth"] <= min(v["book.snapshot_limit"], v["book.max_levels"]),
        "must be <= book.snapshot_limit and <= book.max_levels (deeper levels are never known)",
    ),
    Rule(
        "book.snapshot_weight_per_min",
        "book.snapshot_weight_per_min",
        lambda v: (
            _snapshot_weight(v["book.snapshot_limit"])
            <= v["book.snapshot_weight_per_min"]
            <= v["backfill.weight_budget_per_min"]
        ),
        "must be at least one snapshot's weight (book.snapshot_limit) and at most "
        "backfill.weight_budget_per_min",
    ),
)


# -- walking the declarations ---------------------------------------------------------------------


@attrs.frozen
class Setting:
    key: str  # dotted, e.g. "kafka.compression"
    type: Any
    default: Any
    meta: _Meta

    @property
    def convert(self) -> Converter:
        return self.meta.convert or _BY_TYPE[self.type]


def _walk(cls: type, prefix: str = "") -> Iterator[Setting]:
    hints = get_type_hints(cls)
    for field in attrs.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if attrs.has(tp):
            yield from _walk(tp, key + ".")
            continue
        meta = field.metadata[_META]
        if meta.convert is None and tp not in _BY_TYPE:
            raise TypeError(f"{key}: no converter for {tp!r}")  # a bug in the declarations
        factory = getattr(field.default, "factory", None)
        default = factory() if callable(factory) else field.default
        yield Setting(key, tp, default, meta)


SETTINGS: dict[str, Setting] = {s.key: s for s in _walk(Config)}


# -- layers ---------------------------------------------------------------------------------------


@attrs.frozen
class Value:
    value: Any
    source: str  # "default", "marketd.toml:12", "env KAFKA_ACKS", ".env:3", "cli --shard"


@attrs.frozen
class _Layer:
    values: dict[str, Value]
    from_text: bool  # environment strings (env, .env, CLI) rather than typed TOML values


def _toml_line_index(text: str) -> dict[str, int]:
    """Best-effort map dotted key -> line number, for error messages and `config show`."""
    index: dict[str, int] = {}
    table = ""
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"\[\s*([^\]]+?)\s*\]", stripped)
        if m:
            table = m.group(1).replace('"', "").replace(" ", "")
            index.setdefault(table, lineno)
            continue
        m = re.match(r'("[^"]+"|[A-Za-z0-9_.\-]+)\s*=', stripped)
        if m:
            key = m.group(1).strip('"')
            index.setdefault(f"{table}.{key}" if table else key, lineno)
    return index


def _read_text(path: Path, key: str) -> str:
    """A config file's text, or ConfigError (unreadable, not UTF-8: binary, UTF-16...)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, str(path), f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, str(path), f"not UTF-8 text (byte {exc.start}); the file must be UTF-8"
        ) from None


def _toml_layer(path: Path) -> dict[str, Value]:
    text = _read_text(path, "--config")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError("--config", str(path), "not valid TOML: nested too deeply") from None
    lines = _toml_line_index(text)
    out: dict[str, Value] = {}

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    def visit(table: Mapping[str, Any], prefix: str) -> None:
        for name, value in table.items():
            key = f"{prefix}{name}"
            if key in SETTINGS:
                out[key] = Value(value, where(key))
            elif isinstance(value, dict) and any(k.startswith(key + ".") for k in SETTINGS):
                visit(value, key + ".")
            else:
                section = prefix.rstrip(".")
                known = sorted(k.removeprefix(prefix) for k in SETTINGS if k.startswith(prefix))
                known_text = (
                    ", ".join(k for k in known if "." not in k)
                    if section
                    else ", ".join(sorted({k.split(".")[0] for k in SETTINGS}))
                )
                raise ConfigError(
                    key,
                    where(key),
                    f"unknown key; known in [{section or 'top level'}]: {known_text}",
                )

    visit(data, "")
    return out


def _env_layer(environ: Mapping[str, str], source: Callable[[str], str]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for key, s in SETTINGS.items():
        if s.meta.env and s.meta.env in environ:
            out[key] = Value(environ[s.meta.env], source(s.meta.env))
    for var, group in GROUP_ENVS.items():
        if var in environ:
            where = source(var)
            try:
                values = group.parse(environ[var])
            except ValueError as exc:
                raise ConfigError(group.section, where, f"{shorten(environ[var])}: {exc}") from None
            for name, value in values.items():
                out[f"{group.section}.{name}"] = Value(value, where)
    return out


def _read_dotenv(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    from dotenv import dotenv_values

    text = _read_text(path, ".env")
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m:
            lines[m.group(1)] = lineno
    return values, lines


@attrs.frozen
class LoadedConfig:
    config: Config
    sources: dict[str, Value]  # every key, with its effective value and where it came from

    def deprecated(self) -> list[tuple[str, str, str]]:
        """(key, where it was set, why it is ignored) for every deprecated setting that a layer
        set: the daemon logs each once as `config.deprecated`."""
        return [
            (key, v.source, note)
            for key, v in sorted(self.sources.items())
            if v.source != "default" and (note := SETTINGS[key].meta.deprecated) is not None
        ]


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Value] | None = None,
    dotenv: str | Path | None = ".env",
) -> LoadedConfig:
    """Merge defaults < TOML < .env < environment < overrides into a validated Config."""
    environ = os.environ if environ is None else environ
    layers: list[_Layer] = []
    if path is not None:
        layers.append(_Layer(_toml_layer(Path(path)), from_text=False))
    if dotenv is not None and Path(dotenv).is_file():
        dotenv_path = Path(dotenv)
        values, lines = _read_dotenv(dotenv_path)
        source = lambda var: f"{dotenv_path}:{lines.get(var, '?')} ({var})"  # noqa: E731
        layers.append(_Layer(_env_layer(values, source), from_text=True))
    layers.append(_Layer(_env_layer(environ, lambda var: f"env {var}"), from_text=True))
    if overrides:
        for key in overrides:
            if key not in SETTINGS:
                raise ConfigError(key, overrides[key].source, "unknown setting")
        layers.append(_Layer(dict(overrides), from_text=True))

    merged: dict[str, Value] = {k: Value(s.default, "default") for k, s in SETTINGS.items()}
    for layer in layers:
        for key, raw in layer.values.items():
            merged[key] = _merge(SETTINGS[key], merged[key], _accept(SETTINGS[key], raw, layer))
    for rule in RULES:
        if not rule.holds({k: v.value for k, v in merged.items()}):
            raise ConfigError(rule.key, merged[rule.source_of].source, rule.problem)
    return LoadedConfig(_structure(merged), merged)


def _accept(s: Setting, raw: Value, layer: _Layer) -> Value:
    """Convert and check one raw value, or raise the one-line ConfigError."""
    try:
        value = s.convert(raw.value, layer.from_text)
        if s.meta.check is not None:
            s.meta.check(value)
    except ValueError as exc:
        if not s.meta.echo:
            raise ConfigError(s.key, raw.source, str(exc)) from None
        # Always redacted: a bad entry in [kafka.producer] must not print its password.
        shown = shorten(redact_value(s.key, raw.value))
        raise ConfigError(s.key, raw.source, f"{shown}: {exc}") from None
    return Value(value, raw.source)


def _merge(s: Setting, below: Value, new: Value) -> Value:
    """A table merges key by key over what it replaces, if its declaration says so."""
    if s.meta.merge == "over_default" or (
        s.meta.merge == "over_layers" and below.source != "default"
    ):
        return Value({**below.value, **new.value}, new.source)
    return new


_converter = cattrs.Converter(detailed_validation=False)


def _structure(merged: Mapping[str, Value]) -> Config:
    nested: dict[str, Any] = {}
    for key, v in merged.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v.value
    return _converter.structure(nested, Config)


# -- presenting -----------------------------------------------------------------------------------

_SECRET_KEY_RE = re.compile(r"(password|secret|sasl\.jaas|private|token|credentials?)", re.I)


# libpq keyword DSNs ("host=db password=s3cret") and URL query parameters (?password=...).
_DSN_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_QUERY_SECRET_RE = re.compile(r"([?&](?:password|secret|token)=)[^&#]*", re.I)


def redact_value(key: str, value: Any) -> Any:
    """Hide secrets: passwords in passthrough tables, in URLs and in keyword DSNs."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY_RE.search(k) else v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    if "://" in value:
        parts = urlsplit(value)
        if parts.password:
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"  # IPv6 literal
            if parts.port:
                host = f"{host}:{parts.port}"
            user = parts.username or ""
            value = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        return _QUERY_SECRET_RE.sub(r"\1***", value)
    return _DSN_PASSWORD_RE.sub(r"\1***", value)


def render_config(loaded: LoadedConfig) -> str:
    """`marketd config show`: every key, its effective value (secrets redacted), and its source."""
    import json

    lines = []
    width = max(len(k) for k in loaded.sources)
    for key in sorted(loaded.sources):
        v = loaded.sources[key]
        shown = redact_value(key, v.value)
        if isinstance(shown, tuple):
            shown = list(shown)
        lines.append(f"{key:<{width}} = {json.dumps(shown, ensure_ascii=False)}  # {v.source}")
    return "\n".join(lines)


def env_names() -> dict[str, str]:
    """env var -> dotted key, for docs and for the compose/Dockerfile checks."""
    names = {s.meta.env: k for k, s in SETTINGS.items() if s.meta.env}
    names.update({var: group.section for var, group in GROUP_ENVS.items()})
    return names
