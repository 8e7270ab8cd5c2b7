"""GPU health verdicts: a probe reading in, HEALTHY / DEGRADED / UNHEALTHY out.

``classify`` is the policy, a pure function of one reading: the Xid table and the other
verdicts of ``shared/notes/nvml-health.md``. ``HealthClassifier`` adds the two things one
reading cannot know: which GPUs are already hot (temperature hysteresis), and how long
each degraded reason has lasted (a degraded sample counts only once it persisted
``degraded_persist_s``). Xid reasons skip that wait: an Xid is an event, not a sample.

UNHEALTHY quarantines the node and requeues its work now; DEGRADED drains it. Xid counts
are cumulative for the probe's life, so an Xid verdict holds until the worker restarts,
which is what the GPU reset that such an Xid calls for entails anyway.

A GPU whose every call fails (``read_error``) is judged over time too: one failed read
may be transient, but a GPU silent for ``gpu_unresponsive_after_s`` is UNHEALTHY
(``gpu_unresponsive:gpuN``). A monitoring gap (a GPU whose Xid events are not watched)
is no verdict at all: ``monitoring_notices`` names it for operators.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gridqueue.probes.base import GpuReading, ProbeReading
from gridqueue.settings import Settings

# nvmlClocksEventReason* bits that mean the GPU slowed itself to protect itself.
CLOCK_EVENT_HW_SLOWDOWN = 0x8
CLOCK_EVENT_SW_THERMAL = 0x20
CLOCK_EVENT_HW_THERMAL = 0x40
CLOCK_EVENT_HW_POWER_BRAKE = 0x80
THERMAL_CLOCK_EVENTS = (
    CLOCK_EVENT_HW_SLOWDOWN
    | CLOCK_EVENT_SW_THERMAL
    | CLOCK_EVENT_HW_THERMAL
    | CLOCK_EVENT_HW_POWER_BRAKE
)

# Xid 94: an uncorrectable ECC error the GPU contained (the application that touched the
# memory was killed; the rest can run until the GPU is reset). It also raises the volatile
# uncorrected ECC count, which must not turn the drain it calls for into a quarantine.
XID_CONTAINED_ECC = 94

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION values: (reason, is it unhealthy?). 0 is "none".
RECOVERY_ACTIONS: dict[int, tuple[str, bool]] = {
    1: ("recovery_action_reset", True),
    2: ("recovery_action_reboot", True),
    3: ("recovery_action_drain_p2p", False),
    4: ("recovery_action_drain_reset", True),
    5: ("recovery_action_recover_imex_domain", False),
    6: ("recovery_action_bus_reset", True),
    7: ("recovery_action_system_reboot", True),
}


class HealthLevel(StrEnum):
    # The values are what the ledger's Lua scripts compare against.
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    UNHEALTHY = "UNHEALTHY"


@dataclass(frozen=True)
class HealthConfig:
    """The health policy; defaults match the settings' defaults."""

    xid_unhealthy: frozenset[int] = frozenset({48, 64, 74, 79, 95, 119, 120, 140})
    xid_degraded: frozenset[int] = frozenset({63, 92, 94})
    xid_ignored: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})
    temperature_limit_c: float = 87.0
    temperature_hysteresis_c: float = 5.0
    degraded_persist_s: float = 5.0
    gpu_unresponsive_after_s: float = 3.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthConfig:
        return cls(
            xid_unhealthy=frozenset(settings.health_xid_unhealthy),
            xid_degraded=frozenset(settings.health_xid_degraded),
            xid_ignored=frozenset(settings.health_xid_ignored),
            temperature_limit_c=settings.health_temperature_limit_c,
            temperature_hysteresis_c=settings.health_temperature_hysteresis_c,
            degraded_persist_s=settings.health_degraded_persist_s,
            gpu_unresponsive_after_s=settings.health_gpu_unresponsive_after_s,
        )


@dataclass(frozen=True)
class Verdict:
    level: HealthLevel
    reasons: tuple[str, ...] = ()  # unhealthy reasons first, then counted degraded ones

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level.value, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(HealthLevel(data["level"]), tuple(data.get("reasons") or ()))


