"""Shared fixtures: a private redis-server per session, flushed between tests, and a
fleet of real gridqueue processes that is always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gridqueue import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.ledger import Ledger, connect_redis
from gridqueue.settings import Settings


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
