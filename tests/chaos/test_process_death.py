"""Chaos: a process death is noticed from its closed connection, and nothing else is.

A worker's main process holds a presence subscription; kill -9 closes it, and the watchdog
declares the node dead on the connection signal, well before ``stale_after_s``. A worker
whose subscription alone is dropped (``CLIENT KILL``) takes it again and is never declared
dead while it heartbeats, nor is a healthy fleet whose CPUs are saturated by other work.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from gridqueue import GridQueue
from gridqueue.audit import audit
from gridqueue.fleet import LocalFleet
from gridqueue.presence import client_name
from gridqueue.states import JobState, WorkerState
from tests.helpers import hist_count, wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.chaos


def _presence_seen(gq: GridQueue, name: str) -> bool:
    """Redis has seen the worker's subscription in its current incarnation."""
    epoch, seen = gq.ledger.client.hmget(gq.ledger.keys.worker(name), "epoch", "presence_epoch")
    return epoch is not None and epoch == seen


def _subscribers(gq: GridQueue, name: str) -> int:
    return int(gq.ledger.client.pubsub_numsub(gq.ledger.keys.presence(name))[0][1])


def _deaths(gq: GridQueue) -> list[dict[str, str]]:
    return [e for e in gq.ledger.events(count=100_000) if e["type"] == "worker_dead"]


def _incidents(gq: GridQueue) -> list[dict[str, str]]:
    entries = gq.ledger.client.xrange(gq.ledger.keys.incidents)
    return [fields for _, fields in entries if fields.get("kind") == "worker_dead"]


def test_kill9_is_detected_by_the_closed_connection(fleet: LocalFleet, gq: GridQueue) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name, concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    wait_until_watchdog_judges(gq.ledger)
    wait_for(lambda: _presence_seen(gq, "w1") and _presence_seen(gq, "w2"))
    job = gq.submit("sim-llm", {"prompt": "die", "ms": 4000, "retry_ms": 300})
    record = wait_for(lambda: (r := gq.get(job.id)).state is JobState.RUNNING and r)
    victim = record.worker
    assert victim in ("w1", "w2")

    fleet.kill(victim)  # kill -9 of the whole process group

    assert job.result(timeout=60)["attempt"] == 2
    (incident,) = _incidents(gq)
    assert incident["worker"] == victim
    assert incident["signal"] == "connection"
    assert incident["reason"].startswith("connection closed")
    # The verdict came before the heartbeat alone could have brought it.
    stale_ms = gq.ledger.settings.stale_after_s * 1000
    assert int(incident["verdict_ms"]) - int(incident["sign_ms"]) < stale_ms
    hist = gq.ledger.histograms()
    assert hist_count(hist, "detect|kind=worker_dead_connection") == 1
    assert hist_count(hist, "detect|kind=worker_dead") == 0
    assert gq.get(job.id).attempts[0].outcome == "node_lost"
    result = audit(gq.ledger, [job.id])
    assert result.lost == [] and result.duplicates == [] and result.succeeded == 1


# Each of its 25 drops must be healed within 1 s: beside other tests, a worker starved of
# the CPU can miss that by load alone.
@pytest.mark.serial
def test_dropped_subscription_alone_is_no_death(fleet: LocalFleet, gq: GridQueue) -> None:
    """CLIENT KILL of the presence connection, again and again, while the worker heartbeats
    and runs a job: it subscribes again each time, and is never declared dead."""
    fleet.start_worker("w1", concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])
    wait_until_watchdog_judges(gq.ledger)
    wait_for(lambda: _presence_seen(gq, "w1"))
    epoch = gq.ledger.worker("w1").epoch  # type: ignore[union-attr]
    job = gq.submit("sim-llm", {"prompt": "steady", "ms": 6000})
    wait_for(lambda: gq.get(job.id).state is JobState.RUNNING)
    client = gq.ledger.client
    name = client_name("w1")

    kills = 0
    give_up_at = time.monotonic() + 60
    while kills < 25 and time.monotonic() < give_up_at:
        wait_for(lambda: _subscribers(gq, "w1") == 1, timeout_s=5, interval_s=0.005)
        targets = [c for c in client.client_list() if c.get("name") == name]
        assert len(targets) == 1, targets
        client.client_kill_filter(_id=targets[0]["id"])
        kills += 1
        # Back within a heartbeat interval (it is typically back in about a millisecond).
        wait_for(lambda: _subscribers(gq, "w1") == 1, timeout_s=1.0, interval_s=0.002)
        time.sleep(0.17)  # the next kill lands in another part of the heartbeat period

    assert kills == 25
    assert job.result(timeout=60)["attempt"] == 1  # never moved
    record = gq.ledger.worker("w1")
    assert record is not None
    assert record.state is WorkerState.ALIVE and record.epoch == epoch
    assert _deaths(gq) == []
    assert gq.ledger.stats().get("heartbeats_refused", 0) == 0


@pytest.fixture
def cpu_load() -> Iterator[Callable[[int], None]]:
    """Starts busy loops (unrelated CPU load); stops them at the end of the test."""
    hogs: list[subprocess.Popen[bytes]] = []

    def start(count: int) -> None:
        hogs.extend(
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
        )

    try:
        yield start
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=10)


# It saturates both CPUs itself: beside other tests it would starve them, and be starved.
@pytest.mark.serial
def test_saturated_cpus_declare_no_healthy_worker_dead(
    fleet: LocalFleet, gq: GridQueue, cpu_load: Callable[[int], None]
) -> None:
    """Both cores of this machine busy with other work for a while: heartbeats come late,
    but every subscription holds, so the connection signal declares no one dead (nor does
    the heartbeat, whose stale_after_s is five intervals).

    "A while" is eight seconds: eight stale_after_s periods (forty heartbeat intervals) of
    saturation, each a chance for a late heartbeat or a dropped subscription to be judged.
    The sixty-second version of this drill is a benchmark (false deaths under load)."""
    names = ["w1", "w2"]
    for name in names:
        fleet.start_worker(name, concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, names)
    wait_until_watchdog_judges(gq.ledger)
    wait_for(lambda: all(_presence_seen(gq, n) for n in names))
    epochs = {n: gq.ledger.worker(n).epoch for n in names}  # type: ignore[union-attr]

    cpu_load(2)
    jobs = [gq.submit("sim-llm", {"prompt": f"busy-{i}", "ms": 300}) for i in range(6)]
    time.sleep(8 * gq.ledger.settings.stale_after_s)

    for job in jobs:
        job.result(timeout=60)
    assert _deaths(gq) == []
    for name in names:
        record = gq.ledger.worker(name)
        assert record is not None
        assert record.state is WorkerState.ALIVE and record.epoch == epochs[name]
