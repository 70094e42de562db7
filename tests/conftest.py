"""Session-wide test infrastructure: Kafka (mock cluster or MARKETD_TEST_KAFKA) and Redis.

Servers are started by the tests themselves on free loopback ports; none is assumed running.
A missing binary fails loudly (the README's test command installs everything).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketd.tickers.redis_server import RedisProcess
from tests.support.kafka import TestKafka


@pytest.fixture(scope="session")
def kafka() -> Iterator[TestKafka]:
    cluster = TestKafka()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh redis-server per test (~30 ms), so fault tests can stop and restart it."""
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.close()
