"""`marketd` command line: run, config show, fake-exchange, topics, health, check, verify.

Configuration errors print one line naming the key, its source and what is allowed, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from marketd.config import (
    LoadedConfig,
    Value,
    load_config,
    parse_components,
    render_config,
    shorten,
)
from marketd.errors import ConfigError
from marketd.logs import configure_logging, get_logger

EXIT_CONFIG = 2


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MARKETD_CONFIG") or None,
        help="marketd.toml (default: $MARKETD_CONFIG, else built-in defaults)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Value]:
    """CLI flags, the highest-precedence layer."""
    out: dict[str, Value] = {}
    if getattr(args, "shard", None):
        out["ingest.shard"] = Value(args.shard, "cli --shard")
    if getattr(args, "streams", None):
        out["binance.streams"] = Value(args.streams, "cli --streams")
    if getattr(args, "log_level", None):
        out["log.level"] = Value(args.log_level.upper(), "cli --log-level")
    if getattr(args, "log_format", None):
        out["log.format"] = Value(args.log_format, "cli --log-format")
    if getattr(args, "components", None):
        try:
            enabled = parse_components(args.components)
        except ValueError as exc:
            raise ConfigError(
                "components", "cli --components", f"{shorten(args.components)}: {exc}"
            ) from None
        for name, on in enabled.items():
            out[f"components.{name}"] = Value(on, "cli --components")
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(shorten(item), "cli --set", "expected KEY=VALUE, e.g. batch.size=500")
        out[key.strip()] = Value(value, f"cli --set {key.strip()}")
    return out


def load(args: argparse.Namespace) -> LoadedConfig:
    return load_config(getattr(args, "config", None), overrides=_overrides(args))


def _cmd_run(args: argparse.Namespace) -> int:
    loaded = load(args)
    cfg = loaded.config
    if cfg.components.api:
        # Before anything starts or logs: an unresolvable api.host or a port in use is one
        # line and exit 2, like any other bad setting (the API maps a later failure the same way).
        from marketd.api.bind import probe_bind

        sources = (loaded.sources["api.host"].source, loaded.sources["api.port"].source)
        probe_bind(cfg.api.host, cfg.api.port, sources)
    import trio

    from marketd.daemon import run_daemon

    configure_logging(cfg.log.level, cfg.log.format)
    for key, source, why in loaded.deprecated():  # once per key, per process start
        get_logger("marketd.config").warning(
            "config.deprecated", key=key, source=source, detail=why
        )
    return trio.run(run_daemon, cfg)


def _cmd_config_show(args: argparse.Namespace) -> int:
    loaded = load(args)
    print(render_config(loaded))
    return 0


def _forward(module: str, func: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import importlib

        result: int = getattr(importlib.import_module(module), func)(args)
        return result

    return run


def _optional_parser(
    sub: Any, name: str, help_text: str, module: str, adder: str, main: str
) -> argparse.ArgumentParser:
    import importlib

    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    try:
        getattr(importlib.import_module(module), adder)(p)
    except (ImportError, AttributeError) as exc:  # a part not installed in this build
        p.set_defaults(func=lambda _a, exc=exc: _unavailable(name, exc))
        return p
    p.set_defaults(func=_forward(module, main))
    return p


def _unavailable(name: str, exc: BaseException) -> int:
    print(f"marketd: '{name}' is not available in this installation: {exc}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marketd",
        description="Real-time Binance market data: WebSocket -> Kafka -> Redis -> HTTP.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (ingest, ticker consumer, API)")
    _add_config(run)
    run.add_argument("--shard", metavar="K/N", help="take shard K of N of the stream list")
    run.add_argument("--components", metavar="LIST", help="subset of ingest,tickers,api")
    run.add_argument("--streams", metavar="LIST", help="comma-separated streams (overrides config)")
    run.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
    )
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set batch.size=500 (repeatable)",
    )
    run.set_defaults(func=_cmd_run)

    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", help="effective configuration and where each value came from"
    )
    _add_config(show)
    show.add_argument("--set", action="append", metavar="KEY=VALUE")
    show.set_defaults(func=_cmd_config_show)

    _optional_parser(
        sub,
        "fake-exchange",
        "a Binance-compatible fake exchange for offline use",
        "marketd.testing.fake_exchange",
        "add_arguments",
        "main",
    )

    topics = sub.add_parser("topics", help="Kafka topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    _optional_parser(
        topics_sub,
        "create",
        "create marketd's topics",
        "marketd.kafka.topics",
        "add_arguments",
        "main",
    )

    _optional_parser(
        sub,
        "health",
        "exit 0 if the local API reports ready (/readyz)",
        "marketd.checks",
        "add_health_arguments",
        "health_main",
    )

    check = sub.add_parser("check", help="operator checks (for monitoring)")
    check_sub = check.add_subparsers(dest="check_command", required=True, metavar="WHAT")
    _optional_parser(
        check_sub,
        "tickers",
        "ticker freshness in Redis, Redis and Kafka health",
        "marketd.checks",
        "add_check_arguments",
        "check_tickers_main",
    )

    verify = sub.add_parser("verify", help="prove the data in Kafka")
    verify_sub = verify.add_subparsers(dest="verify_command", required=True, metavar="WHAT")
    _optional_parser(
        verify_sub,
        "tape",
        "trade tape: gaps and duplicates per symbol",
        "marketd.verify",
        "add_arguments",
        "main",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"marketd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
