"""The simulated probe: each injected fault, the verdict it earns, and a hang."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from gridqueue.health import HealthClassifier, HealthConfig, HealthLevel, Verdict
from gridqueue.probes import (
    DeadlineReader,
    Fault,
    ProbeReading,
    SimulatedProbe,
    make_probe,
)

GIB = 2**30
# The reader's deadline: long enough that a read which waited a deadline of its own cannot
# be mistaken for one that answered at once, whatever the machine's load.
TIMEOUT_S = 1.0
# A hang never ends by itself, so any finite bound shows that the deadline ended the read;
# this one leaves room for a slow, busy machine.
SLACK_S = 10.0


def wait_until_responsive(reader: DeadlineReader, timeout_s: float = SLACK_S) -> ProbeReading:
    give_up_at = time.monotonic() + timeout_s
    while (reading := reader.read()).unresponsive:
        assert time.monotonic() < give_up_at, "the probe still reads unresponsive"
        time.sleep(0.02)
    return reading


class Faults:
    """A fault source the test edits while the probe reads it (as Redis would be)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[int, Fault] = {}

    def set(self, gpu: int, fault: Fault) -> None:
        with self._lock:
            self._faults[gpu] = fault

    def clear(self) -> None:
        with self._lock:
            self._faults = {}

    def __call__(self) -> dict[int, Fault]:
        with self._lock:
            return dict(self._faults)


@pytest.fixture
def faults() -> Iterator[Faults]:
    faults = Faults()
    yield faults
    faults.clear()  # never leave a read hanging


@pytest.fixture
def probe(faults: Faults) -> SimulatedProbe:
    return SimulatedProbe(2, "Simulated H100 80GB", 80.0, faults)


def verdict(reading: ProbeReading) -> Verdict:
    return HealthClassifier(HealthConfig()).update(reading, now_s=0.0)


def test_healthy_gpus(probe: SimulatedProbe) -> None:
    reading = probe.read()
    assert reading.probe == "simulated"
    assert not reading.unresponsive
    assert reading.error is None
    assert [gpu.index for gpu in reading.gpus] == [0, 1]
    gpu = reading.gpus[0]
    assert gpu.name == "Simulated H100 80GB"
    assert gpu.memory_total_bytes == 80 * GIB
    assert gpu.memory_used_bytes is not None and 0 < gpu.memory_used_bytes < 80 * GIB
    assert gpu.utilization_ratio is not None and 0 <= gpu.utilization_ratio <= 1
    assert gpu.temperature_c == pytest.approx(45.0, abs=5)
    assert gpu.uuid != reading.gpus[1].uuid
    assert verdict(reading) == Verdict(HealthLevel.HEALTHY, ())


def test_without_a_fault_source() -> None:
    probe = SimulatedProbe(1, "Simulated L4", 24.0)
    assert probe.read().gpus[0].memory_total_bytes == 24 * GIB


@pytest.mark.parametrize(
    ("fault", "level", "reasons"),
    [
        (Fault(xid=(79,)), HealthLevel.UNHEALTHY, ("xid_79:gpu1",)),
        (Fault(xid=(63,)), HealthLevel.DEGRADED, ("xid_63:gpu1",)),
        (Fault(xid=(13,)), HealthLevel.HEALTHY, ()),
        (Fault(xid=(999,)), HealthLevel.DEGRADED, ("xid_unknown_999:gpu1",)),
        (Fault(gpu_lost=True), HealthLevel.UNHEALTHY, ("gpu_lost:gpu1",)),
        (Fault(ecc_dbe=True), HealthLevel.UNHEALTHY, ("ecc_dbe:gpu1",)),
        (Fault(temperature_c=95.0), HealthLevel.HEALTHY, ()),  # not yet persisted
    ],
)
def test_each_fault_and_its_verdict(
    probe: SimulatedProbe,
    faults: Faults,
    fault: Fault,
    level: HealthLevel,
    reasons: tuple[str, ...],
) -> None:
    faults.set(1, fault)
    reading = probe.read()
    assert reading.gpus[0] == SimulatedProbe(2, "Simulated H100 80GB", 80.0).read().gpus[0]
    assert verdict(reading) == Verdict(level, reasons)
    faults.clear()
    assert verdict(probe.read()) == Verdict(HealthLevel.HEALTHY, ())


def test_injected_xids_are_counted(probe: SimulatedProbe, faults: Faults) -> None:
    faults.set(0, Fault(xid=(13, 79, 79)))
    assert probe.read().gpus[0].xid_counts == {13: 1, 79: 2}


