"""The NVML probe against a fake NVML that raises the genuine pynvml errors."""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest

from gridqueue.errors import ConfigError
from gridqueue.health import HealthClassifier, HealthConfig, HealthLevel, Verdict
from gridqueue.probes import (
    DeadlineReader,
    NvmlProbe,
    ProbeReading,
    SimulatedProbe,
    make_probe,
)
from tests.fakes.fake_nvml import GIB, FakeGpu, FakeNvml

# The reader's deadline: long enough that a read which waited a deadline of its own cannot
# be mistaken for one that answered at once, whatever the machine's load.
TIMEOUT_S = 1.0
# A hung call never returns by itself, so any finite bound shows that the deadline ended
# the read; this one leaves room for thread start and scheduling on a slow, busy machine.
SLACK_S = 10.0


def verdict(reading: ProbeReading) -> Verdict:
    return HealthClassifier(HealthConfig()).update(reading, now_s=0.0)


def wait_for(condition: Callable[[], bool], timeout_s: float = SLACK_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    fake = FakeNvml(2)
    yield fake
    fake.release()  # never leave a thread blocked in the fake


@pytest.fixture
def probe(fake: FakeNvml) -> Iterator[NvmlProbe]:
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    yield probe
    probe.close()


def test_a_healthy_read_maps_every_field(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.gpus[1] = FakeGpu(
        name="NVIDIA H200",
        uuid="GPU-abc",
        memory_total_bytes=141 * GIB,
        memory_used_bytes=7 * GIB,
        utilization_percent=42,
        temperature_c=51,
        power_mw=312_500,
        power_limit_mw=700_000,
        clock_event_reasons=0x1,  # GPU idle
        remapped_rows=(3, 0, 0, 0),
    )
    probe.close()  # the GPU changed under the open probe: a GPU's UUID is read at open
    probe.open()
    reading = probe.read()
    assert reading.probe == "nvml"
    assert not reading.unresponsive
    assert reading.error is None
    assert [gpu.index for gpu in reading.gpus] == [0, 1]
    gpu = reading.gpus[1]
    assert gpu.name == "NVIDIA H200"
    assert gpu.uuid == "GPU-abc"
    assert gpu.memory_total_bytes == 141 * GIB
    assert gpu.memory_used_bytes == 7 * GIB
    assert gpu.utilization_ratio == pytest.approx(0.42)
    assert gpu.temperature_c == 51.0
    assert gpu.power_w == pytest.approx(312.5)
    assert gpu.power_limit_w == pytest.approx(700.0)
    assert gpu.clock_event_reasons == 0x1
    assert gpu.ecc_uncorrected_volatile == 0
    assert gpu.remap_pending is False
    assert gpu.remap_failure is False
    assert gpu.retired_pages_pending is False
    assert gpu.recovery_action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    assert gpu.lost is False
    assert gpu.reset_required is False
    assert gpu.xid_counts == {}
    assert verdict(reading) == Verdict(HealthLevel.HEALTHY, ())


def test_a_reading_round_trips_through_json(probe: NvmlProbe, fake: FakeNvml) -> None:
    fake.raise_xid(0, 13)
    wait_for(lambda: probe.read().gpus[0].xid_counts == {13: 1})
    reading = probe.read()
    assert ProbeReading.from_dict(json.loads(json.dumps(reading.to_dict()))) == reading


def test_unsupported_fields_are_none_and_healthy(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.gpus[0].not_supported = {
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetRetiredPagesPendingStatus",
        f"field:{pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION}",
    }
    reading = probe.read()
    gpu = reading.gpus[0]
    assert gpu.temperature_c == 45.0
    assert gpu.memory_total_bytes == 80 * GIB
    assert gpu.utilization_ratio is None
    assert gpu.power_w is None
    assert gpu.power_limit_w is None
    assert gpu.clock_event_reasons is None
    assert gpu.ecc_uncorrected_volatile is None
    assert gpu.remap_pending is None
    assert gpu.remap_failure is None
    assert gpu.retired_pages_pending is None
    assert gpu.recovery_action is None
    assert reading.error is None  # not supported is not an error
    assert verdict(reading) == Verdict(HealthLevel.HEALTHY, ())


def test_the_deprecated_temperature_call_is_the_fallback(fake: FakeNvml, probe: NvmlProbe) -> None:
    # A driver older than the binding lacks nvmlDeviceGetTemperatureV.
    fake.gpus[0].temperature_c = 60
    original = fake.nvmlDeviceGetTemperatureV

    def missing(handle: object, sensor: int) -> int:
        raise pynvml.NVMLError_FunctionNotFound()

    fake.nvmlDeviceGetTemperatureV = missing  # type: ignore[method-assign]
    try:
        assert probe.read().gpus[0].temperature_c == 60.0
    finally:
        fake.nvmlDeviceGetTemperatureV = original  # type: ignore[method-assign]
    assert fake.calls["nvmlDeviceGetTemperature"] >= 1


def test_a_lost_gpu_is_unhealthy(fake: FakeNvml, probe: NvmlProbe) -> None:
    probe.read()  # identity is known from before the GPU fell off the bus
    fake.gpus[1].lost = True
    reading = probe.read()
    lost = reading.gpus[1]
    assert lost.lost is True
    assert lost.uuid == fake.gpus[1].uuid
    assert lost.temperature_c is None
    assert lost.memory_total_bytes is None
    assert reading.gpus[0].lost is False
    assert verdict(reading) == Verdict(HealthLevel.UNHEALTHY, ("gpu_lost:gpu1",))


def test_a_gpu_that_needs_a_reset_is_unhealthy(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.gpus[0].reset_required = True
    reading = probe.read()
    assert reading.gpus[0].reset_required is True
    assert verdict(reading) == Verdict(HealthLevel.UNHEALTHY, ("reset_required:gpu0",))


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda gpu: setattr(gpu, "ecc_uncorrected_volatile", 2), "ecc_dbe:gpu0"),
        (lambda gpu: setattr(gpu, "remapped_rows", (0, 1, 0, 1)), "remap_failure:gpu0"),
        (lambda gpu: setattr(gpu, "recovery_action", 2), "recovery_action_reboot:gpu0"),
    ],
)
def test_hardware_faults_read_through_nvml_are_unhealthy(
    fake: FakeNvml, probe: NvmlProbe, setup: Callable[[FakeGpu], None], reason: str
) -> None:
    setup(fake.gpus[0])
    assert verdict(probe.read()) == Verdict(HealthLevel.UNHEALTHY, (reason,))


def test_pending_remaps_and_retirements_are_read(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.gpus[0].remapped_rows = (0, 1, 1, 0)
    fake.gpus[0].retired_pages_pending = 1
    gpu = probe.read().gpus[0]
    assert gpu.remap_pending is True
    assert gpu.remap_failure is False
    assert gpu.retired_pages_pending is True


def test_an_xid_79_is_counted_and_unhealthy(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.raise_xid(1, 79)
    wait_for(lambda: probe.read().gpus[1].xid_counts == {79: 1})
    reading = probe.read()
    assert reading.gpus[0].xid_counts == {}
    assert verdict(reading) == Verdict(HealthLevel.UNHEALTHY, ("xid_79:gpu1",))


def test_xid_counts_are_cumulative(fake: FakeNvml, probe: NvmlProbe) -> None:
    for xid in (13, 13, 63):
        fake.raise_xid(0, xid)
    wait_for(lambda: probe.read().gpus[0].xid_counts == {13: 2, 63: 1})
    assert verdict(probe.read()) == Verdict(HealthLevel.DEGRADED, ("xid_63:gpu0",))


def test_a_double_bit_ecc_event_counts_as_xid_48(fake: FakeNvml, probe: NvmlProbe) -> None:
    fake.raise_double_bit_ecc(0)
    wait_for(lambda: probe.read().gpus[0].xid_counts == {48: 1})


def test_gpus_without_events_are_still_read() -> None:
    fake = FakeNvml([FakeGpu(events_supported=False)])
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        reading = probe.read()
        assert reading.gpus[0].temperature_c == 45.0
        assert verdict(reading).level is HealthLevel.HEALTHY
    finally:
        probe.close()
    assert "nvmlEventSetWait_v2" not in fake.calls  # no thread waits on an empty set


def test_close_stops_the_xid_thread_and_shuts_nvml_down(fake: FakeNvml) -> None:
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    assert fake.init_count == 1
    started = time.monotonic()
    probe.close()
    assert time.monotonic() - started < SLACK_S  # it does not hang on the waiting thread
    assert fake.init_count == 0
    waits = fake.calls.get("nvmlEventSetWait_v2", 0)
    time.sleep(0.1)
    assert fake.calls.get("nvmlEventSetWait_v2", 0) == waits


def test_a_hung_nvml_call_reads_as_unresponsive_without_piling_up_threads(
    fake: FakeNvml, probe: NvmlProbe
) -> None:
    reader = DeadlineReader(probe, TIMEOUT_S)
    assert not reader.read().unresponsive
    fake.hang("nvmlDeviceGetTemperatureV")

    started = time.monotonic()
    hung = reader.read()
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert hung.unresponsive
    assert hung.gpus == ()
    assert hung.error == f"probe read exceeded {TIMEOUT_S:g} s"
    assert verdict(hung) == Verdict(HealthLevel.UNHEALTHY, ("nvml_unresponsive",))
    entered = fake.calls["nvmlDeviceGetTemperatureV"]

    # While the first read is stuck, more reads answer at once and start nothing.
    for _ in range(3):
        started = time.monotonic()
        again = reader.read()
        # It joined the read in flight, whose deadline has passed: one that waited a
        # deadline of its own would take at least TIMEOUT_S.
        assert time.monotonic() - started < TIMEOUT_S
        assert again.unresponsive
        assert again.error is not None and "still hung after" in again.error
    assert fake.calls["nvmlDeviceGetTemperatureV"] == entered
    assert fake.hung_calls == 1

    fake.release()
    wait_for(lambda: not reader.read().unresponsive)
    resumed = reader.read()
    assert resumed.gpus[0].temperature_c == 45.0
    assert verdict(resumed) == Verdict(HealthLevel.HEALTHY, ())


def test_a_probe_exception_is_an_error_reading_not_a_hang() -> None:
    class Broken:
        name = "nvml"

        def read(self) -> ProbeReading:
            raise RuntimeError("boom")

        def close(self) -> None:
            pass

    reading = DeadlineReader(Broken(), TIMEOUT_S).read()
    assert reading == ProbeReading(probe="nvml", gpus=(), error="RuntimeError: boom")


def test_make_probe_nvml_uses_the_driver(fake: FakeNvml) -> None:
    probe, note = make_probe("nvml", nvml=fake)
    try:
        assert isinstance(probe, NvmlProbe)
        assert note == "nvml: 2 GPU(s), driver 575.57.08"
        assert len(probe.read().gpus) == 2
    finally:
        probe.close()


def test_make_probe_auto_falls_back_without_a_driver() -> None:
    probe, note = make_probe("auto", sim_gpus=2, nvml=FakeNvml(2, driver_loaded=False))
    assert isinstance(probe, SimulatedProbe)
    assert note.startswith("auto: NVML unavailable (NVMLError_DriverNotLoaded), using simulated")
    assert len(probe.read().gpus) == 2


def test_make_probe_auto_on_this_machine() -> None:
    probe, note = make_probe("auto")
    try:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            # The usual case here: no GPU stack on the machine running the unit tests.
            assert probe.name == "simulated"
            assert note.startswith(f"auto: NVML unavailable ({type(exc).__name__}), ")
            assert "using simulated GPUs" in note
        else:
            pynvml.nvmlShutdown()
            assert probe.name in {"nvml", "simulated"}
    finally:
        probe.close()


def test_make_probe_nvml_without_a_driver_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NVML unavailable"):
        make_probe("nvml", nvml=FakeNvml(1, driver_loaded=False))


def test_make_probe_refuses_an_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"'bogus'.*nvml, simulated, auto"):
        make_probe("bogus")


def test_thermal_slowdown_is_read_on_a_driver_without_the_clocks_event_call(
    fake: FakeNvml, probe: NvmlProbe
) -> None:
    # nvidia-ml-py 13 always has the Python attribute; an older driver lacks the symbol.
    fake.missing_functions.add("nvmlDeviceGetCurrentClocksEventReasons")
    fake.gpus[0].clock_event_reasons = pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
    assert probe.read().gpus[0].clock_event_reasons == fake.gpus[0].clock_event_reasons
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] >= 1


def test_an_xid_is_matched_to_its_gpu_by_uuid_not_by_pointer(
    fake: FakeNvml, probe: NvmlProbe
) -> None:
    # The event names its device with another pointer value than GetHandleByIndex gave.
    fake.raise_xid(1, 79)
    wait_for(lambda: probe.read().gpus[1].xid_counts == {79: 1})
    assert probe.read().gpus[0].xid_counts == {}


def test_an_xid_before_the_first_read_is_matched_too(fake: FakeNvml) -> None:
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        fake.raise_xid(0, 48)  # no read yet: the probe knows the UUIDs from open()
        time.sleep(0.2)
        assert probe.read().gpus[0].xid_counts == {48: 1}
    finally:
        probe.close()


def test_a_gpu_with_ecc_off_still_reports_xids() -> None:
    # ECC off: no double-bit ECC events. Asking for them registered nothing at all.
    fake = FakeNvml([FakeGpu(supported_event_types=pynvml.nvmlEventTypeXidCriticalError)])
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        fake.raise_xid(0, 79)
        wait_for(lambda: probe.read().gpus[0].xid_counts == {79: 1})
        assert probe.read().error is None
    finally:
        probe.close()
        fake.release()


def test_a_gpu_without_xid_events_says_so() -> None:
    fake = FakeNvml([FakeGpu(events_supported=False), FakeGpu(uuid="GPU-1")])
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        reading = probe.read()
        assert reading.error is not None and "no Xid events on gpu0" in reading.error
        fake.raise_xid(1, 13)  # the other GPU's events still arrive
        wait_for(lambda: probe.read().gpus[1].xid_counts == {13: 1})
    finally:
        probe.close()
        fake.release()


def test_one_gpu_that_cannot_be_opened_does_not_sink_the_others() -> None:
    fake = FakeNvml(
        [FakeGpu(uuid="GPU-0"), FakeGpu(uuid="GPU-1", handle_error=pynvml.NVMLError_GpuIsLost)]
    )
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()  # it opens: the node serves from its good GPU
    try:
        reading = probe.read()
        assert reading.gpus[0].memory_total_bytes == fake.gpus[0].memory_total_bytes
        assert reading.gpus[1].lost
        assert reading.error is not None and "gpu1 cannot be opened: NVMLError_GpuIsLost" in (
            reading.error
        )
        assert verdict(reading) == Verdict(HealthLevel.UNHEALTHY, ("gpu_lost:gpu1",))
        fake.raise_xid(0, 13)  # the good GPU's events still arrive
        wait_for(lambda: probe.read().gpus[0].xid_counts == {13: 1})
        fake.gpus[1].handle_error = None  # it comes back
        assert not probe.read().gpus[1].lost
    finally:
        probe.close()
        fake.release()


def test_make_probe_auto_keeps_nvml_with_one_bad_gpu() -> None:
    # Not a fall-back to simulated GPUs that would report HEALTHY: the bad GPU is lost.
    bad = FakeGpu(uuid="GPU-1", handle_error=pynvml.NVMLError_NoPermission)
    probe, note = make_probe("auto", nvml=FakeNvml([FakeGpu(uuid="GPU-0"), bad]))
    try:
        assert isinstance(probe, NvmlProbe) and note.startswith("auto: 2 GPU(s)")
        assert probe.read().gpus[1].lost
    finally:
        probe.close()


# -- a GPU that stops answering ------------------------------------------------------------

# Far past any bound a GPU may stay silent for: the verdict no longer depends on timing.
LONG_AFTER_S = 600.0


@pytest.mark.parametrize("error", [pynvml.NVMLError_Unknown, pynvml.NVMLError_NoPermission])
def test_a_gpu_whose_every_call_fails_is_unhealthy_once_that_lasts(
    fake: FakeNvml, probe: NvmlProbe, error: type[pynvml.NVMLError]
) -> None:
    probe.read()  # its identity is known from before it stopped answering
    fake.gpus[1].errors = {"*": error}
    classifier = HealthClassifier(HealthConfig())
    first = probe.read()
    # One failed read is not a verdict: it may be a transient error.
    assert classifier.update(first, now_s=0.0) == Verdict(HealthLevel.HEALTHY, ())
    later = probe.read()
    assert classifier.update(later, now_s=LONG_AFTER_S) == Verdict(
        HealthLevel.UNHEALTHY, ("gpu_unresponsive:gpu1",)
    )
    # The reading names the error, on the GPU and in the probe's notes.
    silent = later.gpus[1]
    assert silent.uuid == fake.gpus[1].uuid
    assert silent.read_error is not None and error.__name__ in silent.read_error
    assert later.error is not None and f"gpu1 memory: {error.__name__}" in later.error
    assert later.gpus[0].read_error is None
    # It answers again: healthy at once.
    fake.gpus[1].errors = {}
    assert classifier.update(probe.read(), now_s=LONG_AFTER_S + 1) == Verdict(
        HealthLevel.HEALTHY, ()
    )


def test_a_single_failed_read_does_not_quarantine(fake: FakeNvml, probe: NvmlProbe) -> None:
    classifier = HealthClassifier(HealthConfig())
    fake.gpus[0].errors = {"*": pynvml.NVMLError_Unknown}
    assert classifier.update(probe.read(), now_s=0.0).level is HealthLevel.HEALTHY
    fake.gpus[0].errors = {}
    # The next read, however much later, answers: the failure was transient.
    assert classifier.update(probe.read(), now_s=LONG_AFTER_S) == Verdict(HealthLevel.HEALTHY, ())
    fake.gpus[0].errors = {"*": pynvml.NVMLError_Unknown}
    # Failing again starts a new clock: the old failure does not count towards it.
    assert classifier.update(probe.read(), now_s=LONG_AFTER_S + 1).level is HealthLevel.HEALTHY


def test_fields_a_gpu_does_not_support_stay_harmless_however_long(fake: FakeNvml) -> None:
    # A consumer GPU: no power reading, no ECC, no remapping, no recovery action field.
    fake.gpus[0].not_supported = {
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetRetiredPagesPendingStatus",
        "nvmlDeviceGetFieldValues",
    }
    # And a field this process may not read: one error among answers is a note, no more.
    fake.gpus[1].errors = {"nvmlDeviceGetPowerUsage": pynvml.NVMLError_NoPermission}
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        classifier = HealthClassifier(HealthConfig())
        for now_s in (0.0, LONG_AFTER_S):
            reading = probe.read()
            assert classifier.update(reading, now_s=now_s) == Verdict(HealthLevel.HEALTHY, ())
        assert [gpu.read_error for gpu in reading.gpus] == [None, None]
        assert reading.error == "gpu1 power: NVMLError_NoPermission"
    finally:
        probe.close()


def test_a_contained_ecc_error_drains_and_an_uncontained_one_quarantines(
    fake: FakeNvml, probe: NvmlProbe
) -> None:
    # Xid 94: contained. The uncorrected error also raises the volatile ECC count.
    fake.raise_xid(0, 94)
    fake.gpus[0].ecc_uncorrected_volatile = 1
    wait_for(lambda: probe.read().gpus[0].xid_counts == {94: 1})
    assert verdict(probe.read()) == Verdict(HealthLevel.DEGRADED, ("xid_94:gpu0",))
    # Xid 95 on the other GPU: uncontained, quarantine now.
    fake.raise_xid(1, 95)
    fake.gpus[1].ecc_uncorrected_volatile = 1
    wait_for(lambda: probe.read().gpus[1].xid_counts == {95: 1})
    assert verdict(probe.read()) == Verdict(
        HealthLevel.UNHEALTHY, ("ecc_dbe:gpu1", "xid_95:gpu1", "xid_94:gpu0")
    )


# -- the fake fails the ways a driver fails, and the probe copes ---------------------------


@pytest.mark.parametrize("timeout", [0.5, "500", None])
def test_the_fake_rejects_a_timeout_that_pynvml_rejects(
    monkeypatch: pytest.MonkeyPatch, timeout: object
) -> None:
    # Real pynvml over a stand-in for the driver's symbol: the argument never reaches it.
    reached: list[int] = []

    def driver_wait(event_set: object, data: object, timeout_ms: ctypes.c_uint) -> int:
        reached.append(timeout_ms.value)
        return pynvml.NVML_ERROR_TIMEOUT

    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lambda name: driver_wait)
    with pytest.raises(TypeError):
        pynvml.nvmlEventSetWait_v2(pynvml.c_nvmlEventSet_t(), timeout)
    assert reached == []
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait_v2(pynvml.c_nvmlEventSet_t(), -1)
    assert reached == [2**32 - 1]  # a negative timeout wraps: a wait of ~49 days

    fake = FakeNvml(1)
    fake.nvmlInit()
    event_set = fake.nvmlEventSetCreate()
    with pytest.raises(TypeError):
        fake.nvmlEventSetWait_v2(event_set, timeout)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fake.nvmlEventSetWait(event_set, timeout)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fake.nvmlDeviceGetHandleByIndex(0.0)  # type: ignore[arg-type]


