"""GPU health on real parts: simulated GPUs with injected faults, real workers, a real
watchdog. Quarantine, drain, probation, flapping, fit checks and a hung NVML."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue
from gridqueue.errors import DoesNotFitError, NoCapacityError
from gridqueue.faults import clear_faults, inject_fault
from gridqueue.fleet import LocalFleet
from gridqueue.probes.simulated import Fault
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

# Short health timings so each test takes seconds; the behaviour is the defaults'.
HEALTH_ENV = {
    "GRIDQUEUE_HEALTH_DEGRADED_PERSIST_S": "0.5",
    "GRIDQUEUE_HEALTH_PROBE_TIMEOUT_S": "0.5",
    "GRIDQUEUE_PROBATION_BASE_S": "1",
}


@pytest.fixture
def health_fleet(redis_url: str, tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = LocalFleet(redis_url, tmp_path / "logs", env=HEALTH_ENV)
    yield fleet
    fleet.stop_all()


@pytest.fixture
def gq(redis_url: str) -> Iterator[GridQueue]:
    client = GridQueue(settings=Settings(redis_url=redis_url, probation_base_s=1))
    yield client
    client.close()


def claims_by(gq: GridQueue, worker: str, after_ms: int) -> list[dict[str, str]]:
    return [
        e
        for e in gq.ledger.events(count=100_000)
        if e["type"] == "claimed" and e["worker"] == worker and int(e["ts"]) > after_ms
    ]


def test_xid_79_quarantines_moves_running_jobs_and_stops_claims(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    for name in ("w1", "w2"):
        health_fleet.start_worker(name, concurrency=2)
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1", "w2"])
    jobs = [gq.submit("sim-llm", {"prompt": f"p{i}", "ms": 3000}) for i in range(4)]
    wait_for(lambda: all(j.status() is JobState.RUNNING for j in jobs))
    sick = gq.get(jobs[0].id).worker
    assert sick is not None
    on_sick = [j.id for j in jobs if gq.get(j.id).worker == sick]

    injected_ms = gq.ledger.time_ms()
    inject_fault(gq.settings, sick, 0, Fault(xid=(79,)))

    record = wait_for(
        lambda: (w := gq.ledger.worker(sick)) and w.state is WorkerState.QUARANTINED and w,
        timeout_s=10,
    )
    assert record.quarantined_ms - injected_ms <= 2000
    assert record.quarantined_by == "health" and "xid_79:gpu0" in record.quarantine_reason
    for job in jobs:
        assert job.result(timeout=60)["worker"] != sick or job.id not in on_sick
    for job_id in on_sick:
        attempts = gq.get(job_id).attempts
        assert (attempts[0].worker, attempts[0].outcome) == (sick, "gpu_fault")
        assert attempts[-1].outcome == "succeeded" and attempts[-1].worker != sick
    # Still alive and heartbeating, yet it takes nothing new.
    more = [gq.submit("sim-llm", {"prompt": f"m{i}", "ms": 100}) for i in range(6)]
    for job in more:
        assert job.result(timeout=60)["worker"] != sick
    assert claims_by(gq, sick, record.quarantined_ms) == []
    assert gq.ledger.worker(sick).state is WorkerState.QUARANTINED
    assert gq.status()["placements"]["bad"] == len(on_sick)


def test_temperature_fault_drains_running_jobs_in_place(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    for name in ("w1", "w2"):
        health_fleet.start_worker(name, concurrency=1)
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1", "w2"])
    job = gq.submit("sim-llm", {"prompt": "hot", "ms": 4000})
    hot = wait_for(lambda: gq.get(job.id).worker)

    inject_fault(gq.settings, hot, 0, Fault(temperature_c=95.0))
    record = wait_for(
        lambda: (w := gq.ledger.worker(hot)) and w.state is WorkerState.QUARANTINED and w,
        timeout_s=10,
    )

    assert record.quarantine_mode == "drain"
    assert any(r.startswith("temperature_95C") for r in record.quarantine_reason.split(","))
    result = job.result(timeout=30)
    assert result == {**result, "worker": hot, "attempt": 1}  # finished where it was
    assert gq.submit("sim-llm", {"prompt": "next", "ms": 50}).result(timeout=30)["worker"] != hot


def test_recovery_goes_through_probation_before_readmission(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    health_fleet.start_worker("w1")
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1"])
    inject_fault(gq.settings, "w1", 0, Fault(ecc_dbe=True))
    wait_for(lambda: gq.ledger.worker("w1").state is WorkerState.QUARANTINED, timeout_s=10)

    clear_faults(gq.settings, "w1")

    probation = wait_for(
        lambda: (w := gq.ledger.worker("w1")) and w.state is WorkerState.PROBATION and w,
        timeout_s=10,
    )
    assert probation.probation_until_ms is not None
    assert gq.ledger.worker("w1").state is WorkerState.PROBATION  # not re-admitted at once
    wait_for(lambda: gq.ledger.worker("w1").state is WorkerState.ALIVE, timeout_s=15)
    assert gq.submit("sim-llm", {"prompt": "back", "ms": 50}).result(timeout=30)["worker"] == "w1"
    kinds = [e["type"] for e in gq.ledger.events() if e.get("worker") == "w1"]
    assert kinds.index("worker_quarantined") < kinds.index("worker_probation")
    assert kinds.index("worker_probation") < kinds.index("worker_readmitted")


def test_a_flapping_node_serves_a_longer_probation_each_time(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    health_fleet.start_worker("w1")
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1"])
    delays = []
    for _ in range(3):
        inject_fault(gq.settings, "w1", 0, Fault(xid=(48,)))
        wait_for(lambda: gq.ledger.worker("w1").state is WorkerState.QUARANTINED, timeout_s=10)
        clear_faults(gq.settings, "w1")
        wait_for(lambda: gq.ledger.worker("w1").state is WorkerState.ALIVE, timeout_s=30)
        last = [e for e in gq.ledger.events() if e["type"] == "worker_probation"][-1]
        delays.append(int(last["delay_ms"]))
    assert delays == [1000, 2000, 4000]


def test_admission_refuses_what_cannot_fit_or_has_no_capacity(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    health_fleet.start_worker("w1", models="sim-llm,sim-llm-70b")
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1"])

    with pytest.raises(DoesNotFitError) as too_big:
        gq.submit("sim-llm-70b", {"prompt": "x"})
    message = str(too_big.value)
    assert "sim-llm-70b" in message and "140.0 GiB" in message and "80.0 GiB" in message
    assert "w1" in message

    with pytest.raises(NoCapacityError) as nobody:
        gq.submit("sim-embed", {"prompt": "x"})
    assert "sim-embed" in str(nobody.value) and "none registered" in str(nobody.value)

    gq.ledger.quarantine("w1", "operator:test", "maintenance")
    with pytest.raises(NoCapacityError) as quarantined:
        gq.submit("sim-llm", {"prompt": "x"})
    assert "w1 (QUARANTINED" in str(quarantined.value)
    batch = gq.submit("sim-llm", {"prompt": "x", "ms": 10}, workload="batch")  # batch waits
    assert batch.status() is JobState.QUEUED
    assert gq.ledger.counts()["QUEUED"] == 1  # the refused ones wrote nothing


def test_hung_nvml_keeps_heartbeats_and_reads_unresponsive(
    health_fleet: LocalFleet, gq: GridQueue
) -> None:
    health_fleet.start_worker("w1")
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1"])

    inject_fault(gq.settings, "w1", 0, Fault(nvml_hang=True))

    record = wait_for(
        lambda: (w := gq.ledger.worker("w1")) and w.verdict == "UNHEALTHY" and w, timeout_s=10
    )
    assert "nvml_unresponsive" in record.health["reasons"]
    first_beat = record.last_heartbeat_ms
    wait_for(lambda: gq.ledger.worker("w1").last_heartbeat_ms > first_beat + 500, timeout_s=5)
    assert gq.ledger.worker("w1").state is WorkerState.QUARANTINED  # alive, but no new work
    clear_faults(gq.settings, "w1")
    wait_for(lambda: gq.ledger.worker("w1").verdict == "HEALTHY", timeout_s=10)


def test_operator_quarantine_drain_and_release_record_who_and_why(
    health_fleet: LocalFleet, gq: GridQueue, redis_url: str
) -> None:
    for name in ("w1", "w2"):
        health_fleet.start_worker(name, concurrency=1)
    health_fleet.start_watchdog()
    health_fleet.wait_alive(gq.ledger, ["w1", "w2"])
    job = gq.submit("sim-llm", {"prompt": "move me", "ms": 3000})
    busy = wait_for(lambda: gq.get(job.id).worker)
    cli = [sys.executable, "-m", "gridqueue.cli"]

    subprocess.run(
        [*cli, "quarantine", busy, "--reason", "fan failure", "--redis", redis_url],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    record = gq.ledger.worker(busy)
    assert record.state is WorkerState.QUARANTINED and record.quarantine_reason == "fan failure"
    assert record.quarantined_by.startswith("operator:")
    # The watchdog applies the policy on its next tick; the outcome names the cause.
    wait_for(lambda: gq.get(job.id).attempts[0].outcome is not None, timeout_s=10)
    assert gq.get(job.id).attempts[0].outcome == "evacuated"
    assert job.result(timeout=60)["worker"] != busy

    subprocess.run([*cli, "release", busy, "--redis", redis_url], check=True, timeout=60)
    assert gq.ledger.worker(busy).state is WorkerState.ALIVE
    released = [e for e in gq.ledger.events() if e["type"] == "worker_released"][-1]
    assert released["by"].startswith("operator:")

    slow = gq.submit("sim-llm", {"prompt": "stay", "ms": 2500})
    placed = wait_for(lambda: gq.get(slow.id).worker)
    subprocess.run(
        [*cli, "drain", placed, "--reason", "kernel upgrade", "--redis", redis_url],
        check=True, timeout=60,
    )  # fmt: skip
    assert gq.ledger.worker(placed).quarantine_mode == "drain"
    assert slow.result(timeout=30)["worker"] == placed  # drained: it finished in place
    after = gq.submit("sim-llm", {"prompt": "elsewhere", "ms": 50})
    assert after.result(timeout=30)["worker"] != placed
