"""An attempt that ends through the ledger is acked without a second round trip to Redis.

On the Redis broker, the ledger script that ends an attempt (``complete`` or ``finish``)
also takes its delivery out of kombu's ``unacked`` and ``unacked_index``. The worker's
main process then acks the message in kombu's memory only: no ``MULTI; ZREM; HDEL;
EXEC``. A delivery the ledger did not release (refused at claim, stale, a duplicate) is
acked through Redis as before. Real parts throughout: a private redis-server and a real
worker with one pool slot, so a delivery that kombu kept counting as unacked would stop
the worker from taking the next one.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from kombu.exceptions import MessageStateError

from gridqueue import GridQueue
from gridqueue.celeryapp import TASK_NAME, ack_released
from gridqueue.fleet import LocalFleet
from gridqueue.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, attempt_id, queue_for_model
from gridqueue.runner import RELEASED_MARK
from gridqueue.settings import Settings
from gridqueue.states import JobState
from tests.brokers import broker_env, unacked_messages
from tests.helpers import wait_for
from workers.simulated import complete_text

pytestmark = pytest.mark.integration

SUCCEEDING = 30
FAILING = 10  # invalid input: the ledger ends the job at once (finish.lua)


def calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran ``command`` since the last CONFIG RESETSTAT, direct
    calls and calls inside scripts together."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@contextmanager
def commands_sent(url: str) -> Iterator[list[str]]:
    """Every command clients send Redis directly (not from inside a script) while the block
    runs, as MONITOR reports them: Redis's own record of what each client asked."""
    sent: list[str] = []
    started = threading.Event()

    def watch(monitor: Any) -> None:
        started.set()
        try:
            for seen in monitor.listen():
                if seen.get("client_type") != "lua":
                    sent.append(str(seen["command"]))
        except (redis.ConnectionError, ValueError, AttributeError):
            pass  # the block ended: its connection was closed under it

    client = redis.Redis.from_url(url)
    monitor = client.monitor().__enter__()
    thread = threading.Thread(target=watch, args=(monitor,), daemon=True)
    thread.start()
    started.wait(5)
    try:
        yield sent
    finally:
        monitor.connection.disconnect()
        thread.join(5)
        client.close()


def kombu_unacked(client: redis.Redis) -> tuple[int, int]:
    return int(client.hlen(KOMBU_UNACKED)), int(client.zcard(KOMBU_UNACKED_INDEX))


def heard_results(pubsub: Any) -> list[str]:
    """The ``result`` of every ``task-succeeded`` event heard so far."""
    results = []
    quiet = 0
    while quiet < 5:  # half a second with nothing more (a subscription's reply reads None)
        heard = pubsub.get_message(timeout=0.1)
        if heard is None:
            quiet += 1
            continue
        quiet = 0
        body = json.loads(base64.b64decode(json.loads(heard["data"])["body"]))
        for event in body if isinstance(body, list) else [body]:  # task.multi: a batch
            if event.get("type") == "task-succeeded":
                results.append(str(event["result"]))
    return results


def test_an_in_memory_ack_frees_the_prefetch_slot_and_sends_redis_nothing(redis_url: str) -> None:
    """kombu's own state after ``ack_released`` is that after an ack: the message is
    acknowledged (a second ack raises), the channel may consume again under prefetch 1;
    and Redis still has the entry, which only the ledger's script removes."""
    client = redis.Redis.from_url(redis_url)
    k: Any = kombu  # kombu ships no type hints
    with k.Connection(redis_url) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        queue = k.Queue("released-acks", channel=channel)
        queue.declare()
        k.Producer(channel).publish({"n": 1}, routing_key="released-acks")
        message = wait_for(lambda: queue.get(no_ack=False))
        tag = message.delivery_tag
        assert not channel.qos.can_consume()
        assert client.hexists(KOMBU_UNACKED, tag) and client.zscore(KOMBU_UNACKED_INDEX, tag)
        client.config_resetstat()

        assert ack_released(message)

        assert message.acknowledged and channel.qos.can_consume()
        assert client.hexists(KOMBU_UNACKED, tag)  # left for the ledger's script
        assert calls(client, "hdel") == calls(client, "zrem") == calls(client, "exec") == 0
        assert not ack_released(message)  # once only
        with pytest.raises(MessageStateError):
            message.ack()
        channel.close()
    client.close()