def test_the_probe_passes_the_wait_an_unsigned_int(fake: FakeNvml) -> None:
    # A poll given as a float would raise TypeError in the Xid thread on every wait.
    probe = NvmlProbe(fake, xid_poll_ms=20.5)  # type: ignore[arg-type]
    probe.open()
    try:
        fake.raise_xid(0, 79)
        wait_for(lambda: probe.read().gpus[0].xid_counts == {79: 1})
        assert probe.read().error is None
    finally:
        probe.close()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="xid_poll_ms must be a positive"):
            NvmlProbe(fake, xid_poll_ms=bad)


@pytest.mark.parametrize("error", [pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_Unknown])
def test_a_failing_event_wait_is_a_monitoring_gap_not_a_fault(
    fake: FakeNvml, probe: NvmlProbe, error: type[pynvml.NVMLError]
) -> None:
    fake.wait_error = error
    wait_for(lambda: (probe.read().error or "").endswith(f"xid events: {error.__name__}"))
    reading = probe.read()
    # The GPUs' own reads say whether one is lost; here they all answer.
    assert verdict(reading) == Verdict(HealthLevel.HEALTHY, ())
    assert [gpu.xid_events_missing for gpu in reading.gpus] == [
        f"the event wait fails: {error.__name__}"
    ] * 2
    # It backs off instead of spinning on the failing set: one wait per poll, not thousands.
    before = fake.calls["nvmlEventSetWait_v2"]
    time.sleep(0.5)
    assert fake.calls["nvmlEventSetWait_v2"] - before < 100
    # The wait recovers: events are counted again and the gap closes.
    fake.wait_error = None
    fake.raise_xid(1, 79)
    wait_for(lambda: probe.read().gpus[1].xid_counts == {79: 1})
    recovered = probe.read()
    assert recovered.error is None
    assert [gpu.xid_events_missing for gpu in recovered.gpus] == [None, None]


