from __future__ import annotations

from pathlib import Path

import pytest

from marketd.cli import main
from marketd.config import (
    DEFAULT_TICKER_SYMBOLS,
    SETTINGS,
    LoadedConfig,
    Value,
    env_names,
    load_config,
    render_config,
)
from marketd.errors import ConfigError


def load(
    tmp_path: Path, toml: str | None = None, env: dict[str, str] | None = None, **kw: object
) -> LoadedConfig:
    path = None
    if toml is not None:
        path = tmp_path / "marketd.toml"
        path.write_text(toml)
    return load_config(path, environ=env or {}, dotenv=tmp_path / ".env", **kw)  # type: ignore[arg-type]


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    cfg = load(tmp_path).config
    assert cfg.binance.ws_url == "wss://stream.binance.com:9443/stream"
    assert cfg.binance.streams == (
        "btcusdt@trade",
        "ethusdt@trade",
        "bnbusdt@trade",
        "btcusdt@kline_1m",
        "ethusdt@kline_1m",
        "btcusdt@ticker",
    )
    assert cfg.binance.ping_interval_s == 180
    assert cfg.binance.reconnect_max_delay_s == 60
    assert cfg.binance.connection_timeout_s == 10
    assert cfg.binance.max_frame_bytes == 1_048_576
    assert cfg.binance.rest_url == "https://api.binance.com"
    assert cfg.kafka.bootstrap_servers == "localhost:9092"
    assert (cfg.kafka.compression, cfg.kafka.acks) == ("snappy", "1")
    assert (cfg.topics.raw_trades, cfg.topics.raw_klines, cfg.topics.raw_tickers) == (
        "raw_trades",
        "raw_klines",
        "raw_tickers",
    )
    assert cfg.topics.dlq == "raw_dlq"
    assert (cfg.batch.size, cfg.batch.timeout_ms, cfg.batch.check_interval_ms) == (100, 100, 10)
    assert cfg.log.level == "INFO" and cfg.log.format == "text"
    assert cfg.tickers.symbols == DEFAULT_TICKER_SYMBOLS and len(cfg.tickers.symbols) == 15
    assert (cfg.tickers.topic, cfg.tickers.group) == ("raw_tickers", "ticker-consumer-group")
    assert (cfg.tickers.ttl_s, cfg.tickers.watermark_delay_ms, cfg.tickers.max_future_ms) == (
        60,
        10_000,
        5_000,
    )
    assert cfg.tickers.stale_s == 30
    assert cfg.redis.url == "redis://localhost:6379/0"
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 8000)
    assert cfg.components.enabled() == ("ingest", "tickers", "api")


def test_every_spec_env_var_is_honoured() -> None:
    spec = {
        "BINANCE_WS_URL",
        "BINANCE_STREAMS",
        "PING_INTERVAL_SECONDS",
        "RECONNECT_MAX_DELAY_SECONDS",
        "WS_CONNECTION_TIMEOUT",
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_COMPRESSION",
        "KAFKA_ACKS",
        "TOPIC_RAW_TRADES",
        "TOPIC_RAW_KLINES",
        "TOPIC_RAW_TICKERS",
        "TOPIC_DLQ",
        "BINANCE_MAX_FRAME_BYTES",
        "BINANCE_REST_URL",
        "BATCH_SIZE",
        "BATCH_TIMEOUT_MS",
        "BATCH_CHECK_INTERVAL_MS",
        "LOG_LEVEL",
        "TICKER_SYMBOLS",
        "KAFKA_TICKER_TOPIC",
        "TICKER_CONSUMER_GROUP",
        "TICKER_TTL_SECONDS",
        "TICKER_WATERMARK_DELAY_MS",
        "TICKER_MAX_FUTURE_MS",
        "TICKER_STALE_SECONDS",
        "REDIS_URL",
        "API_HOST",
        "API_PORT",
        "MARKETD_COMPONENTS",
        "LOG_FORMAT",
    }
    assert spec <= set(env_names())


