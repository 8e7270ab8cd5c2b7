"""What a GPU probe reports, the interface every probe implements, and the deadline that
keeps a wedged driver from wedging its caller.

A reading is plain data: frozen dataclasses with a JSON-safe ``to_dict`` so the worker can
put it in its heartbeat and the CLI can read it back. Judging a reading is not done here;
that is ``gridqueue.health``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. ``None`` means the driver does not offer that field."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_ratio: float | None = None  # 0..1; busy is not progress (a deadlock is busy)
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    clock_event_reasons: int | None = None  # nvmlClocksEventReason* bitmask
    ecc_uncorrected_volatile: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    retired_pages_pending: bool | None = None
    recovery_action: int | None = None  # NVML_GPU_RECOVERY_ACTION_*
    lost: bool = False  # fell off the bus
    reset_required: bool = False
    # Every call on this GPU failed with an NVML error (not "not supported"): the first
    # error, e.g. "NVMLError_Unknown: Unknown Error". A GPU that stays silent is unhealthy.
    read_error: str | None = None
    # Why this GPU's Xid events are not watched (it offers none, registration or the
    # event wait failed); None while they are, or where the probe has no events. A
    # monitoring gap, not a fault: shown to operators, never judged.
    xid_events_missing: str | None = None
    # Cumulative per Xid code since the probe started: an Xid is an event, and a count
    # that only grows survives a reading that is missed or dropped.
    xid_counts: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "utilization_ratio": self.utilization_ratio,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "power_limit_w": self.power_limit_w,
            "clock_event_reasons": self.clock_event_reasons,
            "ecc_uncorrected_volatile": self.ecc_uncorrected_volatile,
            "remap_pending": self.remap_pending,
            "remap_failure": self.remap_failure,
            "retired_pages_pending": self.retired_pages_pending,
            "recovery_action": self.recovery_action,
            "lost": self.lost,
            "reset_required": self.reset_required,
            "read_error": self.read_error,
            "xid_events_missing": self.xid_events_missing,
            # JSON object keys are strings.
            "xid_counts": {str(code): count for code, count in sorted(self.xid_counts.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuReading:
        def opt_int(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        def opt_float(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        def opt_bool(key: str) -> bool | None:
            value = data.get(key)
            return None if value is None else bool(value)

        xid_counts = data.get("xid_counts") or {}
        return cls(
            index=int(data["index"]),
            uuid=data.get("uuid"),
            name=data.get("name"),
            memory_total_bytes=opt_int("memory_total_bytes"),
            memory_used_bytes=opt_int("memory_used_bytes"),
            utilization_ratio=opt_float("utilization_ratio"),
            temperature_c=opt_float("temperature_c"),
            power_w=opt_float("power_w"),
            power_limit_w=opt_float("power_limit_w"),
            clock_event_reasons=opt_int("clock_event_reasons"),
            ecc_uncorrected_volatile=opt_int("ecc_uncorrected_volatile"),
            remap_pending=opt_bool("remap_pending"),
            remap_failure=opt_bool("remap_failure"),
            retired_pages_pending=opt_bool("retired_pages_pending"),
            recovery_action=opt_int("recovery_action"),
            lost=bool(data.get("lost", False)),
            reset_required=bool(data.get("reset_required", False)),
            read_error=data.get("read_error"),
            xid_events_missing=data.get("xid_events_missing"),
            xid_counts={int(code): int(count) for code, count in xid_counts.items()},
        )


@dataclass(frozen=True)
class ProbeReading:
    """Every GPU of the node at one moment, or why there is nothing to show."""

    probe: str  # "nvml" or "simulated"
    gpus: tuple[GpuReading, ...]
    unresponsive: bool = False  # the read ran past its deadline: a wedged driver
    error: str | None = None  # the read failed, or some fields did; see the message

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "unresponsive": self.unresponsive,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeReading:
        return cls(
            probe=str(data["probe"]),
            gpus=tuple(GpuReading.from_dict(gpu) for gpu in data.get("gpus") or ()),
            unresponsive=bool(data.get("unresponsive", False)),
            error=data.get("error"),
        )


class Probe(Protocol):
    """Reads the node's GPUs. ``read`` may block forever on a wedged driver: call it
    through a ``DeadlineReader``."""

    name: str

    def read(self) -> ProbeReading: ...

    def close(self) -> None: ...


@dataclass
class _InFlight:
    """One probe read running on its own thread."""

    started_s: float  # time.monotonic()
    done: threading.Event = field(default_factory=threading.Event)
    result: ProbeReading | None = None


class DeadlineReader:
    """Runs ``probe.read()`` on a daemon thread and gives up on it after ``timeout_s``.

    A Python thread cannot be killed, so a read stuck in the driver stays stuck. The
    invariant: at most one read is in flight. While it hangs, ``read`` answers
    unresponsive at once instead of starting another thread that would hang the same way
    (a wedged driver would otherwise pile up one thread per health tick). When the stuck
    call finally returns, its stale result is dropped and the next ``read`` starts fresh.
    """

    def __init__(self, probe: Probe, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.probe = probe
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._in_flight: _InFlight | None = None

    def read(self) -> ProbeReading:
        started_here = False
        with self._lock:
            in_flight = self._in_flight
            if in_flight is None or in_flight.done.is_set():
                in_flight = _InFlight(started_s=time.monotonic())
                self._in_flight = in_flight
                started_here = True
                thread = threading.Thread(
                    target=self._run, args=(in_flight,), name="gq-probe-read", daemon=True
                )
                thread.start()
        # A concurrent caller joins the read in flight, under that read's own deadline.
        remaining_s = in_flight.started_s + self.timeout_s - time.monotonic()
        if in_flight.done.wait(max(0.0, remaining_s)):
            if in_flight.result is not None:
                return in_flight.result
            return ProbeReading(probe=self.probe.name, gpus=(), error="probe read was aborted")
        error = f"probe read exceeded {self.timeout_s:g} s"
        if not started_here:
            error += f" (still hung after {time.monotonic() - in_flight.started_s:.1f} s)"
        return ProbeReading(probe=self.probe.name, gpus=(), unresponsive=True, error=error)

    def _run(self, in_flight: _InFlight) -> None:
        try:
            in_flight.result = self.probe.read()
        except Exception as exc:  # a failing read is a reading, not a dead health thread
            in_flight.result = ProbeReading(
                probe=self.probe.name, gpus=(), error=f"{type(exc).__name__}: {exc}"
            )
        finally:
            in_flight.done.set()