def test_a_gpu_that_answers_nothing_at_start_still_opens_the_probe() -> None:
    fake = FakeNvml([FakeGpu(uuid="GPU-0"), FakeGpu(uuid="GPU-1")])
    fake.gpus[1].errors = {"*": pynvml.NVMLError_Unknown}
    probe = NvmlProbe(fake, xid_poll_ms=20)
    probe.open()
    try:
        reading = probe.read()
        assert reading.gpus[0].read_error is None
        assert reading.gpus[1].read_error == "NVMLError_Unknown: Unknown Error"
        assert reading.gpus[1].xid_events_missing == "event types: NVMLError_Unknown"
        classifier = HealthClassifier(HealthConfig())
        classifier.update(reading, now_s=0.0)
        assert classifier.update(probe.read(), now_s=LONG_AFTER_S) == Verdict(
            HealthLevel.UNHEALTHY, ("gpu_unresponsive:gpu1",)
        )
    finally:
        probe.close()


def test_make_probe_auto_without_the_nvml_library_falls_back_and_says_why() -> None:
    fake = FakeNvml(2, library_found=False)
    probe, note = make_probe("auto", sim_gpus=1, nvml=fake)
    assert isinstance(probe, SimulatedProbe)
    assert note == (
        "auto: NVML unavailable (NVMLError_LibraryNotFound), using simulated GPUs "
        "(1 x Simulated H100 80GB)"
    )
    assert fake.init_count == 0


def test_make_probe_nvml_without_the_nvml_library_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as refused:
        make_probe("nvml", nvml=FakeNvml(1, library_found=False))
    assert str(refused.value) == (
        "probe nvml: NVML unavailable (NVMLError_LibraryNotFound: NVML Shared Library Not "
        "Found); install the NVIDIA driver, or use probe kind 'simulated' (or 'auto')"
    )


def test_without_the_library_every_other_call_is_uninitialized() -> None:
    # As pynvml: with no library loaded, a function cannot even be looked up.
    fake = FakeNvml(1, library_found=False)
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlShutdown()
