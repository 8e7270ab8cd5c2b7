"""The watchdog's tick against a consumer that will never read: a connection named as a
worker's broker connection, with a BRPOP pending on the worker's queue, as a frozen node
leaves it. On the worker's heartbeat verdict the tick kills that connection before it
publishes the worker's attempt again, and publishes again at once what it had popped.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from gridqueue.celeryapp import broker_client_name, priority_lists
from gridqueue.keys import attempt_id, queue_for_model
from gridqueue.ledger import Ledger
from gridqueue.settings import Settings
from gridqueue.watchdog import Watchdog
from tests.helpers import wait_for
from tests.integration.test_contract_ledger import PAYLOAD, patient, register, tick_for


def _command(*words: str) -> bytes:
    """One command in Redis's protocol."""
    encoded = [w.encode() for w in words]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in encoded)


def _queue_lists(ledger: Ledger) -> list[str]:
    return priority_lists(queue_for_model(ledger.settings.namespace, "sim-llm"))


def _queued(ledger: Ledger) -> int:
    return sum(int(ledger.client.llen(name)) for name in _queue_lists(ledger))


def _frozen_brpop(ledger: Ledger) -> bool:
    return any(
        c.get("name") == broker_client_name("w1") and c.get("cmd") == "brpop"
        for c in ledger.client.client_list()
    )


@pytest.fixture
def watchdog(settings: Settings) -> Iterator[Watchdog]:
    watchdog = Watchdog(patient(settings), owner="cut-test")
    tick_for(watchdog, watchdog.grace_s + 0.1)  # a new leader's grace, then it judges
    yield watchdog
    watchdog.ledger.client.close()


@pytest.fixture
def frozen_consumer(watchdog: Watchdog) -> Iterator[socket.socket]:
    """w1's consumer, frozen in a BRPOP on its queue: it sends and never reads."""
    url = urlparse(watchdog.settings.redis_url)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
    sock.sendall(
        _command("CLIENT", "SETNAME", broker_client_name("w1"))
        + _command("BRPOP", *_queue_lists(watchdog.ledger), "60")
    )
    wait_for(lambda: _frozen_brpop(watchdog.ledger), timeout_s=10)
    yield sock
    sock.close()


def _declare_w1_dead(watchdog: Watchdog) -> int:
    time.sleep(watchdog.settings.stale_after_s)
    for _ in range(100):
        report = watchdog.tick()
        if report.workers_declared_dead:
            return report.deliveries_recovered
        time.sleep(watchdog.settings.watchdog_tick_s)
    raise AssertionError("w1 was not declared dead")


def test_the_requeued_attempt_is_not_popped_by_the_silent_workers_brpop(
    watchdog: Watchdog, frozen_consumer: socket.socket
) -> None:
    ledger = watchdog.ledger
    register(ledger, "w1")  # beats once, then never again
    job = ledger.submit("held", "sim-llm", "realtime", PAYLOAD, 60_000, None).job_id
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"

    _declare_w1_dead(watchdog)

    assert ledger.get(job).attempt == 2
    assert _queued(ledger) == 1  # attempt 2 waits for a live consumer, not in a dead socket
    assert not _frozen_brpop(watchdog.ledger)  # its connection was killed


def test_what_the_silent_worker_popped_is_published_again_on_its_verdict(
    watchdog: Watchdog, frozen_consumer: socket.socket
) -> None:
    ledger = watchdog.ledger
    register(ledger, "w1")
    submitted = ledger.submit("fresh", "sim-llm", "realtime", PAYLOAD, 60_000, None)
    watchdog.dispatcher.publish(attempt_id("fresh", 1), submitted.dispatch_lease)
    wait_for(lambda: _queued(ledger) == 0, timeout_s=5)  # popped into the unread socket

    recovered = _declare_w1_dead(watchdog)

    assert recovered == 1
    assert _queued(ledger) == 1  # published again at once, not on the 30 s round
    events = ledger.events(count=1000)
    assert [e["job"] for e in events if e["type"] == "message_lost"] == ["fresh"]
