"""Chaos: RabbitMQ, the fleet's broker, is killed with SIGKILL and restarted under load.

The broker is a private RabbitMQ node (its own name, ports, data and logs), so the
machine's shared RabbitMQ is never touched. The ledger stays on a private Redis. While
every worker runs an attempt and more wait in the queue, the node's Erlang VM is killed
and, after a pause, started again on the same data directory (durable queues, persistent
messages). Every job must end, none twice; no worker process may exit.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue
from gridqueue.audit import audit
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings
from tests.brokers import HOW_TO_RUN, PrivateRabbitMQ
from tests.helpers import wait_for
from workers.simulated import complete_text

pytestmark = pytest.mark.chaos

WORKERS = ("w1", "w2", "w3")


@pytest.fixture
def rabbitmq() -> Iterator[PrivateRabbitMQ]:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip(f"rabbitmq-server is not installed; to run this test, {HOW_TO_RUN}")
    # Not under tmp_path: rabbitmq-server runs as the rabbitmq user, which must reach it.
    base = Path(tempfile.mkdtemp(prefix="gridqueue-rabbitmq-"))
    node = PrivateRabbitMQ(base)
    try:
        node.prepare()
        node.start()
        yield node
    finally:
        node.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_every_job_ends_once_when_rabbitmq_is_killed_and_restarted_under_load(
    redis_url: str, rabbitmq: PrivateRabbitMQ, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, broker_url=rabbitmq.url)
    gq = GridQueue(settings=settings)
    fleet = LocalFleet(redis_url, tmp_path / "logs", env={"GRIDQUEUE_BROKER_URL": rabbitmq.url})
    try:
        for name in WORKERS:
            fleet.start_worker(name, concurrency=1)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, list(WORKERS))
        jobs = [gq.submit("sim-llm", {"prompt": f"r{i}", "ms": 1500}) for i in range(9)]
        # Exclusive jobs are not idempotent: one that started twice would show in the audit.
        jobs += [
            gq.submit("sim-llm", {"prompt": f"x{i}", "ms": 1500}, workload="exclusive")
            for i in range(3)
        ]
        ids = [job.id for job in jobs]
        wait_for(lambda: gq.ledger.counts()["RUNNING"] == len(WORKERS), timeout_s=60)

        assert rabbitmq.beam_pid() is not None
        rabbitmq.kill()
        assert not rabbitmq.answers(), "the broker still answers after SIGKILL"
        # Submitted while the broker is down: the ledger has them, the publish fails, and
        # the watchdog publishes them once the broker is back.
        late = [gq.submit("sim-llm", {"prompt": f"late{i}", "ms": 200}) for i in range(3)]
        ids += [job.id for job in late]
        time.sleep(3.0)
        rabbitmq.start()

        for job_id in ids:
            wait_for(lambda job_id=job_id: gq.get(job_id).terminal, timeout_s=180)
        report = audit(gq.ledger, ids)
        assert report.lost == [], report.to_dict()
        assert report.duplicates == [], report.to_dict()
        assert report.exclusive_runs_over_one == [], report.to_dict()
        # No node was lost (only the broker), so every job, exclusive ones too, succeeds.
        assert report.by_state["SUCCEEDED"] == len(ids), report.to_dict()
        exited = [n for n in WORKERS if not fleet.processes[n].alive]
        assert exited == [], [fleet.processes[n].log_path.read_text()[-2000:] for n in exited]
        # And the fleet still takes new work through the restarted broker.
        after = gq.submit("sim-llm", {"prompt": "after", "ms": 50})
        assert after.result(timeout=60)["text"] == complete_text("after")
    finally:
        fleet.stop_all()
        gq.close()
