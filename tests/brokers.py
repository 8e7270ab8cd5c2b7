"""The brokers the integration tests run on: the ledger's Redis, and RabbitMQ.

RabbitMQ cases use the server at ``GRIDQUEUE_TEST_AMQP_URL`` (default
``amqp://guest:guest@127.0.0.1:5672//``) under a private vhost made for this test session
with ``rabbitmqctl`` and deleted afterwards; no other vhost is touched. Where no RabbitMQ
answers, those cases skip and say how to run them; with ``GRIDQUEUE_TEST_REQUIRE_AMQP=1``
(set by ``.ci/run`` when something listens on 5672) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import kombu
import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
AMQP_URL_ENV = "GRIDQUEUE_TEST_AMQP_URL"
REQUIRE_AMQP_ENV = "GRIDQUEUE_TEST_REQUIRE_AMQP"
HOW_TO_RUN = (
    "start RabbitMQ (apt-get install rabbitmq-server; rabbitmq-server -detached) on "
    f"127.0.0.1:5672 or point {AMQP_URL_ENV} at one, with rabbitmqctl on PATH (it makes "
    "this session's private vhost)"
)
BROKERS = ["redis", "amqp"]


def _unavailable(why: str) -> None:
    if os.environ.get(REQUIRE_AMQP_ENV) == "1":
        pytest.fail(f"RabbitMQ cases cannot run ({why}), but {REQUIRE_AMQP_ENV}=1")
    pytest.skip(f"RabbitMQ cases skipped: {why}; to run them, {HOW_TO_RUN}")


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class AmqpVhost:
    """A private vhost on the test RabbitMQ."""

    name: str
    url: str

    def queues(self) -> list[str]:
        listed = _rabbitmqctl("list_queues", "-p", self.name, "name", "-q", "--no-table-headers")
        return [line.strip() for line in listed.stdout.splitlines() if line.strip()]

    def delete_queues(self) -> None:
        """Empty the vhost between tests (the Redis cases flush their server)."""
        names = self.queues()
        if not names:
            return
        k: Any = kombu
        with k.Connection(self.url, connect_timeout=5) as connection:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(name)

    def close_connections(self, reason: str) -> int:
        """Close every client connection of this vhost (and only this vhost)."""
        listed = _rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "pid")
        closed = 0
        for line in listed.stdout.splitlines():
            vhost, _, pid = line.strip().partition("\t")
            if vhost != self.name or not pid:
                continue
            if _rabbitmqctl("close_connection", pid.strip(), reason).returncode == 0:
                closed += 1
        return closed


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[AmqpVhost]:
    base = os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
    k: Any = kombu
    try:
        with k.Connection(base, connect_timeout=3) as connection:
            connection.connect()
    except Exception as exc:  # refused, unreachable, bad login alike
        _unavailable(f"no RabbitMQ answered at {base.rpartition('@')[2]} ({exc})")
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not on PATH")
    name = f"gridqueue-test-{uuid.uuid4().hex[:10]}"
    parts = urlsplit(base)
    user = unquote(parts.username or "guest")
    created = _rabbitmqctl("add_vhost", name)
    if created.returncode != 0:
        _unavailable(f"rabbitmqctl add_vhost failed: {created.stderr.strip()}")
    try:
        allowed = _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        if allowed.returncode != 0:
            _unavailable(f"rabbitmqctl set_permissions failed: {allowed.stderr.strip()}")
        url = urlunsplit(parts._replace(path="/" + quote(name, safe="")))
        yield AmqpVhost(name, url)
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` (the ledger's Redis carries the messages) or a RabbitMQ URL."""
    if request.param == "redis":
        yield None
        return
    vhost: AmqpVhost = request.getfixturevalue("amqp_vhost")
    vhost.delete_queues()
    yield vhost.url
    vhost.delete_queues()


def broker_env(broker_url: str | None) -> dict[str, str]:
    """The environment that points a gridqueue process at this broker."""
    return {} if broker_url is None else {"GRIDQUEUE_BROKER_URL": broker_url}