def classify(
    reading: ProbeReading, config: HealthConfig, hot_gpus: frozenset[int] = frozenset()
) -> tuple[list[str], list[str]]:
    """``(unhealthy_reasons, degraded_reasons)`` of one reading. ``hot_gpus`` are the GPUs
    already over the temperature limit; they stay degraded until they cool below
    ``limit - hysteresis``, so a GPU hovering at the limit does not flap."""
    unhealthy: list[str] = []
    degraded: list[str] = []
    if reading.unresponsive:
        unhealthy.append("nvml_unresponsive")
    elif reading.error is not None and not reading.gpus:
        # The probe read nothing: we cannot vouch for the GPUs.
        degraded.append("probe_error")
    for gpu in reading.gpus:
        _classify_gpu(gpu, config, gpu.index in hot_gpus, unhealthy, degraded)
    return unhealthy, degraded


def _classify_gpu(
    gpu: GpuReading, config: HealthConfig, hot: bool, unhealthy: list[str], degraded: list[str]
) -> None:
    where = f"gpu{gpu.index}"
    if gpu.lost:
        unhealthy.append(f"gpu_lost:{where}")
    if gpu.reset_required:
        unhealthy.append(f"reset_required:{where}")
    # An uncorrected error the GPU contained (Xid 94) is judged by the Xid table: it
    # drains. One it could not contain comes with an Xid of its own (95, or 48 for a
    # double-bit ECC event) that quarantines; a count with no contained Xid seen by this
    # probe (before it started, or on a GPU without Xid events) quarantines too.
    if gpu.ecc_uncorrected_volatile and not gpu.xid_counts.get(XID_CONTAINED_ECC, 0):
        unhealthy.append(f"ecc_dbe:{where}")
    if gpu.remap_failure:
        unhealthy.append(f"remap_failure:{where}")
    if gpu.recovery_action:
        reason, is_unhealthy = RECOVERY_ACTIONS.get(
            gpu.recovery_action, (f"recovery_action_unknown_{gpu.recovery_action}", False)
        )
        (unhealthy if is_unhealthy else degraded).append(f"{reason}:{where}")
    for code, count in sorted(gpu.xid_counts.items()):
        if count <= 0:
            continue
        # A code listed twice takes its gravest bucket.
        if code in config.xid_unhealthy:
            unhealthy.append(f"xid_{code}:{where}")
        elif code in config.xid_degraded:
            degraded.append(f"xid_{code}:{where}")
        elif code in config.xid_ignored:
            continue  # the application's fault, not the node's: counted, not judged
        else:
            degraded.append(f"xid_unknown_{code}:{where}")
    if gpu.remap_pending:
        degraded.append(f"remap_pending:{where}")
    if gpu.retired_pages_pending:
        degraded.append(f"retired_pages_pending:{where}")
    if gpu.temperature_c is not None and _is_hot(gpu.temperature_c, hot, config):
        degraded.append(f"temperature_{gpu.temperature_c:.0f}C:{where}")
    if gpu.clock_event_reasons is not None and gpu.clock_event_reasons & THERMAL_CLOCK_EVENTS:
        degraded.append(f"thermal_slowdown:{where}")


def monitoring_notices(gpus: Iterable[GpuReading]) -> list[str]:
    """Monitoring gaps, for operators: ``no_xid_events:gpuN`` for a GPU whose Xid events
    are not watched. Not a verdict: the GPU may be fine, but an Xid on it would go
    unseen, and only its sampled fields (ECC, remapping, loss) still speak for it."""
    return [f"no_xid_events:gpu{gpu.index}" for gpu in gpus if gpu.xid_events_missing]


def _is_hot(temperature_c: float, already_hot: bool, config: HealthConfig) -> bool:
    if temperature_c > config.temperature_limit_c:
        return True
    return (
        already_hot
        and temperature_c >= config.temperature_limit_c - config.temperature_hysteresis_c
    )


def _persistence_key(reason: str) -> str:
    """The identity of a reason across samples: a temperature reason carries the reading
    itself ("temperature_91C:gpu0"), which must not restart its clock when it changes."""
    kind, _, where = reason.partition(":")
    if kind.startswith("temperature_"):
        kind = "temperature"
    return f"{kind}:{where}"


def _gpu_of(key: str) -> int | None:
    _, _, where = key.partition(":")
    return int(where[3:]) if where.startswith("gpu") and where[3:].isdigit() else None


