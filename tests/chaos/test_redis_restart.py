"""Chaos: Redis is killed and restarted (AOF, appendfsync everysec) while every worker
runs a job. The fleet must come through it: no worker process exits, every job ends,
and every worker takes new work afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.states import WorkerState
from tests.helpers import wait_for

pytestmark = pytest.mark.chaos

WORKERS = ("w1", "w2", "w3")


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(appendonly=True, appendfsync="everysec")
    server.start()
    yield server
    server.cleanup()


def test_workers_come_through_a_redis_restart(own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    gq = GridQueue(own_redis.url)
    fleet = LocalFleet(own_redis.url, tmp_path / "logs")
    try:
        for name in WORKERS:
            fleet.start_worker(name, concurrency=1)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, list(WORKERS))
        payloads = [{"prompt": f"r{i}", "ms": 4000, "retry_ms": 300} for i in range(3)]
        jobs = [gq.submit("sim-llm", payload) for payload in payloads]
        wait_for(lambda: sum(gq.get(j.id).worker is not None for j in jobs) == 3)

        assert own_redis.process is not None
        own_redis.process.kill()  # kill -9: the AOF keeps all but the last second
        own_redis.process.wait()
        time.sleep(1.0)
        own_redis.start()

        for job in jobs:
            job.result(timeout=90)
        exited = [n for n in WORKERS if not fleet.processes[n].alive()]
        assert exited == [], [fleet.processes[n].log_path.read_text()[-2000:] for n in exited]
        # Each worker serves again (a node that fenced itself joins on probation first).
        for name in WORKERS:
            gq.ledger.release(name, "test")  # skip any probation: we want work on each
        wait_for(
            lambda: all(
                (w := gq.ledger.worker(n)) is not None and w.state is WorkerState.ALIVE
                for n in WORKERS
            ),
            timeout_s=30,
        )
        after = [gq.submit("sim-llm", {"prompt": f"a{i}", "ms": 1500}) for i in range(6)]
        served = {job.result(timeout=60)["worker"] for job in after}
        assert served == set(WORKERS)
    finally:
        fleet.stop_all()
        gq.close()
