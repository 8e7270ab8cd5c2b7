"""Chaos: a frozen node holds no message once it is declared dead.

A consumer frozen (SIGSTOP) in the middle of a ``BRPOP`` is still a blocked client to
Redis: a message published to its queue is popped into a socket that no one reads, and it
is then in neither the queue nor kombu's ``unacked``. On the heartbeat verdict the
watchdog kills the node's broker connections (named ``gridqueue-broker:<worker>``) before
it publishes the node's attempts again, and publishes again at once what the frozen
consumer had popped. When the node thaws, the fences refuse whatever it still holds.
"""

from __future__ import annotations

import signal
import time

import pytest

from gridqueue import GridQueue
from gridqueue.audit import audit
from gridqueue.celeryapp import broker_client_name, priority_lists
from gridqueue.fleet import LocalFleet
from gridqueue.keys import queue_for_model
from gridqueue.presence import client_name as presence_client_name
from gridqueue.states import JobState, WorkerState
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.chaos


def _clients(gq: GridQueue, name: str) -> list[dict[str, str]]:
    return [c for c in gq.ledger.client.client_list() if c.get("name") == name]


def _brpop_pending(gq: GridQueue, worker: str) -> bool:
    """The worker's consumer is blocked on a BRPOP right now."""
    return any(
        c.get("cmd") == "brpop" and "b" in c.get("flags", "")
        for c in _clients(gq, broker_client_name(worker))
    )


def _queued_messages(gq: GridQueue, model: str) -> int:
    queue = queue_for_model(gq.ledger.settings.namespace, model)
    return sum(int(gq.ledger.client.llen(name)) for name in priority_lists(queue))


def _running_on(gq: GridQueue, job_id: str, worker: str) -> bool:
    record = gq.get(job_id)
    return record.state is JobState.RUNNING and record.worker == worker


def test_frozen_node_is_cut_off_and_its_jobs_run_elsewhere_at_once(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    fleet.start_worker("w1", concurrency=2)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])
    wait_until_watchdog_judges(gq.ledger)
    # The worker registers before its consumer connects: on a busy machine that can lag.
    assert wait_for(lambda: _clients(gq, broker_client_name("w1")), timeout_s=30), (
        "the worker's broker connections are named"
    )
    held = gq.submit("sim-llm", {"prompt": "held", "ms": 6000})
    wait_for(lambda: _running_on(gq, held.id, "w1"))
    # w1 has one free slot, so its consumer waits on a BRPOP (kombu's lasts 1 s). Freeze
    # the node while that BRPOP is pending; if it ended just then, thaw and try again
    # (well before the node could be judged).
    for _ in range(10):
        wait_for(lambda: _brpop_pending(gq, "w1"), timeout_s=10, interval_s=0.005)
        fleet.kill("w1", signal.SIGSTOP)  # the whole process group: a silent node
        if _brpop_pending(gq, "w1"):
            break
        fleet.kill("w1", signal.SIGCONT)
    else:
        pytest.fail("could not freeze w1 with a BRPOP pending")
    # Fresh work published while the node is silent, but before its verdict: the frozen
    # BRPOP pops it into the socket no one reads. Exclusive: it must never run twice.
    popped = gq.submit("sim-llm", {"prompt": "popped", "ms": 300}, workload="exclusive")
    wait_for(lambda: _queued_messages(gq, "sim-llm") == 0, timeout_s=2, interval_s=0.01)

    fleet.start_worker("w2", concurrency=2)  # the only other consumer, started now
    wait_for(lambda: (w := gq.ledger.worker("w1")) and w.state is WorkerState.DEAD)
    # Cut on the verdict, while w1 is still frozen; its presence connection is left alone.
    assert wait_for(lambda: not _clients(gq, broker_client_name("w1")), timeout_s=5)
    assert _clients(gq, presence_client_name("w1"))
    fleet.wait_alive(gq.ledger, ["w2"])
    ready_at = time.monotonic()

    # Both run on w2 at once: not after the 30 s check for messages that are nowhere.
    wait_for(lambda: gq.get(held.id).attempt == 2 and _running_on(gq, held.id, "w2"), timeout_s=10)
    assert popped.result(timeout=10)["attempt"] == 1
    assert time.monotonic() - ready_at < 10
    assert gq.get(popped.id).attempts[0].worker == "w2"
    events = gq.ledger.events(count=100_000)
    assert [e["job"] for e in events if e["type"] == "message_lost"] == [popped.id]

    # The node thaws: its heartbeat is refused, it registers again, and whatever it still
    # held (attempt 1 of `held`, the message it popped) is refused by the fences.
    fleet.kill("w1", signal.SIGCONT)
    wait_for(
        lambda: (w := gq.ledger.worker("w1")) and w.state is not WorkerState.DEAD, timeout_s=30
    )
    assert held.result(timeout=30)["attempt"] == 2
    time.sleep(2 * gq.ledger.settings.stale_after_s)  # room for a late zombie claim
    result = audit(gq.ledger, [held.id, popped.id])
    assert result.lost == [] and result.duplicates == [] and result.succeeded == 2
    assert result.exclusive_runs_over_one == []
    record = gq.get(popped.id)
    assert [a.worker for a in record.attempts] == ["w2"]
    assert gq.get(held.id).attempts[0].outcome == "node_lost"
