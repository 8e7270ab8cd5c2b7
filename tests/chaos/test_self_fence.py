"""Chaos: a worker cut off from Redis fences itself before its jobs move elsewhere."""

from __future__ import annotations

import time

import pytest

from gridqueue import GridQueue
from gridqueue.chaosproxy import TcpProxy
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.states import WorkerState
from tests.chaos.test_chaos import pid_exists
from tests.helpers import wait_for

pytestmark = pytest.mark.chaos


def test_a_partitioned_worker_kills_its_children_before_its_jobs_run_elsewhere(
    fleet: LocalFleet, gq: GridQueue, redis_server: EmbeddedRedis
) -> None:
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    try:
        fleet.start_worker("cut", concurrency=1, env={"GRIDQUEUE_REDIS_URL": proxy.url()})
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, ["cut"])
        job = gq.submit("sim-llm", {"prompt": "island", "ms": 20_000, "retry_ms": 300})
        record = wait_for(lambda: (r := gq.get(job.id)).worker == "cut" and r)
        child = record.attempts[0].pid
        assert child and pid_exists(child)
        fleet.start_worker("w2", concurrency=1)  # somewhere for the job to go
        fleet.wait_alive(gq.ledger, ["w2"])

        proxy.partition()
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
