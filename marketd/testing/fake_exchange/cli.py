"""`marketd fake-exchange`: flags, start-up line and signal handling.

Receives parsed CLI arguments; runs the server until SIGINT/SIGTERM, then closes every
connection and exits 0. Prints exactly one line to stdout once listening:
`fake-exchange listening ws=ws://127.0.0.1:PORT/stream http=http://127.0.0.1:PORT`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import trio

from marketd.logs import configure_logging, get_logger
from marketd.testing.fake_exchange.faults import MALFORMED_KINDS, Faults, apply_changes
from marketd.testing.fake_exchange.market import DEFAULT_SYMBOLS
from marketd.testing.fake_exchange.server import FakeExchange
from marketd.testing.fake_exchange.state import ExchangeConfig

log = get_logger(__name__)


def _rate(text: str) -> int | None:
    if text.lower() == "max":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("rate must be >= 1 or 'max'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port for WS and REST (0: a free port)")
    p.add_argument(
        "--rate",
        type=_rate,
        default=200,
        metavar="N|max",
        help="trades/s across subscribed symbols, or 'max': as fast as clients read (200)",
    )
    p.add_argument(
        "--symbols",
        default=",".join(DEFAULT_SYMBOLS),
        help=(
            "comma-separated symbols (default: the 15 of docs/contract.md §1; MATICUSDT is "
            "listed but silent)"
        ),
    )
    p.add_argument("--seed", type=int, default=1, help="random-walk seed (same seed, same tape)")
    p.add_argument("--ping-interval", type=float, default=20.0, metavar="S")
    p.add_argument("--pong-timeout", type=float, default=60.0, metavar="S")
    p.add_argument("--retention", type=int, default=1_000_000, help="trades kept per symbol")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    p.add_argument("--weight-limit", type=int, default=6000, help="REST weight per minute")
    p.add_argument("--chunk-frames", type=int, default=256, help="frames per write at max rate")
    p.add_argument("--book-levels", type=int, default=200, help="order book levels per side")
    p.add_argument(
        "--depth-max",
        action="store_true",
        help="diff depth streams: one event per book step, as fast as the client reads",
    )
    p.add_argument("--log-level", default="WARNING")
    f = p.add_argument_group("fault switches (also POST /fake/faults at runtime)")
    f.add_argument("--drop-after", type=int, metavar="N", help="drop the connection after N frames")
    f.add_argument("--drop-repeat", action="store_true", help="drop every connection, not once")
    f.add_argument("--stall-after", type=int, metavar="N", help="stop sending after N frames")
    f.add_argument("--stall-repeat", action="store_true")
    f.add_argument("--stall-for", type=float, metavar="S", help="stall length (default: forever)")
    f.add_argument("--stall-pings", action="store_true", help="while stalled, no pings/pongs")
    f.add_argument("--malformed-ratio", type=float, default=0.0, metavar="R")
    f.add_argument(
        "--malformed-kinds", metavar="LIST", help=f"subset of {','.join(MALFORMED_KINDS)}"
    )
    f.add_argument("--shutdown-after", type=int, metavar="N", help="serverShutdown after N frames")
    f.add_argument("--shutdown-delay", type=float, default=1.0, metavar="S")
    f.add_argument("--max-connection-age", type=float, metavar="S", help="Binance: 86400")
    f.add_argument("--skip-every", type=int, metavar="N", help="withhold ids on WS every N trades")
    f.add_argument("--skip-count", type=int, default=1, metavar="K")
    f.add_argument("--rest-429-for", type=float, metavar="S", help="REST 429s for S seconds")
    f.add_argument("--rest-503-for", type=float, metavar="S", help="REST 503s for S seconds")
    f.add_argument("--nested-errors", action="store_true", help='errors as {"error":{...}}')
    f.add_argument("--no-msg-limit", action="store_true", help="do not enforce 5 messages/s")
    f.add_argument(
        "--depth-drop-after", type=int, metavar="N", help="withhold a diff event after N of them"
    )
    f.add_argument("--depth-drop-repeat", action="store_true", help="... after every N")
    f.add_argument(
        "--stale-depth-snapshot",
        type=int,
        metavar="STEPS",
        help="the next /api/v3/depth answer is the book STEPS events ago (once)",
    )


def _faults(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "drop_after": args.drop_after,
        "drop_repeat": args.drop_repeat,
        "stall_after": args.stall_after,
        "stall_repeat": args.stall_repeat,
        "stall_for_s": args.stall_for,
        "stall_pings": args.stall_pings,
        "malformed_ratio": args.malformed_ratio,
        "shutdown_after": args.shutdown_after,
        "shutdown_close_delay_s": args.shutdown_delay,
        "max_connection_age_s": args.max_connection_age,
        "skip_every": args.skip_every,
        "skip_count": args.skip_count,
        "nested_errors": args.nested_errors,
        "enforce_msg_limit": not args.no_msg_limit,
        "depth_drop_after": args.depth_drop_after,
        "depth_drop_repeat": args.depth_drop_repeat,
        "stale_depth_snapshot": args.stale_depth_snapshot,
    }
    if args.malformed_kinds:
        changes["malformed_kinds"] = args.malformed_kinds
    return changes


def config_from_args(args: argparse.Namespace) -> ExchangeConfig:
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("the fake exchange binds loopback addresses only")
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
    faults = apply_changes(Faults(), _faults(args), 0.0)
    return ExchangeConfig(
        host=args.host,
        port=args.port,
        rate=args.rate,
        symbols=symbols,
        seed=args.seed,
        ping_interval_s=args.ping_interval,
        pong_timeout_s=args.pong_timeout,
        retention=args.retention,
        speed=args.speed,
        chunk_frames=args.chunk_frames,
        weight_limit=args.weight_limit,
        book_levels=args.book_levels,
        depth_max=args.depth_max,
        faults=faults,
    )


async def _run(config: ExchangeConfig, args: argparse.Namespace) -> None:
    exchange = FakeExchange(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(exchange.serve)
            timed = {
                k: v
                for k, v in (
                    ("rest_429_for_s", args.rest_429_for),
                    ("rest_503_for_s", args.rest_503_for),
                )
                if v
            }
            if timed:
                exchange.set_faults(**timed)
            ws_url, http_url = exchange.urls
            print(f"fake-exchange listening ws={ws_url} http={http_url}", flush=True)
            async for signum in signals:
                log.info("fake_exchange.stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(args: argparse.Namespace) -> int:
    configure_logging(args.log_level.upper())
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"marketd fake-exchange: {exc}", file=sys.stderr)
        return 2
    trio.run(_run, config, args)
    return 0
