"""Fixtures: an in-process fake exchange on a free port (real clock, fail_after guards)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from marketd.testing.fake_exchange import ExchangeConfig, FakeExchange

Start = Callable[..., Awaitable[FakeExchange]]


@pytest.fixture
def start(nursery: trio.Nursery) -> Start:
    """`ex = await start(rate=500, symbols=("BTCUSDT",), ...)`; stopped when the test ends."""

    async def _start(**overrides: Any) -> FakeExchange:
        settings: dict[str, Any] = {"rate": 500, "symbols": ("BTCUSDT", "ETHUSDT", "MATICUSDT")}
        settings.update(overrides)
        ex = FakeExchange(ExchangeConfig(**settings))
        await nursery.start(ex.serve)
        return ex

    return _start
