"""The health policy: each Xid bucket, each other verdict, persistence and hysteresis."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from gridqueue.health import (
    HealthClassifier,
    HealthConfig,
    HealthDocumentSender,
    HealthLevel,
    Verdict,
    classify,
    judged_part,
    monitoring_notices,
)
from gridqueue.probes import GpuReading, ProbeReading
from gridqueue.settings import Settings

CONFIG = HealthConfig()  # limit 87 C, hysteresis 5 C, degraded after 5 s
PERSIST_S = CONFIG.degraded_persist_s


def healthy_gpu(index: int = 0) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * 2**30,
        memory_used_bytes=2**30,
        utilization_ratio=0.4,
        temperature_c=45.0,
        power_w=250.0,
        power_limit_w=700.0,
        clock_event_reasons=0,
        ecc_uncorrected_volatile=0,
        remap_pending=False,
        remap_failure=False,
        retired_pages_pending=False,
        recovery_action=0,
    )


def reading(*gpus: GpuReading) -> ProbeReading:
    return ProbeReading(probe="nvml", gpus=gpus or (healthy_gpu(),))


def gpu0(**changes: object) -> ProbeReading:
    return reading(replace(healthy_gpu(), **changes))  # type: ignore[arg-type]


def verdict_at_once(probe_reading: ProbeReading) -> Verdict:
    return HealthClassifier(CONFIG).update(probe_reading, now_s=100.0)


def test_config_defaults_match_the_settings() -> None:
    assert HealthConfig.from_settings(Settings()) == HealthConfig()


def test_config_from_settings_takes_every_field() -> None:
    settings = Settings(
        health_xid_unhealthy=[1],
        health_xid_degraded=[2],
        health_xid_ignored=[3],
        health_temperature_limit_c=70.0,
        health_temperature_hysteresis_c=2.0,
        health_degraded_persist_s=0.5,
        health_gpu_unresponsive_after_s=7.0,
    )
    assert HealthConfig.from_settings(settings) == HealthConfig(
        xid_unhealthy=frozenset({1}),
        xid_degraded=frozenset({2}),
        xid_ignored=frozenset({3}),
        temperature_limit_c=70.0,
        temperature_hysteresis_c=2.0,
        degraded_persist_s=0.5,
        gpu_unresponsive_after_s=7.0,
    )


def test_a_healthy_node_is_healthy() -> None:
    assert classify(reading(healthy_gpu(0), healthy_gpu(1)), CONFIG) == ([], [])
    assert verdict_at_once(reading()) == Verdict(HealthLevel.HEALTHY, ())


def test_a_reading_without_optional_fields_is_healthy() -> None:
    # Every field None: a GPU that supports nothing is not a sick GPU.
    assert verdict_at_once(reading(GpuReading(index=0))).level is HealthLevel.HEALTHY


# -- Xid buckets -----------------------------------------------------------------------


@pytest.mark.parametrize("xid", sorted(CONFIG.xid_ignored))
def test_application_xids_are_counted_but_not_node_health(xid: int) -> None:
    assert classify(gpu0(xid_counts={xid: 3}), CONFIG) == ([], [])
    assert verdict_at_once(gpu0(xid_counts={xid: 3})) == Verdict(HealthLevel.HEALTHY, ())


@pytest.mark.parametrize("xid", sorted(CONFIG.xid_degraded))
def test_degraded_xids_drain_at_once(xid: int) -> None:
    # An Xid is an event, not a sample: it does not wait out degraded_persist_s.
    assert verdict_at_once(gpu0(xid_counts={xid: 1})) == Verdict(
        HealthLevel.DEGRADED, (f"xid_{xid}:gpu0",)
    )


@pytest.mark.parametrize("xid", sorted(CONFIG.xid_unhealthy))
def test_unhealthy_xids_quarantine_at_once(xid: int) -> None:
    assert verdict_at_once(gpu0(xid_counts={xid: 1})) == Verdict(
        HealthLevel.UNHEALTHY, (f"xid_{xid}:gpu0",)
    )


def test_an_unknown_xid_is_degraded() -> None:
    assert verdict_at_once(gpu0(xid_counts={999: 1})) == Verdict(
        HealthLevel.DEGRADED, ("xid_unknown_999:gpu0",)
    )


def test_a_zero_count_is_no_xid() -> None:
    assert verdict_at_once(gpu0(xid_counts={79: 0})).level is HealthLevel.HEALTHY


def test_the_xid_policy_is_configurable() -> None:
    config = replace(CONFIG, xid_unhealthy=frozenset(), xid_degraded=frozenset({79}))
    verdict = HealthClassifier(config).update(gpu0(xid_counts={79: 1}), now_s=0.0)
    assert verdict == Verdict(HealthLevel.DEGRADED, ("xid_79:gpu0",))


def test_a_code_in_two_buckets_takes_the_gravest() -> None:
    config = replace(CONFIG, xid_ignored=CONFIG.xid_ignored | {79})
    assert classify(gpu0(xid_counts={79: 1}), config) == (["xid_79:gpu0"], [])


def test_xids_of_every_bucket_together() -> None:
    unhealthy, degraded = classify(gpu0(xid_counts={13: 1, 63: 1, 79: 2, 999: 1}), CONFIG)
    assert unhealthy == ["xid_79:gpu0"]
    assert degraded == ["xid_63:gpu0", "xid_unknown_999:gpu0"]


# -- other unhealthy verdicts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ecc_uncorrected_volatile": 1}, "ecc_dbe:gpu0"),
        ({"remap_failure": True}, "remap_failure:gpu0"),
        ({"lost": True}, "gpu_lost:gpu0"),
        ({"reset_required": True}, "reset_required:gpu0"),
    ],
)
def test_hardware_faults_are_unhealthy_at_once(changes: dict[str, object], reason: str) -> None:
    assert verdict_at_once(gpu0(**changes)) == Verdict(HealthLevel.UNHEALTHY, (reason,))


def test_a_lost_gpu_among_healthy_ones_names_the_gpu() -> None:
    lost = GpuReading(index=1, lost=True)
    verdict = verdict_at_once(reading(healthy_gpu(0), lost, healthy_gpu(2)))
    assert verdict == Verdict(HealthLevel.UNHEALTHY, ("gpu_lost:gpu1",))


def test_an_unresponsive_probe_is_unhealthy() -> None:
    hung = ProbeReading(probe="nvml", gpus=(), unresponsive=True, error="probe read exceeded 2 s")
    assert verdict_at_once(hung) == Verdict(HealthLevel.UNHEALTHY, ("nvml_unresponsive",))


@pytest.mark.parametrize(
    ("action", "level", "reasons"),
    [
        (0, HealthLevel.HEALTHY, ()),
        (1, HealthLevel.UNHEALTHY, ("recovery_action_reset:gpu0",)),
        (2, HealthLevel.UNHEALTHY, ("recovery_action_reboot:gpu0",)),
        (3, HealthLevel.DEGRADED, ("recovery_action_drain_p2p:gpu0",)),
        (4, HealthLevel.UNHEALTHY, ("recovery_action_drain_reset:gpu0",)),
        (5, HealthLevel.DEGRADED, ("recovery_action_recover_imex_domain:gpu0",)),
        (6, HealthLevel.UNHEALTHY, ("recovery_action_bus_reset:gpu0",)),
        (7, HealthLevel.UNHEALTHY, ("recovery_action_system_reboot:gpu0",)),
        (99, HealthLevel.DEGRADED, ("recovery_action_unknown_99:gpu0",)),
    ],
)
def test_each_recovery_action(action: int, level: HealthLevel, reasons: tuple[str, ...]) -> None:
    # Degraded ones are samples, like any other: they count once they persisted.
    classifier = HealthClassifier(CONFIG)
    classifier.update(gpu0(recovery_action=action), now_s=0.0)
    assert classifier.update(gpu0(recovery_action=action), now_s=PERSIST_S) == Verdict(
        level, reasons
    )


# -- degraded samples: persistence -----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"remap_pending": True}, "remap_pending:gpu0"),
        ({"retired_pages_pending": True}, "retired_pages_pending:gpu0"),
        ({"clock_event_reasons": 0x8}, "thermal_slowdown:gpu0"),  # HW slowdown
        ({"clock_event_reasons": 0x20}, "thermal_slowdown:gpu0"),  # SW thermal
        ({"clock_event_reasons": 0x40}, "thermal_slowdown:gpu0"),  # HW thermal
        ({"clock_event_reasons": 0x80}, "thermal_slowdown:gpu0"),  # HW power brake
        ({"clock_event_reasons": 0x1 | 0x40}, "thermal_slowdown:gpu0"),
    ],
)
def test_degraded_samples_count_only_once_they_persisted(
    changes: dict[str, object], reason: str
) -> None:
    assert classify(gpu0(**changes), CONFIG) == ([], [reason])
    classifier = HealthClassifier(CONFIG)
    assert classifier.update(gpu0(**changes), now_s=10.0).level is HealthLevel.HEALTHY
    assert classifier.update(gpu0(**changes), now_s=10.0 + PERSIST_S - 0.1).level is (
        HealthLevel.HEALTHY
    )
    assert classifier.update(gpu0(**changes), now_s=10.0 + PERSIST_S) == Verdict(
        HealthLevel.DEGRADED, (reason,)
    )
    # Gone: healthy again, and its clock starts over when it returns.
    assert classifier.update(reading(), now_s=20.0) == Verdict(HealthLevel.HEALTHY, ())
    assert classifier.update(gpu0(**changes), now_s=21.0).level is HealthLevel.HEALTHY


@pytest.mark.parametrize("bits", [0x0, 0x1, 0x2, 0x4, 0x100])
def test_clock_events_that_are_not_thermal_are_healthy(bits: int) -> None:
    # Idle, application clocks, the software power cap: the GPU is fine.
    assert classify(gpu0(clock_event_reasons=bits), CONFIG) == ([], [])


def test_a_zero_persistence_counts_degraded_samples_at_once() -> None:
    classifier = HealthClassifier(replace(CONFIG, degraded_persist_s=0.0))
    assert classifier.update(gpu0(remap_pending=True), now_s=0.0) == Verdict(
        HealthLevel.DEGRADED, ("remap_pending:gpu0",)
    )


def test_unhealthy_reasons_come_before_degraded_ones() -> None:
    verdict = verdict_at_once(gpu0(xid_counts={63: 1}, ecc_uncorrected_volatile=2))
    assert verdict == Verdict(HealthLevel.UNHEALTHY, ("ecc_dbe:gpu0", "xid_63:gpu0"))


def test_a_probe_that_reads_nothing_is_degraded_once_that_persists() -> None:
    failed = ProbeReading(probe="nvml", gpus=(), error="NVMLError_Unknown: Unknown Error")
    assert classify(failed, CONFIG) == ([], ["probe_error"])
    classifier = HealthClassifier(CONFIG)
    assert classifier.update(failed, now_s=0.0).level is HealthLevel.HEALTHY
    assert classifier.update(failed, now_s=PERSIST_S) == Verdict(
        HealthLevel.DEGRADED, ("probe_error",)
    )


def test_a_field_error_beside_readings_is_not_a_verdict() -> None:
    partial = replace(reading(), error="gpu0 power: NVMLError_NoPermission")
    assert classify(partial, CONFIG) == ([], [])


# -- temperature: persistence and hysteresis -------------------------------------------


def test_temperature_over_the_limit_with_persistence_and_hysteresis() -> None:
    classifier = HealthClassifier(CONFIG)  # limit 87, cool again below 82

    def at(temperature_c: float, now_s: float) -> Verdict:
        return classifier.update(gpu0(temperature_c=temperature_c), now_s=now_s)

    assert at(87.0, 0.0).level is HealthLevel.HEALTHY  # at the limit is not over it
    assert at(91.0, 1.0).level is HealthLevel.HEALTHY  # one hot sample alone does not count
    assert classifier.hot_gpus == frozenset({0})
    assert at(92.0, 1.0 + PERSIST_S) == Verdict(HealthLevel.DEGRADED, ("temperature_92C:gpu0",))
    # Below the limit but above limit - hysteresis: still hot, still degraded.
    assert at(84.0, 7.0) == Verdict(HealthLevel.DEGRADED, ("temperature_84C:gpu0",))
    assert at(82.0, 8.0) == Verdict(HealthLevel.DEGRADED, ("temperature_82C:gpu0",))
    # Below limit - hysteresis: recovered.
    assert at(81.9, 9.0) == Verdict(HealthLevel.HEALTHY, ())
    assert classifier.hot_gpus == frozenset()
    # Cool GPUs do not get the hysteresis: 85 C is fine until the limit is crossed again.
    assert at(85.0, 10.0).level is HealthLevel.HEALTHY
    assert at(88.0, 11.0).level is HealthLevel.HEALTHY  # hot again: its clock restarted
    assert at(88.0, 11.0 + PERSIST_S).level is HealthLevel.DEGRADED


def test_classify_applies_hysteresis_only_to_gpus_already_hot() -> None:
    warm = gpu0(temperature_c=85.0)
    assert classify(warm, CONFIG) == ([], [])
    assert classify(warm, CONFIG, hot_gpus=frozenset({0})) == ([], ["temperature_85C:gpu0"])
    assert classify(warm, CONFIG, hot_gpus=frozenset({1})) == ([], [])


def test_temperature_is_tracked_per_gpu() -> None:
    classifier = HealthClassifier(CONFIG)
    hot1 = reading(healthy_gpu(0), replace(healthy_gpu(1), temperature_c=95.0))
    classifier.update(hot1, now_s=0.0)
    assert classifier.update(hot1, now_s=PERSIST_S) == Verdict(
        HealthLevel.DEGRADED, ("temperature_95C:gpu1",)
    )
    assert classifier.hot_gpus == frozenset({1})


def test_a_hung_read_neither_heals_nor_resets_a_persisting_reason() -> None:
    classifier = HealthClassifier(CONFIG)
    hung = ProbeReading(probe="nvml", gpus=(), unresponsive=True, error="probe read exceeded 2 s")
    classifier.update(gpu0(temperature_c=95.0), now_s=0.0)
    assert classifier.update(hung, now_s=2.0) == Verdict(
        HealthLevel.UNHEALTHY, ("nvml_unresponsive",)
    )
    assert classifier.hot_gpus == frozenset({0})
    # The clock kept running across the hung read.
    assert classifier.update(gpu0(temperature_c=84.0), now_s=PERSIST_S).level is (
        HealthLevel.DEGRADED
    )


def test_verdict_round_trips_through_json() -> None:
    verdict = Verdict(HealthLevel.UNHEALTHY, ("xid_79:gpu0", "remap_pending:gpu1"))
    document = json.loads(json.dumps(verdict.to_dict()))
    assert document == {"level": "UNHEALTHY", "reasons": ["xid_79:gpu0", "remap_pending:gpu1"]}
    assert Verdict.from_dict(document) == verdict


# -- a contained uncorrectable error (Xid 94) and the ECC counter ------------------------


def test_a_contained_ecc_error_drains_though_it_raised_the_ecc_count() -> None:
    # Decision: Xid 94 drains. The counter rule must not override it for the same error.
    contained = gpu0(xid_counts={94: 1}, ecc_uncorrected_volatile=1)
    assert verdict_at_once(contained) == Verdict(HealthLevel.DEGRADED, ("xid_94:gpu0",))


def test_an_uncontained_ecc_error_quarantines() -> None:
    uncontained = gpu0(xid_counts={95: 1}, ecc_uncorrected_volatile=1)
    assert verdict_at_once(uncontained) == Verdict(
        HealthLevel.UNHEALTHY, ("ecc_dbe:gpu0", "xid_95:gpu0")
    )
    # Contained and uncontained errors on one GPU: the uncontained one decides.
    both = gpu0(xid_counts={94: 1, 95: 1}, ecc_uncorrected_volatile=2)
    assert verdict_at_once(both).level is HealthLevel.UNHEALTHY


def test_an_ecc_count_no_contained_xid_explains_quarantines() -> None:
    # Raised before this probe started, or on a GPU whose Xid events are not watched.
    assert verdict_at_once(gpu0(ecc_uncorrected_volatile=1)) == Verdict(
        HealthLevel.UNHEALTHY, ("ecc_dbe:gpu0",)
    )
    # An Xid 94 on another GPU explains nothing here.
    other = reading(
        replace(healthy_gpu(0), ecc_uncorrected_volatile=1),
        replace(healthy_gpu(1), xid_counts={94: 1}),
    )
    assert verdict_at_once(other) == Verdict(HealthLevel.UNHEALTHY, ("ecc_dbe:gpu0", "xid_94:gpu1"))


# -- a GPU that stops answering ----------------------------------------------------------

SILENT_S = CONFIG.gpu_unresponsive_after_s


def silent_gpu(index: int = 0) -> GpuReading:
    return GpuReading(
        index=index, uuid=f"GPU-{index}", read_error="NVMLError_Unknown: Unknown Error"
    )


def test_a_silent_gpu_is_unhealthy_only_once_its_silence_lasted() -> None:
    classifier = HealthClassifier(CONFIG)
    silent = reading(healthy_gpu(0), silent_gpu(1))
    assert classify(silent, CONFIG) == ([], [])  # one reading alone says nothing
    assert classifier.update(silent, now_s=10.0) == Verdict(HealthLevel.HEALTHY, ())
    assert classifier.update(silent, now_s=10.0 + SILENT_S - 0.1).level is HealthLevel.HEALTHY
    assert classifier.update(silent, now_s=10.0 + SILENT_S) == Verdict(
        HealthLevel.UNHEALTHY, ("gpu_unresponsive:gpu1",)
    )
    # A hung read (no GPUs in it) keeps the clock; an answer resets it.
    hung = ProbeReading(probe="nvml", gpus=(), unresponsive=True, error="probe read exceeded 2 s")
    classifier.update(hung, now_s=20.0)
    assert classifier.update(silent, now_s=21.0).level is HealthLevel.UNHEALTHY
    assert classifier.update(reading(healthy_gpu(0), healthy_gpu(1)), now_s=22.0) == Verdict(
        HealthLevel.HEALTHY, ()
    )
    assert classifier.update(silent, now_s=23.0).level is HealthLevel.HEALTHY


def test_the_silence_bound_is_configurable() -> None:
    classifier = HealthClassifier(replace(CONFIG, gpu_unresponsive_after_s=60.0))
    classifier.update(reading(silent_gpu()), now_s=0.0)
    assert classifier.update(reading(silent_gpu()), now_s=59.0).level is HealthLevel.HEALTHY
    assert classifier.update(reading(silent_gpu()), now_s=60.0).level is HealthLevel.UNHEALTHY


# -- monitoring gaps -----------------------------------------------------------------------


def test_a_gpu_without_xid_events_is_a_notice_not_a_verdict() -> None:
    gap = replace(healthy_gpu(1), xid_events_missing="the GPU does not offer them")
    assert monitoring_notices([healthy_gpu(0), gap]) == ["no_xid_events:gpu1"]
    assert verdict_at_once(reading(healthy_gpu(0), gap)) == Verdict(HealthLevel.HEALTHY, ())


# -- which heartbeats carry the health document --------------------------------------


def _document(temperature_c: float = 45.0, verdict: str = "HEALTHY") -> dict[str, Any]:
    gpu = gpu0(temperature_c=temperature_c).gpus[0].to_dict()
    return {"probe": "simulated", "verdict": verdict, "reasons": [], "gpus": [gpu]}


def test_telemetry_alone_is_no_news_but_a_verdict_or_a_fault_is() -> None:
    base = judged_part(_document())
    assert judged_part(_document(temperature_c=52.0)) == base
    assert judged_part(_document(verdict="DEGRADED")) != base
    faulty = _document()
    faulty["gpus"][0]["xid_counts"] = {"79": 1}
    assert judged_part(faulty) != base


def test_the_document_goes_on_news_on_the_refresh_and_after_a_registration() -> None:
    sender = HealthDocumentSender(refresh_s=5.0)
    calm, hot = judged_part(_document()), judged_part(_document(verdict="DEGRADED"))
    assert sender.to_send("doc1", calm, now_s=0.0) == "doc1"  # Redis has none yet
    sender.sent(calm, now_s=0.0)
    assert sender.to_send("doc2", calm, now_s=0.2) == ""  # the same news
    assert sender.to_send("doc3", hot, now_s=0.4) == "doc3"  # news goes at once
    # Not acknowledged (the beat failed): the next beat carries it again.
    assert sender.to_send("doc3", hot, now_s=0.6) == "doc3"
    sender.sent(hot, now_s=0.6)
    assert sender.to_send("doc4", hot, now_s=5.4) == ""
    assert sender.to_send("doc5", hot, now_s=5.6) == "doc5"  # the slow refresh
    sender.sent(hot, now_s=5.6)
    sender.forget()  # registered again: the stored document is gone
    assert sender.to_send("doc6", hot, now_s=5.8) == "doc6"
