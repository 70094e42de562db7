"""A Binance-compatible fake exchange: WebSocket streams, REST backfill and scripted faults.

`marketd fake-exchange` runs it (see README.md here); tests and benchmarks use `FakeExchange`
in-process. Everything it sends comes from one deterministic, seeded trade tape per symbol.
"""

from marketd.testing.fake_exchange.cli import add_arguments, main
from marketd.testing.fake_exchange.faults import MALFORMED_KINDS, Faults
from marketd.testing.fake_exchange.market import DEFAULT_SYMBOLS
from marketd.testing.fake_exchange.server import FakeExchange
from marketd.testing.fake_exchange.state import ExchangeConfig

__all__ = [
    "DEFAULT_SYMBOLS",
    "MALFORMED_KINDS",
    "ExchangeConfig",
    "FakeExchange",
    "Faults",
    "add_arguments",
    "main",
]
