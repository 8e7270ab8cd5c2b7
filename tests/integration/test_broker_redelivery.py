"""What each broker does with a dead consumer's message, on real parts: a private
redis-server, real workers and watchdog, and (for the ``amqp`` cases) the test RabbitMQ
under this session's private vhost.

kombu's Redis transport keeps a delivered message in ``unacked`` and never redelivers it
(gridqueue's visibility timeout is ten years): the watchdog's sweep takes it back.
RabbitMQ redelivers a dead consumer's unacked messages itself, at once: the ledger's
fences make that harmless, and the watchdog publishes nothing for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from gridqueue import GridQueue
from gridqueue.audit import run_counts
from gridqueue.fleet import LocalFleet
from gridqueue.keys import attempt_id, queue_for_model
from gridqueue.settings import Settings
from gridqueue.states import JobState
from tests.brokers import AmqpVhost, broker_env, unacked_messages
from tests.helpers import wait_for, wait_until_watchdog_judges
from workers.simulated import complete_text

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(redis_url: str, broker_url: str | None) -> Settings:
    return Settings(redis_url=redis_url, broker_url=broker_url)


@pytest.fixture
def fleet(redis_url: str, broker_url: str | None, tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = LocalFleet(redis_url, tmp_path / "logs", env=broker_env(broker_url))
    yield fleet
    fleet.stop_all()


def ready_messages(broker_url: str, queue: str) -> int:
    """Messages waiting in a RabbitMQ queue (not those held by a consumer)."""
    k: Any = kombu
    with k.Connection(broker_url, connect_timeout=5) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).message_count)


def wait_for_acks(broker_url: str, queue: str) -> None:
    """Wait until no message of ``queue`` is held unacked. A worker acks an attempt's
    message just after the attempt's result is in the ledger; stopped in that moment, it
    hands the message back, and a test that stops it once the result is in would find a
    copy in the queue that was never refused. A copy held and never acked still fails
    here, after the timeout."""
    wait_for(lambda: unacked_messages(broker_url, queue) == 0, timeout_s=30, interval_s=0.5)


def test_a_node_killed_holding_an_unclaimed_message_loses_no_job_and_runs_it_once(
    fleet: LocalFleet, gq: GridQueue, redis_url: str, broker_url: str | None
) -> None:
    """A node takes a message and is SIGKILLed before claiming it. On Redis the watchdog's
    sweep publishes the attempt again; on RabbitMQ the broker redelivers it at once and
    the watchdog publishes nothing. Either way the job runs exactly once."""
    fleet.start_watchdog()
    queue = queue_for_model(gq.settings.namespace, "sim-llm")
    taker = subprocess.Popen(
        [sys.executable, "-m", "gridqueue.faults", "take", redis_url, queue, "60"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **broker_env(broker_url)},
    )
    try:
        job = gq.submit("sim-llm", {"prompt": "held", "ms": 50}, workload="batch")
        assert taker.stdout is not None
        taken = json.loads(taker.stdout.readline())
        assert taken["task_id"] == attempt_id(job.id, 1)
    finally:
        os.killpg(taker.pid, signal.SIGKILL)  # the node dies holding the message
        taker.wait(timeout=30)
        if taker.stdout is not None:
            taker.stdout.close()
    fleet.start_worker("w1")

    assert job.result(timeout=90)["text"] == complete_text("held")
    record = gq.get(job.id)
    assert [(a.n, a.worker, a.outcome) for a in record.attempts] == [(1, "w1", "succeeded")]
    assert run_counts(gq.ledger.client, gq.settings.namespace, [job.id])[job.id] == 1
    stats = gq.ledger.stats()
    if broker_url is None:
        assert stats["stranded_deliveries"] == 1
    else:
        # The broker's own redelivery carried it: no sweep, no second publish, no copy.
        for stat in ("stranded_deliveries", "lost_messages", "duplicate_deliveries"):
            assert stats.get(stat, 0) == 0, (stat, stats)
        assert ready_messages(broker_url, queue) == 0


def test_a_redelivered_copy_of_a_superseded_attempt_is_refused_and_acked(
    fleet: LocalFleet, gq: GridQueue, broker_url: str | None
) -> None:
    """A node dies while running an attempt. On RabbitMQ its message comes back at once
    and reaches the survivor while the ledger still has the attempt running on the dead
    node: the claim refuses it, the survivor acks it, and the attempt the watchdog
    publishes after the verdict is the one that runs."""
    fleet.start_worker("w1", concurrency=1)
    fleet.start_worker("w2", concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    wait_until_watchdog_judges(gq.ledger)
    job = gq.submit("sim-llm", {"prompt": "redelivered", "ms": 3000})
    victim = wait_for(lambda: (r := gq.get(job.id)).state is JobState.RUNNING and r.worker)
    survivor = "w2" if victim == "w1" else "w1"

    fleet.kill(victim, signal.SIGKILL)

    assert job.result(timeout=60)["text"] == complete_text("redelivered")
    history = [(a.n, a.worker, a.outcome) for a in gq.get(job.id).attempts]
    assert history == [(1, victim, "node_lost"), (2, survivor, "succeeded")]
    stats = gq.ledger.stats()
    if broker_url is not None:
        # The broker's copy of attempt 1 reached the survivor and was refused: as a
        # duplicate while the ledger still had it running on the dead node, as stale after.
        refused = stats.get("duplicate_deliveries", 0) + stats.get("stale_deliveries", 0)
        assert refused >= 1, stats
        assert stats.get("stranded_deliveries", 0) == 0, stats
        # Acked, not held: nothing is left unacked, and once the survivor stops (which
        # hands back whatever it holds) the queue is empty.
        queue = queue_for_model(gq.settings.namespace, "sim-llm")
        wait_for_acks(broker_url, queue)
        fleet.stop(survivor)
        assert ready_messages(broker_url, queue) == 0


def test_a_child_killed_before_its_claim_runs_its_job_once_and_leaves_no_copy(
    fleet: LocalFleet, gq: GridQueue, broker_url: str | None
) -> None:
    """A pool child dies after Celery handed it the attempt and before its claim. Celery
    hands the message back to the broker (RabbitMQ redelivers it at once) and the worker
    agent publishes the attempt again: two copies, one run; the other copy is refused and
    acked, so nothing is left in the queue."""
    fleet.start_worker("w1", concurrency=1, handlers="tests.integration.die_before_claim")
    fleet.wait_alive(gq.ledger, ["w1"])
    job_id = "1" * 32
    gq.ledger.client.sadd(f"{gq.settings.namespace}:test:die_before_claim", job_id)
    submitted = gq.ledger.submit(
        job_id, "sim-llm", "batch", '{"prompt":"orphaned","ms":50}', 60_000, None
    )
    assert gq.dispatcher.publish(attempt_id(job_id, 1), submitted.dispatch_lease)

    assert gq.job(job_id).result(timeout=60)["text"] == complete_text("orphaned")
    assert [(a.n, a.outcome) for a in gq.get(job_id).attempts] == [(1, "succeeded")]
    assert run_counts(gq.ledger.client, gq.settings.namespace, [job_id])[job_id] == 1
    assert gq.ledger.stats()["redeliveries"] == 1
    queue = queue_for_model(gq.settings.namespace, "sim-llm")
    if broker_url is None:
        wait_for(lambda: gq.ledger.client.hlen("unacked") == 0)
    else:

        def refused() -> int:
            stats = gq.ledger.stats()
            return stats.get("stale_deliveries", 0) + stats.get("duplicate_deliveries", 0)

        # Celery's requeue and the agent's publish: the copy that did not run was refused.
        wait_for(lambda: refused() == 1)
        wait_for_acks(broker_url, queue)
        fleet.stop("w1")  # hands back anything it still held unacked
        assert ready_messages(broker_url, queue) == 0


@pytest.mark.parametrize("broker_url", ["amqp"], indirect=True)
def test_rabbitmq_queues_carry_priorities_and_the_consumer_timeout(
    fleet: LocalFleet, gq: GridQueue, amqp_vhost: AmqpVhost
) -> None:
    vhost = amqp_vhost
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    queue = queue_for_model(gq.settings.namespace, "sim-llm")
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost.name, "name", "arguments", "durable", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [line] = [row for row in listed.splitlines() if row.startswith(queue + "\t")]
    assert "x-max-priority" in line and "9" in line, line
    expected_ms = gq.settings.broker_consumer_timeout_s * 1000
    assert "x-consumer-timeout" in line and str(expected_ms) in line, line
    assert line.rstrip().endswith("true"), line  # durable: a broker restart keeps it


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("password", "refused the login"),
        ("vhost", "refused the login"),
        ("port", "cannot reach the broker"),
        ("scheme", "must be an amqp:// or amqps:// URL"),
    ],
)
def test_a_broker_url_that_cannot_serve_is_one_line_exit_2_and_nothing_written(
    redis_url: str, amqp_vhost: AmqpVhost, broken: str, message: str
) -> None:
    good = amqp_vhost.url
    scheme, _, rest = good.partition("://")
    userinfo, _, location = rest.partition("@")
    host_port, _, _vhost = location.partition("/")
    url = {
        "password": f"{scheme}://{userinfo.partition(':')[0]}:not-the-password@{location}",
        "vhost": f"{scheme}://{userinfo}@{host_port}/no-such-vhost-here",
        "port": f"{scheme}://{userinfo}@127.0.0.1:1/{_vhost}",
        "scheme": f"kafka://{userinfo}@{location}",
    }[broken]
    cli = [sys.executable, "-m", "gridqueue.cli", "submit", "sim-llm", "--redis", redis_url]
    env = {**os.environ, "GRIDQUEUE_BROKER_URL": url, "COLUMNS": "60"}
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert message in line and "GRIDQUEUE_BROKER_URL" in line, line
    assert "not-the-password" not in line
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.close()
