"""Operator checks behind `marketd health` and `marketd check tickers`.

`health` asks the local API's /readyz and prints one line (exit 0 ready, 1 not): the Docker
HEALTHCHECK. `check tickers` reads the `ticker:{SYMBOL}` hashes of the tracked symbols from Redis,
classifies each as fresh, stale or missing by its exchange event time, checks Redis (PING) and
Kafka (a metadata request), and prints a summary or JSON: the Airflow ticker monitor calls it.
Both are short-lived synchronous commands (no trio); every client they open is closed on return.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from marketd.config import ApiConfig, Config, load_config, redact_value
from marketd.errors import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REDIS_DOWN = 3

DEFAULT_HEALTH_TIMEOUT_S = 2.0
DEFAULT_CHECK_TIMEOUT_S = 5.0
DEFAULT_MAX_BAD_FRACTION = 0.5
KEY_PREFIX = "ticker:"  # docs/contract.md §3

# -- marketd health -------------------------------------------------------------------------------


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MARKETD_CONFIG") or None,
        help="marketd.toml (API host/port) (default: $MARKETD_CONFIG)",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help="API base URL (default: http://API_HOST:API_PORT; 0.0.0.0 means 127.0.0.1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HEALTH_TIMEOUT_S,
        metavar="SECONDS",
        help=f"request timeout (default {DEFAULT_HEALTH_TIMEOUT_S:g})",
    )


def local_api_url(api: ApiConfig) -> str:
    """Where this host reaches its own API: a wildcard bind address becomes loopback."""
    host = api.host.strip()
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{api.port}"


def health_main(args: argparse.Namespace) -> int:
    import httpx

    url = args.url or local_api_url(load_config(getattr(args, "config", None)).config.api)
    target = url.rstrip("/") + "/readyz"
    try:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture a loopback probe.
        with httpx.Client(timeout=args.timeout, trust_env=False) as client:
            response = client.get(target)
    except httpx.HTTPError as exc:
        print(f"not ready: {target} unreachable: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if response.status_code == 200:
        print(f"ready: {target}")
        return EXIT_OK
    body = " ".join(response.text.split())[:300]
    print(f"not ready: {target} answered HTTP {response.status_code}: {body}")
    return EXIT_FAILED


# -- marketd check tickers: the pure part ---------------------------------------------------------


@attrs.frozen
class Freshness:
    """Tracked symbols split by the age of their last stored ticker."""

    fresh: tuple[str, ...]
    stale: tuple[str, ...]
    missing: tuple[str, ...]
    ages_s: dict[str, float]  # fresh and stale symbols: now - event_time

    @property
    def tracked(self) -> int:
        return len(self.fresh) + len(self.stale) + len(self.missing)

    @property
    def bad_fraction(self) -> float:
        return (len(self.stale) + len(self.missing)) / self.tracked if self.tracked else 0.0


def classify(
    symbols: Sequence[str],
    event_times: Mapping[str, str | None],
    *,
    now_ms: int,
    max_stale_s: float,
) -> Freshness:
    """Fresh: event time within `max_stale_s` of now. Missing: no hash (expired by its TTL, or
    never written, like a delisted symbol) or no readable event_time. Otherwise stale."""
    fresh: list[str] = []
    stale: list[str] = []
    missing: list[str] = []
    ages: dict[str, float] = {}
    for symbol in symbols:
        raw = event_times.get(symbol)
        try:
            event_time_ms = int(raw) if raw is not None else None
        except ValueError:
            event_time_ms = None
        if event_time_ms is None:
            missing.append(symbol)
            continue
        # A ticker slightly in the future (exchange clock ahead of ours) counts as age 0.
        age_s = max(0.0, (now_ms - event_time_ms) / 1000)
        ages[symbol] = round(age_s, 3)
        (fresh if age_s <= max_stale_s else stale).append(symbol)
    return Freshness(tuple(fresh), tuple(stale), tuple(missing), ages)


# -- the probes -----------------------------------------------------------------------------------


@attrs.frozen
class RedisProbe:
    ok: bool
    detail: dict[str, Any]
    event_times: dict[str, str | None]


def probe_redis(url: str, symbols: Sequence[str], timeout_s: float) -> RedisProbe:
    import redis

    shown = redact_value("redis.url", url)
    try:
        with redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        ) as client:
            started = time.perf_counter()
            client.ping()
            ping_ms = (time.perf_counter() - started) * 1000
            pipe = client.pipeline(transaction=False)
            for symbol in symbols:
                pipe.hget(f"{KEY_PREFIX}{symbol}", "event_time")
            values = pipe.execute()
    except redis.RedisError as exc:
        return RedisProbe(
            False,
            {"status": "unreachable", "url": shown, "error": f"{type(exc).__name__}: {exc}"},
            {},
        )
    return RedisProbe(
        True,
        {"status": "ok", "url": shown, "ping_ms": round(ping_ms, 3)},
        dict(zip(symbols, values, strict=True)),
    )


def probe_kafka(cfg: Config, timeout_s: float) -> dict[str, Any]:
    from marketd.kafka.client import is_embedded

    bootstrap = cfg.kafka.bootstrap_servers
    if is_embedded(bootstrap):
        return {
            "status": "skipped",
            "reason": "kafka.bootstrap_servers is 'embedded': the mock cluster lives inside the "
            "daemon process and is not reachable from here",
        }
    import confluent_kafka
    from confluent_kafka.admin import AdminClient

    from marketd.kafka.client import admin_settings

    settings = admin_settings(cfg.kafka, bootstrap)
    # The outcome is reported below; librdkafka's own connection-refused lines would only repeat it.
    settings["log_level"] = 2
    admin = AdminClient(settings)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except confluent_kafka.KafkaException as exc:
        return {
            "status": "unreachable",
            "bootstrap_servers": bootstrap,
            "error": str(exc.args[0] if exc.args else exc),
        }
    finally:
        del admin
    topic = cfg.tickers.topic
    return {
        "status": "ok",
        "bootstrap_servers": bootstrap,
        "brokers": len(metadata.brokers),
        "ticker_topic": topic,
        "ticker_topic_exists": topic in metadata.topics,
    }


# -- marketd check tickers ------------------------------------------------------------------------


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MARKETD_CONFIG") or None,
        help="marketd.toml (Redis, Kafka, symbols) (default: $MARKETD_CONFIG)",
    )
    parser.add_argument(
        "--max-stale",
        type=float,
        metavar="SECONDS",
        help="a ticker older than this is stale (default: TICKER_STALE_SECONDS)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=DEFAULT_MAX_BAD_FRACTION,
        metavar="F",
        help="fail when MORE than this fraction of tracked tickers is stale or missing "
        f"(default {DEFAULT_MAX_BAD_FRACTION:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CHECK_TIMEOUT_S,
        metavar="SECONDS",
        help=f"Redis and Kafka timeouts (default {DEFAULT_CHECK_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def check_tickers_main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(getattr(args, "config", None)).config
        max_stale_s = cfg.tickers.stale_s if args.max_stale is None else args.max_stale
        _check_arguments(cfg, max_stale_s, args.max_bad_fraction, args.timeout)
    except ConfigError as exc:
        print(f"marketd check tickers: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report, code = run_check(
        cfg,
        max_stale_s=max_stale_s,
        max_bad_fraction=args.max_bad_fraction,
        timeout_s=args.timeout,
        now_ms=int(time.time() * 1000),
    )
    print(json.dumps(report) if args.json else render(report))
    return code


def _check_arguments(cfg: Config, max_stale_s: float, max_bad: float, timeout_s: float) -> None:
    if cfg.redis.url == "embedded":
        raise ConfigError(
            "redis.url",
            "REDIS_URL / marketd.toml",
            "'embedded' is a private redis-server inside the daemon; the monitor needs the real "
            "Redis URL the daemon writes to (redis://host:port/db)",
        )
    if not cfg.tickers.symbols:
        raise ConfigError("tickers.symbols", "TICKER_SYMBOLS", "empty: nothing to monitor")
    if max_stale_s <= 0:
        raise ConfigError("--max-stale", "cli", f"{max_stale_s!r}: must be > 0")
    if not 0 <= max_bad <= 1:
        raise ConfigError("--max-bad-fraction", "cli", f"{max_bad!r}: must be between 0 and 1")
    if timeout_s <= 0:
        raise ConfigError("--timeout", "cli", f"{timeout_s!r}: must be > 0")


def run_check(
    cfg: Config, *, max_stale_s: float, max_bad_fraction: float, timeout_s: float, now_ms: int
) -> tuple[dict[str, Any], int]:
    """The report (the `--json` object) and the exit code."""
    symbols = cfg.tickers.symbols
    redis_probe = probe_redis(cfg.redis.url, symbols, timeout_s)
    kafka = probe_kafka(cfg, timeout_s)
    report: dict[str, Any] = {
        "status": "ok",
        "reasons": [],
        "checked_at": now_ms,
        "max_stale_s": max_stale_s,
        "max_bad_fraction": max_bad_fraction,
        "redis": redis_probe.detail,
        "kafka": kafka,
        "tracked": len(symbols),
    }
    if not redis_probe.ok:
        report.update(
            status="failed",
            reasons=["redis unreachable"],
            fresh=None,
            stale=[],
            missing=[],
            ages_s={},
            bad_fraction=None,
        )
        return report, EXIT_REDIS_DOWN
    freshness = classify(symbols, redis_probe.event_times, now_ms=now_ms, max_stale_s=max_stale_s)
    report.update(
        fresh=len(freshness.fresh),
        stale=list(freshness.stale),
        missing=list(freshness.missing),
        ages_s=freshness.ages_s,
        bad_fraction=round(freshness.bad_fraction, 4),
    )
    reasons: list[str] = []
    if freshness.bad_fraction > max_bad_fraction:
        reasons.append(
            f"{len(freshness.stale) + len(freshness.missing)} of {freshness.tracked} tickers "
            f"stale or missing ({freshness.bad_fraction:.0%} > {max_bad_fraction:.0%})"
        )
    if kafka["status"] == "unreachable":
        reasons.append("kafka unreachable")
    if reasons:
        report.update(status="failed", reasons=reasons)
        return report, EXIT_FAILED
    return report, EXIT_OK


def render(report: Mapping[str, Any]) -> str:
    """The human summary of a report."""
    lines = []
    head = "OK" if report["status"] == "ok" else "FAILED: " + "; ".join(report["reasons"])
    lines.append(f"tickers: {head}")
    redis_info = report["redis"]
    redis_line = f"  redis    {redis_info['status']} ({redis_info['url']}"
    if "ping_ms" in redis_info:
        redis_line += f", ping {redis_info['ping_ms']:.1f} ms"
    if "error" in redis_info:
        redis_line += f", {redis_info['error']}"
    lines.append(redis_line + ")")
    kafka = report["kafka"]
    if kafka["status"] == "ok":
        present = "present" if kafka["ticker_topic_exists"] else "MISSING"
        detail = f"{kafka['brokers']} broker(s), topic {kafka['ticker_topic']} {present}"
    else:
        detail = kafka.get("error") or kafka.get("reason", "")
    lines.append(f"  kafka    {kafka['status']} ({detail})")
    if report["bad_fraction"] is not None:
        ages = report["ages_s"]
        lines.append(
            f"  tracked  {report['tracked']}: {report['fresh']} fresh, {len(report['stale'])} "
            f"stale, {len(report['missing'])} missing (bad {report['bad_fraction']:.0%}, "
            f"fails above {report['max_bad_fraction']:.0%})"
        )
        if report["stale"]:
            stale = ", ".join(f"{s} ({ages[s]:.0f} s)" for s in report["stale"])
            lines.append(f"  stale    {stale}  [max {report['max_stale_s']:g} s]")
        if report["missing"]:
            lines.append(f"  missing  {', '.join(report['missing'])}")
    return "\n".join(lines)