class HealthClassifier:
    """Verdicts over time for one worker's probe. Not thread-safe: one caller."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._hot: set[int] = set()
        self._since_s: dict[str, float] = {}  # persistence key -> first seen (now_s clock)
        self._silent_since_s: dict[int, float] = {}  # GPU -> first read where nothing answered

    @property
    def hot_gpus(self) -> frozenset[int]:
        return frozenset(self._hot)

    def update(self, reading: ProbeReading, now_s: float) -> Verdict:
        """The verdict for ``reading``, taken at ``now_s`` (a monotonic clock, seconds)."""
        unhealthy, degraded = classify(reading, self.config, frozenset(self._hot))
        present = {gpu.index for gpu in reading.gpus}
        # GPUs absent from this reading (a hung or failed read) keep their state: nothing
        # was learned about them.
        hot_now = {_gpu_of(reason) for reason in degraded if reason.startswith("temperature_")}
        self._hot = {index for index in self._hot if index not in present}
        self._hot.update(index for index in hot_now if index is not None)
        current = {_persistence_key(reason) for reason in degraded}
        for key in list(self._since_s):
            gpu = _gpu_of(key)
            if key not in current and (gpu is None or gpu in present):
                del self._since_s[key]
        for sample in reading.gpus:
            if sample.read_error is None:
                self._silent_since_s.pop(sample.index, None)
                continue
            # One failed read may be a transient error; silence that lasts is a sick GPU.
            silent_since_s = self._silent_since_s.setdefault(sample.index, now_s)
            if now_s - silent_since_s >= self.config.gpu_unresponsive_after_s:
                unhealthy.append(f"gpu_unresponsive:gpu{sample.index}")
        counted: list[str] = []
        for reason in degraded:
            since_s = self._since_s.setdefault(_persistence_key(reason), now_s)
            if reason.startswith("xid_") or now_s - since_s >= self.config.degraded_persist_s:
                counted.append(reason)
        if unhealthy:
            level = HealthLevel.UNHEALTHY
        elif counted:
            level = HealthLevel.DEGRADED
        else:
            level = HealthLevel.HEALTHY
        return Verdict(level, tuple(unhealthy + counted))


# What moves on nearly every read of a busy GPU: telemetry, shown and graphed, never judged
# as such (a hot GPU is judged through the verdict's reasons, which are not telemetry).
TELEMETRY_FIELDS = frozenset({"memory_used_bytes", "utilization_ratio", "temperature_c", "power_w"})


def judged_part(document: dict[str, Any]) -> str:
    """The health document without its GPUs' telemetry, as a string to compare: what it
    says about the node's health, its GPUs and their faults."""
    gpus = [
        {k: v for k, v in gpu.items() if k not in TELEMETRY_FIELDS}
        for gpu in document.get("gpus", ())
    ]
    return json.dumps({**document, "gpus": gpus}, sort_keys=True, separators=(",", ":"))


class HealthDocumentSender:
    """Which heartbeats carry the health document (about 1.7 kB of JSON for eight GPUs).

    Writing it on every beat was a third of a heartbeat's cost in Redis, for a
    document that says the same thing beat after beat. A beat carries it when what it
    says (:func:`judged_part`) changed since the last one Redis acknowledged, and at
    least every ``refresh_s`` anyway, so that telemetry moves on the dashboard and a
    Redis that lost it (restarted, failed over) has it again; the other beats carry an
    empty string, which leaves the stored document as it is. Registering drops the
    stored document, so :meth:`forget` must follow each registration. The verdict
    itself is small and still goes on every beat. Not thread-safe: the heartbeat's.
    """

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self._sent: str | None = None  # the judged part Redis has
        self._refresh_at_s = 0.0

    def to_send(self, snapshot: str, judged: str, now_s: float) -> str:
        """What this beat carries: ``snapshot``, or '' when Redis already has its news."""
        if judged != self._sent or now_s >= self._refresh_at_s:
            return snapshot
        return ""

    def sent(self, judged: str, now_s: float) -> None:
        """A beat that carried the document was acknowledged at ``now_s``."""
        self._sent = judged
        self._refresh_at_s = now_s + self.refresh_s

    def forget(self) -> None:
        """Redis no longer has the document (a new registration): send it next beat."""
        self._sent = None