def test_attempts_the_ledger_ended_are_acked_in_memory_and_the_worker_keeps_consuming(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    worker = fleet.start_worker("w1", concurrency=1)
    fleet.wait_alive(gq.ledger, ["w1"])
    client = gq.ledger.client
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev/task.*")
    client.config_resetstat()

    succeeding = [gq.submit("sim-llm", {"prompt": f"p{i}", "ms": 0}) for i in range(SUCCEEDING)]
    failing = [
        gq.submit("sim-llm", {"prompt": f"f{i}", "ms": 0, "fail": "invalid"})
        for i in range(FAILING)
    ]

    # One slot, prefetch one: had kombu kept counting an acked delivery, the worker would
    # have stopped taking messages after the first.
    for i, job in enumerate(succeeding):
        assert job.result(timeout=60)["text"] == complete_text(f"p{i}")
    for job in failing:
        record = wait_for(lambda job=job: (r := gq.get(job.id)).terminal and r)
        assert record.state is not JobState.SUCCEEDED
        assert [a.outcome for a in record.attempts] == ["invalid_input"]
    # Nothing is left in kombu's unacked, in Redis (the ledger took each entry out) ...
    assert kombu_unacked(client) == (0, 0)
    deliveries = SUCCEEDING + FAILING
    # ... and no ack went there again: each delivery's own MULTI/EXEC (kombu's append of
    # the message to unacked) and nothing more, but for a little background work. The
    # usual ack doubled both.
    assert calls(client, "exec") <= 1.2 * deliveries, calls(client, "exec")
    assert calls(client, "multi") <= 1.2 * deliveries, calls(client, "multi")
    # Flower sees the result it always saw: the released tag is not part of it.
    results = heard_results(pubsub)
    pubsub.close()
    assert len(results) == SUCCEEDING, results
    assert all(r.endswith(" succeeded'") and RELEASED_MARK not in r for r in results), results
    # The worker is still taking work, and never acked a message twice.
    late = gq.submit("sim-llm", {"prompt": "late", "ms": 0})
    assert late.result(timeout=60)["text"] == complete_text("late")
    assert worker.alive()
    log = worker.log_path.read_text(errors="replace")
    assert "MessageStateError" not in log and "already acknowledged" not in log, log[-3000:]


def test_a_retried_attempt_is_acked_in_memory_and_its_successor_runs(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    """A transient error: finish.lua ends the attempt, queues the next one and releases
    the delivery in one step. The in-memory ack must not strand the job: every retry is
    published and run, each delivery leaves unacked, and no ack goes to Redis again."""
    fleet.start_worker("w1", concurrency=1)
    fleet.wait_alive(gq.ledger, ["w1"])
    client = gq.ledger.client
    attempts = gq.ledger.workloads["realtime"].max_attempts
    with commands_sent(gq.settings.redis_url) as sent:
        jobs = [
            gq.submit("sim-llm", {"prompt": f"t{i}", "ms": 0, "fail": "transient"})
            for i in range(5)
        ]
        for job in jobs:
            record = wait_for(lambda job=job: (r := gq.get(job.id)).terminal and r, 60)
            assert record.state is JobState.FAILED
            assert [a.outcome for a in record.attempts] == ["error"] * attempts
    assert kombu_unacked(client) == (0, 0)
    # Every delivery was taken (kombu's record of it, in MULTI), and none was acked through
    # Redis (kombu's ack removes that record with a direct HDEL): the ledger released each.
    # Counted by name, so Celery's own occasional MULTI (its mailbox's queue sizes) is not.
    recorded = [c for c in sent if c.startswith("HSET unacked ")]
    acked_in_redis = [c for c in sent if c.startswith("HDEL unacked ")]
    assert len(recorded) == len(jobs) * attempts, len(recorded)
    assert acked_in_redis == [], acked_in_redis
    late = gq.submit("sim-llm", {"prompt": "after", "ms": 0})
    assert late.result(timeout=60)["text"] == complete_text("after")


def test_a_delivery_the_ledger_did_not_release_is_acked_in_redis(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    """A second copy of an attempt that already succeeded: its claim is refused as stale,
    the ledger removes nothing for it, so the worker's ack must go to Redis."""
    fleet.start_worker("w1", concurrency=1)
    fleet.wait_alive(gq.ledger, ["w1"])
    client = gq.ledger.client
    job = gq.submit("sim-llm", {"prompt": "once", "ms": 0})
    assert job.result(timeout=60)["text"] == complete_text("once")
    wait_for(lambda: kombu_unacked(client) == (0, 0))
    client.config_resetstat()

    gq.dispatcher.app.send_task(
        TASK_NAME,
        args=[job.id, 1],
        task_id=attempt_id(job.id, 1),
        queue=queue_for_model(gq.settings.namespace, "sim-llm"),
    )

    wait_for(lambda: gq.ledger.stats().get("stale_deliveries", 0) == 1)
    # The copy was in unacked while it ran (kombu's append) and its ack took it out.
    wait_for(lambda: kombu_unacked(client) == (0, 0))
    assert calls(client, "exec") >= 2  # the append and the ack
    record = gq.get(job.id)
    assert [(a.n, a.outcome) for a in record.attempts] == [(1, "succeeded")]


@pytest.mark.parametrize("broker_url", ["amqp"], indirect=True)
def test_on_rabbitmq_every_ack_goes_to_the_broker(
    redis_url: str, broker_url: str, tmp_path: Path
) -> None:
    """The ledger's scripts release nothing RabbitMQ holds: the worker acks each message
    to the broker as usual, whatever the ledger's reply said."""
    gq = GridQueue(settings=Settings(redis_url=redis_url, broker_url=broker_url))
    fleet = LocalFleet(redis_url, tmp_path / "logs", env=broker_env(broker_url))
    try:
        fleet.start_worker("w1", concurrency=1)
        fleet.wait_alive(gq.ledger, ["w1"])
        jobs = [gq.submit("sim-llm", {"prompt": f"p{i}", "ms": 0}) for i in range(5)]
        failing = gq.submit("sim-llm", {"prompt": "f", "ms": 0, "fail": "invalid"})
        for i, job in enumerate(jobs):
            assert job.result(timeout=60)["text"] == complete_text(f"p{i}")
        wait_for(lambda: gq.get(failing.id).terminal)
        queue = queue_for_model(gq.settings.namespace, "sim-llm")
        wait_for(lambda: unacked_messages(broker_url, queue) == 0, timeout_s=30, interval_s=0.5)
    finally:
        fleet.stop_all()
        gq.close()
