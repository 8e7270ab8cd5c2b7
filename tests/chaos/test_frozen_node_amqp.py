"""Chaos: on RabbitMQ, a frozen node holds no message once it is declared dead.

A stopped process keeps its AMQP connection, and RabbitMQ pushes messages into its free
prefetch slots, where nobody claims them, until it sees the connection's heartbeats stop
(about two AMQP heartbeats, 20 s). Every connection of a worker carries its name
(``connection_name``), and on the heartbeat verdict the watchdog closes them through the
management API before it publishes the node's attempts again: RabbitMQ returns what they
held at once. The broker is a private RabbitMQ node with the management plugin, so the
machine's shared RabbitMQ is never touched.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue
from gridqueue.audit import audit
from gridqueue.brokers.amqp import AMQP_HEARTBEAT_S, ManagementTarget
from gridqueue.celeryapp import broker_client_name
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState
from tests.brokers import HOW_TO_RUN, PrivateRabbitMQ
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.chaos


@pytest.fixture
def rabbitmq() -> Iterator[PrivateRabbitMQ]:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip(f"rabbitmq-server is not installed; to run this test, {HOW_TO_RUN}")
    # Not under tmp_path: rabbitmq-server runs as the rabbitmq user, which must reach it.
    base = Path(tempfile.mkdtemp(prefix="gridqueue-rabbitmq-"))
    node = PrivateRabbitMQ(base, management=True)
    try:
        node.prepare()
        node.start(timeout_s=120)
        yield node
    finally:
        node.kill()
        shutil.rmtree(base, ignore_errors=True)


def _running_on(gq: GridQueue, job_id: str, worker: str) -> bool:
    record = gq.get(job_id)
    return record.state is JobState.RUNNING and record.worker == worker


def test_frozen_node_on_rabbitmq_is_cut_off_and_its_jobs_run_elsewhere_at_once(
    redis_url: str, rabbitmq: PrivateRabbitMQ, tmp_path: Path
) -> None:
    # The watchdog finds the management API from the broker URL alone (same host and
    # login, port 15672) unless told: this node listens elsewhere, so it is told.
    env = {
        "GRIDQUEUE_BROKER_URL": rabbitmq.url,
        "GRIDQUEUE_BROKER_MANAGEMENT_URL": rabbitmq.management_url,
    }
    settings = Settings(
        redis_url=redis_url, broker_url=rabbitmq.url, broker_management_url=rabbitmq.management_url
    )
    management = ManagementTarget.of(rabbitmq.url, rabbitmq.management_url)
    assert management is not None
    gq = GridQueue(settings=settings)
    fleet = LocalFleet(redis_url, tmp_path / "logs", env=env)
    try:
        fleet.start_worker("w1", concurrency=2)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, ["w1"])
        wait_until_watchdog_judges(gq.ledger)
        named = {broker_client_name("w1")}
        assert wait_for(lambda: management.connections_named(named), timeout_s=10), (
            "the worker's AMQP connections carry its name"
        )
        held = gq.submit("sim-llm", {"prompt": "held", "ms": 6000})
        wait_for(lambda: _running_on(gq, held.id, "w1"))

        # w1 has one free prefetch slot. Frozen, it keeps its connection; fresh work
        # published now is pushed into that slot. Exclusive: it must never run twice.
        fleet.kill("w1", signal.SIGSTOP)  # the whole process group: a silent node
        popped = gq.submit("sim-llm", {"prompt": "popped", "ms": 300}, workload="exclusive")
        time.sleep(0.3)  # delivered to w1's free slot (w1 is the only consumer)

        fleet.start_worker("w2", concurrency=2)  # the only other consumer, started now
        wait_for(lambda: (w := gq.ledger.worker("w1")) and w.state is WorkerState.DEAD)
        fleet.wait_alive(gq.ledger, ["w2"])
        ready_at = time.monotonic()

        # Both run on w2 well before RabbitMQ would have noticed the silent connection.
        wait_for(
            lambda: gq.get(held.id).attempt == 2 and _running_on(gq, held.id, "w2"),
            timeout_s=AMQP_HEARTBEAT_S,
        )
        assert popped.result(timeout=AMQP_HEARTBEAT_S)["attempt"] == 1
        assert time.monotonic() - ready_at < AMQP_HEARTBEAT_S
        assert [a.worker for a in gq.get(popped.id).attempts] == ["w2"]

        # The node thaws: its heartbeat is refused, it registers again, and whatever its
        # consumer still believed it held is refused by the fences.
        fleet.kill("w1", signal.SIGCONT)
        wait_for(
            lambda: (w := gq.ledger.worker("w1")) and w.state is not WorkerState.DEAD,
            timeout_s=60,
        )
        assert held.result(timeout=30)["attempt"] == 2
        time.sleep(2 * settings.stale_after_s)  # room for a late zombie claim
        result = audit(gq.ledger, [held.id, popped.id])
        assert result.lost == [] and result.duplicates == [] and result.succeeded == 2
        assert result.exclusive_runs_over_one == []
        assert gq.get(held.id).attempts[0].outcome == "node_lost"
    finally:
        fleet.stop_all()
        gq.close()