def test_a_lost_gpu_reads_nothing_else(probe: SimulatedProbe, faults: Faults) -> None:
    faults.set(0, Fault(gpu_lost=True))
    gpu = probe.read().gpus[0]
    assert gpu.lost is True
    assert gpu.temperature_c is None
    assert gpu.memory_total_bytes is None
    assert gpu.name is None


def test_ecc_and_temperature_faults_set_their_fields(probe: SimulatedProbe, faults: Faults) -> None:
    faults.set(0, Fault(ecc_dbe=True, temperature_c=91.0))
    gpu = probe.read().gpus[0]
    assert gpu.ecc_uncorrected_volatile == 1
    assert gpu.temperature_c == 91.0


def test_a_hot_gpu_is_degraded_once_that_persisted(probe: SimulatedProbe, faults: Faults) -> None:
    config = HealthConfig()
    classifier = HealthClassifier(config)
    faults.set(0, Fault(temperature_c=95.0))
    assert classifier.update(probe.read(), now_s=0.0).level is HealthLevel.HEALTHY
    assert classifier.update(probe.read(), now_s=config.degraded_persist_s) == Verdict(
        HealthLevel.DEGRADED, ("temperature_95C:gpu0",)
    )


def test_a_fault_on_a_gpu_that_does_not_exist_is_ignored(
    probe: SimulatedProbe, faults: Faults
) -> None:
    faults.set(7, Fault(gpu_lost=True))
    assert verdict(probe.read()).level is HealthLevel.HEALTHY


def test_an_nvml_hang_is_unresponsive_through_the_deadline_reader(
    probe: SimulatedProbe, faults: Faults
) -> None:
    reader = DeadlineReader(probe, TIMEOUT_S)
    faults.set(0, Fault(nvml_hang=True))
    started = time.monotonic()
    hung = reader.read()
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert hung == ProbeReading(
        probe="simulated", gpus=(), unresponsive=True, error=f"probe read exceeded {TIMEOUT_S:g} s"
    )
    assert verdict(hung) == Verdict(HealthLevel.UNHEALTHY, ("nvml_unresponsive",))
    before = {thread.ident for thread in threading.enumerate()}
    started = time.monotonic()
    again = reader.read()  # at once, and without a second reader thread
    # It joined the read in flight, whose deadline has passed: one that waited a deadline
    # of its own would take at least TIMEOUT_S.
    assert time.monotonic() - started < TIMEOUT_S
    assert again.unresponsive
    assert again.error is not None and "still hung after" in again.error
    assert {thread.ident for thread in threading.enumerate()} <= before

    faults.clear()
    reading = wait_until_responsive(reader)
    assert verdict(reading) == Verdict(HealthLevel.HEALTHY, ())


def test_closing_the_probe_ends_a_hung_read(probe: SimulatedProbe, faults: Faults) -> None:
    faults.set(0, Fault(nvml_hang=True))
    reader = DeadlineReader(probe, TIMEOUT_S)
    assert reader.read().unresponsive
    probe.close()
    wait_until_responsive(reader)


def test_fault_round_trips_through_json() -> None:
    fault = Fault(xid=(79, 13), gpu_lost=True, ecc_dbe=True, temperature_c=90.5, nvml_hang=True)
    assert Fault.from_dict(json.loads(json.dumps(fault.to_dict()))) == fault
    assert Fault.from_dict({}) == Fault()
    assert Fault.from_dict({"xid": [79], "future_fault": True}) == Fault(xid=(79,))


def test_fault_merge() -> None:
    merged = Fault(xid=(79,), temperature_c=90.0).merge(
        Fault(xid=(79, 63), ecc_dbe=True, nvml_hang=True)
    )
    assert merged == Fault(xid=(79, 63), ecc_dbe=True, temperature_c=90.0, nvml_hang=True)
    assert Fault(temperature_c=90.0).merge(Fault(temperature_c=70.0)).temperature_c == 70.0
    assert Fault(gpu_lost=True).merge(Fault()) == Fault(gpu_lost=True)


def test_make_probe_simulated(faults: Faults) -> None:
    faults.set(0, Fault(xid=(79,)))
    probe, note = make_probe(
        "simulated", sim_gpus=3, sim_gpu_name="Sim A10", sim_gpu_memory_gb=24, fault_source=faults
    )
    assert isinstance(probe, SimulatedProbe)
    assert "simulated" in note
    reading = probe.read()
    assert [gpu.name for gpu in reading.gpus] == ["Sim A10"] * 3
    assert reading.gpus[0].memory_total_bytes == 24 * GIB
    assert verdict(reading) == Verdict(HealthLevel.UNHEALTHY, ("xid_79:gpu0",))
