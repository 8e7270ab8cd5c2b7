"""Shared fixtures: a private redis-server per session, flushed between tests, and a
fleet of real gridqueue processes that is always torn down.

Every property test runs under one hypothesis profile: no per-example deadline (a slow or
busy machine must not turn a correct example into a failure; timing belongs in
benchmarks/) and the reproduction blob printed on failure, so any failure seen once can
be replayed with ``@reproduce_failure``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from gridqueue import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.ledger import Ledger, connect_redis
from gridqueue.settings import Settings
from tests.brokers import amqp_vhost, broker_url  # noqa: F401 - fixtures, by name

hypothesis_settings.register_profile(
    "gridqueue",
    deadline=None,
    print_blob=True,
    # Slow data generation is the machine's load, not a fault of the code under test.
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.load_profile("gridqueue")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    # Our own private server: flushing it between tests is safe and keeps them apart.
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    ledger = Ledger(connect_redis(settings.redis_url), settings)
    yield ledger
    ledger.client.close()


@pytest.fixture
def gq(settings: Settings) -> Iterator[GridQueue]:
    client = GridQueue(settings=settings)
    yield client
    client.close()


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = LocalFleet(redis_url, tmp_path / "logs")
    yield fleet
    fleet.stop_all()
