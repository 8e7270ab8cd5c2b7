"""Simulated GPUs: healthy readings with injected faults, for laptops, CI and the demo.

Faults come from a ``fault_source`` callable (the worker reads them from Redis, where
``gridqueue fault inject`` writes them), keyed by GPU index. They are applied on every
read, so clearing a fault heals the GPU on the next read.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gridqueue.probes.base import GpuReading, ProbeReading

GIB = 2**30

# How often a hung read looks again whether its hang fault was cleared.
HANG_RECHECK_S = 0.05


@dataclass(frozen=True)
class Fault:
    """Faults injected into one simulated GPU."""

    xid: tuple[int, ...] = ()  # each code is counted once per occurrence in the tuple
    gpu_lost: bool = False
    ecc_dbe: bool = False  # a volatile double-bit (uncorrectable) ECC error
    temperature_c: float | None = None
    nvml_hang: bool = False  # read() blocks until this is cleared

    def to_dict(self) -> dict[str, Any]:
        return {
            "xid": list(self.xid),
            "gpu_lost": self.gpu_lost,
            "ecc_dbe": self.ecc_dbe,
            "temperature_c": self.temperature_c,
            "nvml_hang": self.nvml_hang,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        # Unknown keys are ignored: a newer CLI may write faults an older worker lacks.
        temperature_c = data.get("temperature_c")
        return cls(
            xid=tuple(int(code) for code in data.get("xid") or ()),
            gpu_lost=bool(data.get("gpu_lost", False)),
            ecc_dbe=bool(data.get("ecc_dbe", False)),
            temperature_c=None if temperature_c is None else float(temperature_c),
            nvml_hang=bool(data.get("nvml_hang", False)),
        )

    def merge(self, other: Fault) -> Fault:
        """Both faults at once; ``other``'s temperature wins when it sets one."""
        return Fault(
            xid=self.xid + tuple(code for code in other.xid if code not in self.xid),
            gpu_lost=self.gpu_lost or other.gpu_lost,
            ecc_dbe=self.ecc_dbe or other.ecc_dbe,
            temperature_c=(
                other.temperature_c if other.temperature_c is not None else self.temperature_c
            ),
            nvml_hang=self.nvml_hang or other.nvml_hang,
        )


class SimulatedProbe:
    """``count`` identical healthy GPUs, with the faults ``fault_source`` names applied."""

    name = "simulated"

    def __init__(
        self,
        count: int,
        name: str,
        memory_gb: float,
        fault_source: Callable[[], dict[int, Fault]] | None = None,
    ) -> None:
        if count < 0:
            raise ValueError("count must be zero or more")
        self.count = count
        self.gpu_name = name
        self.memory_total_bytes = int(memory_gb * GIB)
        self.fault_source = fault_source
        self._closed = False

    def read(self) -> ProbeReading:
        faults = self._faults()
        # A wedged driver: block like a stuck NVML call would, until the fault is cleared
        # (or the probe closed), so DeadlineReader sees a hang and not an error.
        while any(fault.nvml_hang for fault in faults.values()) and not self._closed:
            time.sleep(HANG_RECHECK_S)
            faults = self._faults()
        gpus = tuple(self._gpu(index, faults.get(index)) for index in range(self.count))
        return ProbeReading(probe=self.name, gpus=gpus)

    def close(self) -> None:
        self._closed = True

    def _faults(self) -> dict[int, Fault]:
        return self.fault_source() if self.fault_source is not None else {}

    def _gpu(self, index: int, fault: Fault | None) -> GpuReading:
        fault = fault or Fault()
        xid_counts = dict(Counter(fault.xid))
        if fault.gpu_lost:
            # Fallen off the bus: nothing can be read from it but the fact.
            return GpuReading(index=index, lost=True, xid_counts=xid_counts)
        return GpuReading(
            index=index,
            uuid=f"GPU-5e000000-0000-4000-8000-{index:012d}",
            name=self.gpu_name,
            memory_total_bytes=self.memory_total_bytes,
            memory_used_bytes=min(GIB, self.memory_total_bytes),
            utilization_ratio=0.3,
            temperature_c=fault.temperature_c if fault.temperature_c is not None else 45.0,
            power_w=120.0,
            power_limit_w=700.0,
            clock_event_reasons=0,
            ecc_uncorrected_volatile=1 if fault.ecc_dbe else 0,
            remap_pending=False,
            remap_failure=False,
            retired_pages_pending=False,
            recovery_action=0,
            xid_counts=xid_counts,
        )
