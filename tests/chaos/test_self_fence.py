"""Chaos: a worker cut off from Redis fences itself.

A partition that loses packets leaves the node's connections open, so Redis still counts
its presence subscription, and only the heartbeat's silence tells: the node fences itself
(kills its children) before the watchdog could move their jobs. A partition that closes
the connections (a middlebox's resets) looks to Redis like a process death, and the job
moves at once, on the connection signal, while the cut-off child may still run for up to
``stale_after_s``, until the node fences itself: its result is never shown, and nothing
else of it reaches the ledger.
"""

from __future__ import annotations

import time

import pytest

from gridqueue import GridQueue
from gridqueue.audit import audit
from gridqueue.chaosproxy import TcpProxy
from gridqueue.client import Job
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.states import WorkerState
from tests.chaos.test_chaos import pid_exists
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.chaos


def _cut_node_running_a_long_job(
    fleet: LocalFleet, gq: GridQueue, proxy: TcpProxy, prompt: str
) -> tuple[Job, int]:
    """Worker "cut" reaches Redis through ``proxy`` and runs a 20 s job (its retry is
    short); worker "w2" is there for the job to go to. The watchdog judges, and Redis has
    seen cut's presence subscription. Returns the job and cut's child running it."""
    fleet.start_worker("cut", concurrency=1, env={"GRIDQUEUE_REDIS_URL": proxy.url()})
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["cut"])
    wait_until_watchdog_judges(gq.ledger)
    wait_for(lambda: _presence_seen(gq, "cut"))
    job = gq.submit("sim-llm", {"prompt": prompt, "ms": 20_000, "retry_ms": 300})
    record = wait_for(lambda: (r := gq.get(job.id)).worker == "cut" and r)
    child = record.attempts[0].pid
    assert child and pid_exists(child)
    fleet.start_worker("w2", concurrency=1)  # somewhere for the job to go
    fleet.wait_alive(gq.ledger, ["w2"])
    return job, child


def test_a_partitioned_worker_kills_its_children_before_its_jobs_run_elsewhere(
    fleet: LocalFleet, gq: GridQueue, redis_server: EmbeddedRedis
) -> None:
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    try:
        job, child = _cut_node_running_a_long_job(fleet, gq, proxy, "island")

        proxy.partition()  # silent: packets lost, connections open
        # Watch both events at a fine grain: the child's death (the node's own doing, as
        # it cannot reach Redis) and the job's next attempt starting elsewhere.
        child_gone = moved = None
        give_up_at = time.monotonic() + 60
        while (child_gone is None or moved is None) and time.monotonic() < give_up_at:
            now = time.monotonic()
            if child_gone is None and not pid_exists(child):
                child_gone = now
            if moved is None and gq.get(job.id).attempt >= 2:
                moved = now
            time.sleep(0.01)
        assert child_gone is not None, "the cut-off node never killed its running child"
        assert moved is not None, "the job never moved to another worker"
        assert child_gone <= moved + 0.02, (
            f"the job was requeued {child_gone - moved:.3f} s before the cut-off child died"
        )
        assert "worker.self_fenced" in fleet.processes["cut"].log_path.read_text()
        # Redis still counted the silent node's subscription: the heartbeat decided.
        (incident,) = _deaths(gq)
        assert incident.get("signal", "heartbeat") == "heartbeat", incident

        result = job.result(timeout=60)
        assert result["worker"] == "w2" and result["attempt"] == 2
        assert gq.ledger.stats().get("stale_results_discarded", 0) == 0  # nothing ran on

        # Healed, it was declared dead meanwhile: fenced, it joins again as a new
        # incarnation on probation, and only then consumes.
        proxy.heal()
        wait_for(lambda: gq.ledger.worker("cut").epoch == 2, 30)  # type: ignore[union-attr]
        assert gq.ledger.worker("cut").state is WorkerState.PROBATION  # type: ignore[union-attr]
    finally:
        proxy.close()


def _deaths(gq: GridQueue) -> list[dict[str, str]]:
    entries = gq.ledger.client.xrange(gq.ledger.keys.incidents)
    return [fields for _, fields in entries if fields.get("kind") == "worker_dead"]


def test_a_partition_that_closes_connections_moves_the_job_at_once_and_shows_nothing_twice(
    fleet: LocalFleet, gq: GridQueue, redis_server: EmbeddedRedis
) -> None:
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    try:
        job, child = _cut_node_running_a_long_job(fleet, gq, proxy, "reset")

        cut_at = time.monotonic()
        proxy.partition(reset=True)
        # To Redis every connection of the node closed: a process death, declared on the
        # connection signal, before stale_after_s.
        result = job.result(timeout=60)
        assert result["worker"] == "w2" and result["attempt"] == 2
        (incident,) = _deaths(gq)
        assert incident["worker"] == "cut" and incident["signal"] == "connection", incident
        stale_ms = gq.ledger.settings.stale_after_s * 1000
        assert int(incident["verdict_ms"]) - int(incident["sign_ms"]) < stale_ms
        # The node could not reach Redis either: it fenced itself and killed the child,
        # which outlived the move by less than a stale_after period (generous bound here).
        wait_for(lambda: not pid_exists(child), timeout_s=10)
        assert time.monotonic() - cut_at < 10
        assert "worker.self_fenced" in fleet.processes["cut"].log_path.read_text()

        proxy.heal()
        wait_for(lambda: gq.ledger.worker("cut").epoch == 2, 30)  # type: ignore[union-attr]
        time.sleep(2 * gq.ledger.settings.stale_after_s)  # room for a late zombie report
        audit_result = audit(gq.ledger, [job.id])
        assert audit_result.duplicates == [] and audit_result.lost == []
        assert gq.get(job.id).attempts[0].outcome == "node_lost"
        assert [a.worker for a in gq.get(job.id).attempts] == ["cut", "w2"]
    finally:
        proxy.close()


def _presence_seen(gq: GridQueue, name: str) -> bool:
    epoch, seen = gq.ledger.client.hmget(gq.ledger.keys.worker(name), "epoch", "presence_epoch")
    return epoch is not None and epoch == seen
