"""HA: the ledger and the broker on a Redis primary watched by three Sentinels.

A real primary, a replica and three ``redis-server --sentinel`` processes on loopback
ports; a fleet of real workers and a watchdog given only the Sentinels' addresses. The
primary is killed with SIGKILL under load: the Sentinels promote the replica, every
process follows it without a restart, and every acknowledged job ends, once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from gridqueue import GridQueue
from gridqueue.audit import Seen, audit
from gridqueue.celeryapp import priority_lists
from gridqueue.embedded_sentinel import EmbeddedSentinelSet
from gridqueue.errors import GridQueueError, JobEndedError, ReplicationTimeoutError
from gridqueue.fleet import LocalFleet
from gridqueue.keys import queue_for_model
from gridqueue.settings import Settings
from tests.helpers import wait_for

# Serial, and with down-after-milliseconds 3000: a Sentinel failover lets a primary be
# silent that long, and a host starved by other test processes (or, on slower cores, by
# the test's own fleet while the old primary resyncs) outlasted 1000. The spurious second
# failover that follows, onto the old primary before it has resynced, loses what that
# primary never had: the window docs/operations.md says to keep out of.
pytestmark = [pytest.mark.ha, pytest.mark.serial]
DOWN_AFTER_MS = 3000

WORKERS = ("w1", "w2")


@pytest.fixture
def sentinels() -> Iterator[EmbeddedSentinelSet]:
    ha = EmbeddedSentinelSet(replicas=1, sentinels=3, down_after_ms=DOWN_AFTER_MS)
    ha.start()
    yield ha
    ha.cleanup()


class Producer:
    """Submits a job every ``every_s`` on its own thread; keeps what was acknowledged."""

    def __init__(self, gq: GridQueue, every_s: float = 0.05) -> None:
        self.gq = gq
        self.every_s = every_s
        self.acknowledged: list[tuple[float, str]] = []  # (monotonic time, job id)
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                job = self.gq.submit("sim-llm", {"prompt": f"ha-{n}", "ms": 400})
            except GridQueueError as exc:  # e.g. no replica confirmed it: not acknowledged
                self.refused.append(type(exc).__name__)
            else:
                self.acknowledged.append((time.monotonic(), job.id))
            self._stop.wait(self.every_s)


def test_the_fleet_follows_a_promoted_replica_and_every_acknowledged_job_ends(
    sentinels: EmbeddedSentinelSet, tmp_path: Path
) -> None:
    env = sentinels.env(min_replicas=1)
    settings = Settings(
        redis_url=sentinels.url,
        redis_sentinel_master=sentinels.master_name,
        redis_min_replicas=1,
    )
    gq = GridQueue(settings=settings)
    fleet = LocalFleet(sentinels.url, tmp_path / "logs", env=env)
    producer = Producer(gq)
    try:
        for name in WORKERS:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, list(WORKERS))
        producer.start()
        wait_for(lambda: len(producer.acknowledged) >= 30, timeout_s=60)

        old = sentinels.kill_primary()
        killed_at = time.monotonic()
        new = sentinels.wait_promoted(old)
        assert new != old
        # Back as a replica of the new primary: durable writes have a replica again.
        sentinels.restart(old, new)
        sentinels.wait_replicas(1)
        # The ledger's scripts run from their function library on the new primary too.
        listed = gq.ledger.client.function_list()
        names = [dict(zip(e[::2], e[1::2], strict=True))["library_name"] for e in listed]
        assert gq.ledger.scripts.library.name in names
        wait_for(lambda: sum(t > killed_at for t, _ in producer.acknowledged) >= 30, timeout_s=90)
        producer.stop()

        acknowledged = [job_id for _, job_id in producer.acknowledged]
        seen: dict[str, Seen] = {}
        for job_id in acknowledged:
            job = gq.job(job_id)  # JobNotFoundError here is an acknowledged job lost
            try:
                seen[job_id] = Seen("SUCCEEDED", job.result(timeout=120))
            except JobEndedError:
                seen[job_id] = Seen(job.status().value, None)
        report = audit(gq.ledger, acknowledged, seen)
        assert report.lost == [], report.to_dict()
        assert report.duplicates == [], report.to_dict()
        assert report.succeeded >= len(acknowledged) - 5, report.to_dict()
        # Jobs accepted after the failover ran on the promoted primary's fleet.
        after = [job_id for t, job_id in producer.acknowledged if t > killed_at]
        assert all(seen[j].state == "SUCCEEDED" for j in after), report.to_dict()
        exited = [n for n in WORKERS if not fleet.processes[n].alive()]
        assert exited == [], [fleet.processes[n].log_path.read_text()[-2000:] for n in exited]
    finally:
        producer.stop()
        fleet.stop_all()
        gq.close()


def test_durable_submit_fails_clearly_without_a_replica(
    sentinels: EmbeddedSentinelSet,
) -> None:
    """With no replica to confirm it, a durable submit raises, naming the job; the job
    is still on the primary and runs unless a failover loses it."""
    replica = next(p for p in sentinels.data_ports if p != sentinels.primary_port())
    sentinels.kill(replica)
    settings = Settings(
        redis_url=sentinels.url,
        redis_sentinel_master=sentinels.master_name,
        redis_min_replicas=1,
        redis_replica_timeout_s=0.3,
    )
    gq = GridQueue(settings=settings)
    try:
        with pytest.raises(ReplicationTimeoutError) as raised:
            gq.submit(
                "sim-llm", {"prompt": "x", "ms": 0}, workload="batch", idempotency_key="durable-1"
            )
        assert raised.value.job_id
        assert "replica" in str(raised.value)
        assert gq.ledger.get(raised.value.job_id).state.value == "QUEUED"
        # It still has an owner that will move it: its message, which the submit script
        # pushed with the job (the broker is the ledger's Redis, through the Sentinels).
        member = f"{raised.value.job_id}.1"
        assert gq.ledger.client.zscore(gq.ledger.keys.dispatch, member) is None
        assert gq.ledger.client.zscore(gq.ledger.keys.published, member) is not None
        queue = queue_for_model(settings.namespace, "sim-llm")
        waiting = [
            json.loads(raw)["headers"]["id"]
            for name in priority_lists(queue)
            for raw in gq.ledger.client.lrange(name, 0, -1)
        ]
        assert waiting == [member]
    finally:
        gq.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gridqueue.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_reaches_the_ledger_through_the_sentinels(sentinels: EmbeddedSentinelSet) -> None:
    env = {**os.environ, **sentinels.env()}
    done = _cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert '"workers"' in done.stdout


def test_the_dashboard_follows_a_promoted_replica(sentinels: EmbeddedSentinelSet) -> None:
    """The dashboard's pages, API and readiness read the new primary after a failover,
    without a restart: a 503 while no primary answers, never a 500."""
    with warnings.catch_warnings():
        # Starlette's TestClient warns on import when it finds httpx (our dev extras).
        warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    from gridqueue.monitor.web import create_app

    settings = Settings(redis_url=sentinels.url, redis_sentinel_master=sentinels.master_name)
    gq = GridQueue(settings=settings)
    try:
        job = gq.submit("sim-llm", {"prompt": "before", "ms": 0}, workload="batch")
        assert gq.ledger.client.wait(1, 5000) == 1  # the replica has it before the kill
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").status_code == 200
            assert client.get(f"/api/jobs/{job.id}").json()["state"] == "QUEUED"
            old = sentinels.kill_primary()
            new = sentinels.wait_promoted(old)
            assert new != old

            def ready_again() -> bool:
                status = client.get("/readyz").status_code
                assert status in (200, 503), status  # never a 500
                return status == 200

            wait_for(ready_again, timeout_s=60, interval_s=0.2)
            # The job was replicated before the kill: the promoted primary has it.
            assert client.get(f"/api/jobs/{job.id}").json()["state"] == "QUEUED"
            assert client.get("/").status_code == 200
            assert client.get("/api/workers").status_code == 200
    finally:
        gq.close()
