"""The connection signal's rules in the ledger scripts, against a real redis-server.

A worker is declared dead on its closed connection only when all of these hold: its
heartbeat is late by more than one interval, Redis saw its presence subscription in this
incarnation, and the channel has no subscriber now. Each test breaks one of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from gridqueue.ledger import Ledger
from gridqueue.presence import Presence
from gridqueue.settings import Settings
from tests.helpers import register_sim_worker, wait_for


@pytest.fixture
def presence(ledger: Ledger, settings: Settings) -> Iterator[Presence]:
    holder = Presence(settings.redis_target, ledger.keys.presence("w1"), 0.1, "w1")
    holder.start()
    wait_for(lambda: holder.up, timeout_s=10)
    yield holder
    holder.stop()


def _late(ledger: Ledger) -> None:
    """Sleep until a heartbeat sent now would be late by more than one interval."""
    time.sleep(ledger.settings.heartbeat_interval_s * 1.5)


def _token(ledger: Ledger) -> str:
    held, token = ledger.lease("test-watchdog", 60_000)
    assert held
    return token


def test_late_worker_with_closed_subscription_is_dead_on_the_connection_signal(
    ledger: Ledger, presence: Presence
) -> None:
    epoch = register_sim_worker(ledger, "w1")
    ledger.heartbeat("w1", epoch, present=presence.up)
    _late(ledger)
    assert ledger.scan().unreachable_workers == []  # late, but still subscribed
    assert ledger.declare_dead("w1", _token(ledger), "connection") is None

    presence.stop()  # the process's connection closes

    assert ledger.scan().unreachable_workers == ["w1"]
    assert ledger.declare_dead("w1", _token(ledger), "connection") == 0
    record = ledger.worker("w1")
    assert record is not None and record.state.value == "DEAD"
    (_, incident), *_ = ledger.client.xrange(ledger.keys.incidents)
    assert incident["signal"] == "connection"


def test_a_fresh_heartbeat_outweighs_a_closed_subscription(
    ledger: Ledger, presence: Presence
) -> None:
    epoch = register_sim_worker(ledger, "w1")
    ledger.heartbeat("w1", epoch, present=True)
    presence.stop()
    ledger.heartbeat("w1", epoch, present=False)  # beating on time, subscription gone

    assert ledger.scan().unreachable_workers == []
    assert ledger.declare_dead("w1", _token(ledger), "connection") is None
    assert ledger.worker("w1").state.value == "ALIVE"  # type: ignore[union-attr]


def test_a_worker_never_seen_subscribed_is_judged_by_its_heartbeat_only(
    ledger: Ledger,
) -> None:
    """No subscription seen in this incarnation (an older worker, or one that has not
    subscribed yet): a late beat with no subscriber is no verdict."""
    epoch = register_sim_worker(ledger, "w1")
    ledger.heartbeat("w1", epoch, present=False)
    _late(ledger)
    assert ledger.scan().unreachable_workers == []
    assert ledger.declare_dead("w1", _token(ledger), "connection") is None


def test_a_new_incarnation_must_be_seen_subscribed_again(
    ledger: Ledger, presence: Presence
) -> None:
    first = register_sim_worker(ledger, "w1")
    ledger.heartbeat("w1", first, present=True)
    presence.stop()
    second = ledger.register("w1", ["sim-llm"], 100, "node", 2, "{}")  # same pid and host
    assert second == first + 1
    _late(ledger)
    assert ledger.scan().unreachable_workers == []
    assert ledger.declare_dead("w1", _token(ledger), "connection") is None


def test_connection_signal_off_reads_no_subscription(
    settings: Settings, presence: Presence
) -> None:
    off = Ledger(
        redis.Redis.from_url(settings.redis_url, decode_responses=True),
        settings.model_copy(update={"connection_signal": False}),
    )
    epoch = register_sim_worker(off, "w1")
    off.heartbeat("w1", epoch, present=True)
    presence.stop()
    _late(off)
    assert off.scan().unreachable_workers == []
    assert off.declare_dead("w1", _token(off), "connection") is None
    off.client.close()