def test_readme_documents_every_environment_variable() -> None:
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = {m.group(1) for m in re.finditer(r"^\| ([A-Z0-9_ /]+) \|", readme, re.M)}
    documented = {name.strip() for row in table for name in row.split("/")}
    wanted = set(env_names())
    assert wanted - documented == set()


def test_precedence_defaults_toml_dotenv_env_cli(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BATCH_SIZE=300\nKAFKA_ACKS=0\n")
    loaded = load(
        tmp_path,
        '[batch]\nsize = 200\ntimeout_ms = 50\n[kafka]\nacks = "all"\ncompression = "lz4"\n',
        env={"BATCH_SIZE": "400"},
        overrides={"batch.size": Value("500", "cli --set batch.size")},
    )
    cfg = loaded.config
    assert cfg.batch.size == 500
    assert loaded.sources["batch.size"].source == "cli --set batch.size"
    assert cfg.batch.timeout_ms == 50 and loaded.sources["batch.timeout_ms"].source.endswith(":3")
    assert cfg.kafka.acks == "0" and ".env:2" in loaded.sources["kafka.acks"].source
    assert cfg.kafka.compression == "lz4"
    assert loaded.sources["batch.check_interval_ms"].source == "default"


@pytest.mark.parametrize(
    ("toml", "env", "key", "where", "allowed"),
    [
        (
            '[kafka]\ncompresion = "lz4"\n',
            {},
            "kafka.compresion",
            "marketd.toml:2",
            "known in [kafka]",
        ),
        ("", {"BATCH_SIZE": "-5"}, "batch.size", "env BATCH_SIZE", ">= 1"),
        (
            "",
            {"KAFKA_COMPRESSION": "brotli"},
            "kafka.compression",
            "env KAFKA_COMPRESSION",
            "snappy, gzip, lz4, zstd, none",
        ),
        (
            '[binance]\nstreams = ["btcusdt@kline_7m"]\n',
            {},
            "binance.streams",
            "marketd.toml:2",
            "unknown kline interval",
        ),
        (
            "",
            {"BINANCE_STREAMS": "btcusdt@depth,btcusdt@depth@100ms"},
            "binance.streams",
            "env BINANCE_STREAMS",
            "one diff depth stream per symbol",
        ),
        (
            "",
            {"BOOK_SYMBOLS": "ethusdt"},
            "book.symbols",
            "env BOOK_SYMBOLS",
            "needs a diff depth stream",
        ),
        ("", {"BOOK_SNAPSHOT_LIMIT": "5001"}, "book.snapshot_limit", "env", "<= 5000"),
        ("", {"BOOK_SNAPSHOT_DEPTH": "0"}, "book.snapshot_depth", "env", ">= 1 and <= 1000"),
        (
            "[book]\nsnapshot_limit = 100\nsnapshot_depth = 200\n",
            {},
            "book.snapshot_depth",
            "marketd.toml:3",
            "<= book.snapshot_limit",
        ),
        (
            "[book]\nsnapshot_weight_per_min = 100\n",
            {},
            "book.snapshot_weight_per_min",
            "marketd.toml:2",
            "one snapshot's weight",
        ),
        ("", {"KAFKA_ACKS": "2"}, "kafka.acks", "env KAFKA_ACKS", "0, 1, all"),
        ("", {"API_PORT": "http"}, "api.port", "env API_PORT", "integer"),
        (
            "",
            {"MARKETD_COMPONENTS": "ingest,spark"},
            "components",
            "env MARKETD_COMPONENTS",
            "ingest, tickers, api",
        ),
        (
            "[batch]\nsize = 10\n[nope]\nx = 1\n",
            {},
            "nope",
            "marketd.toml:3",
            "known in [top level]",
        ),
        ("", {"TICKER_SYMBOLS": "BTC-USDT"}, "tickers.symbols", "env TICKER_SYMBOLS", "A-Z, 0-9"),
        # librdkafka would abort the process on an empty group.id: refuse it here.
        ("", {"TICKER_CONSUMER_GROUP": ""}, "tickers.group", "env TICKER_CONSUMER_GROUP", "empty"),
        ('[tickers]\ngroup = " "\n', {}, "tickers.group", "marketd.toml:2", "non-empty"),
    ],
)
def test_bad_values_name_key_source_and_allowed(
    tmp_path: Path, toml: str, env: dict[str, str], key: str, where: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml or None, env)
    assert info.value.key == key
    assert where in info.value.source
    assert allowed in info.value.problem


def test_cli_config_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAFKA_COMPRESSION", "brotli")
    assert main(["config", "show"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "kafka.compression" in err[0] and "KAFKA_COMPRESSION" in err[0] and "snappy" in err[0]


def test_config_show_redacts_secrets_and_shows_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "m.toml"
    toml.write_text(
        '[kafka.producer]\n"security.protocol" = "SASL_SSL"\n"sasl.password" = "hunter2"\n'
    )
    monkeypatch.setenv("REDIS_URL", "rediss://user:s3cret@cache.example:6380/0")
    assert main(["config", "show", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out
    assert '"sasl.password": "***"' in out and "SASL_SSL" in out
    assert "env REDIS_URL" in out and "m.toml:1" in out


@pytest.mark.parametrize(
    ("env", "secret"),
    [
        ({"POSTGRES_DSN": "host=db user=marketd password=pgs3cret dbname=m"}, "pgs3cret"),
        ({"POSTGRES_DSN": "host=db password = 'pg s3cret' dbname=m"}, "s3cret"),
        ({"POSTGRES_DSN": "postgresql://marketd@db/m?password=qs3cret"}, "qs3cret"),
        ({"REDIS_URL": "redis://cache:6379/0?password=rs3cret"}, "rs3cret"),
        ({"REDIS_URL": "redis://:v6s3cret@[::1]:6379/0"}, "v6s3cret"),
    ],
)
def test_config_show_redacts_keyword_dsn_and_query_passwords(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    secret: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert secret not in out
    assert "***" in out


def test_config_error_line_never_shows_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "m.toml"
    toml.write_text('[kafka.producer]\n"sasl.password" = "hunter2"\n"batch.size" = [1]\n')
    assert main(["config", "show", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "kafka.producer" in err and "batch.size" in err


def test_kafka_passthrough_reaches_producer_settings(tmp_path: Path) -> None:
    from marketd.kafka.client import producer_settings

    cfg = load(
        tmp_path,
        '[kafka.producer]\n"security.protocol" = "SASL_SSL"\n'
        '"sasl.mechanism" = "PLAIN"\n"batch.size" = 1000\n',
    ).config
    settings = producer_settings(cfg.kafka, "broker:9093")
    assert settings["security.protocol"] == "SASL_SSL"
    assert settings["sasl.mechanism"] == "PLAIN"
    assert settings["batch.size"] == "1000"
    assert settings["enable.idempotence"] is True and settings["acks"] == "all"


def test_components_from_env_and_toml(tmp_path: Path) -> None:
    assert load(tmp_path, env={"MARKETD_COMPONENTS": "ingest"}).config.components.enabled() == (
        "ingest",
    )
    cfg = load(tmp_path, "[components]\napi = false\n").config
    assert cfg.components.enabled() == ("ingest", "tickers")


def test_shipped_marketd_toml_is_valid_and_uses_embedded(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "marketd.toml"
    loaded = load_config(shipped, environ={}, dotenv=None)
    assert loaded.config.kafka.bootstrap_servers == "embedded"
    assert loaded.config.redis.url == "embedded"
    # Every setting appears in the shipped example, at its default unless documented otherwise.
    shown = render_config(loaded)
    for key, value in loaded.sources.items():
        if SETTINGS[key].meta.deprecated is None:
            assert value.source != "default", f"{key} missing from marketd.toml"
        else:
            assert value.source == "default", f"{key} is deprecated: not in the shipped example"
    assert loaded.deprecated() == []
    assert shown


def test_deprecated_ingest_buffers_still_load_and_are_listed_once(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        "[ingest]\nframe_buffer = 4096\nrecord_buffer = 8\ncoalesce_ms = 0.5\n",
    )
    assert loaded.config.ingest.coalesce_ms == 0.5  # still a setting with a meaning
    listed = loaded.deprecated()
    assert [key for key, _, _ in listed] == ["ingest.frame_buffer", "ingest.record_buffer"]
    assert all("marketd.toml" in source and why for _, source, why in listed)


def test_a_bad_stream_is_named_once_not_buried_in_the_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "", env={"BINANCE_STREAMS": "btcusdt@trade,ethusdt@trade,btcusdt@kline_7m"})
    line = str(err.value)
    assert line.count("btcusdt@kline_7m") == 1 and "ethusdt@trade" not in line
    assert "env BINANCE_STREAMS" in line and "allowed: 1s 1m" in line


@pytest.mark.parametrize(
    ("value", "embedded"), [("embedded", True), (" Embedded ", True), ("localhost:9092", False)]
)
def test_embedded_kafka_is_recognised_the_same_everywhere(value: str, embedded: bool) -> None:
    from marketd.kafka.client import is_embedded

    assert is_embedded(value) is embedded


def test_per_field_converters_and_table_merging(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        '[kafka]\nacks = 1\n[binance.silence_timeout_s]\nkline = 5\n[routes]\naggTrade = "aggs"\n'
        '[kafka.producer]\n"linger.ms" = 5\n',
        env={"TICKER_SYMBOLS": " btcusdt, ethusdt ,"},
        overrides={"kafka.producer": Value({"acks": "all"}, "test")},
    )
    cfg = loaded.config
    assert cfg.kafka.acks == "1"  # a TOML integer, declared convertible on the field
    assert cfg.tickers.symbols == ("BTCUSDT", "ETHUSDT")  # upper-cased by its converter
    # silence_timeout_s merges over its default; passthrough tables over earlier layers only.
    assert (
        cfg.binance.silence_timeout_s["kline"] == 5 and cfg.binance.silence_timeout_s["trade"] == 0
    )
    assert cfg.routes == {"aggTrade": "aggs"} and cfg.route_for("bookTicker") == "raw_book_tickers"
    assert cfg.kafka.producer == {"linger.ms": "5", "acks": "all"}


def test_book_defaults_topics_and_env(tmp_path: Path) -> None:
    cfg = load(tmp_path).config
    book = cfg.book
    assert (book.snapshot_limit, book.max_levels, book.snapshot_interval_s) == (5000, 5000, 1.0)
    assert (book.snapshot_depth, book.redis_depth, book.audit_interval_s) == (20, 20, 60.0)
    assert book.symbols == ()  # every symbol with a diff depth stream
    topics = cfg.topics
    assert (topics.raw_depth, topics.raw_depth_partial, topics.book_snapshots) == (
        "raw_depth",
        "raw_depth_partial",
        "book_snapshots",
    )
    env = {
        "BINANCE_STREAMS": "btcusdt@depth@100ms,ethusdt@depth,ethusdt@depth5",
        "BOOK_SYMBOLS": "btcusdt,ethusdt",
        "BOOK_SNAPSHOT_LIMIT": "1000",
        "BOOK_SNAPSHOT_DEPTH": "50",
        "BOOK_AUDIT_INTERVAL_SECONDS": "30",
        "TOPIC_RAW_DEPTH": "d",
        "TOPIC_RAW_DEPTH_PARTIAL": "p",
        "TOPIC_BOOK_SNAPSHOTS": "s",
    }
    cfg = load(tmp_path, env=env).config
    assert cfg.book.symbols == ("BTCUSDT", "ETHUSDT")
    assert (cfg.book.snapshot_limit, cfg.book.snapshot_depth) == (1000, 50)
    assert cfg.book.audit_interval_s == 30
    assert (cfg.topics.raw_depth, cfg.topics.raw_depth_partial, cfg.topics.book_snapshots) == (
        "d",
        "p",
        "s",
    )
