"""GPU probes: what a worker knows of its GPUs' health.

``make_probe`` picks one: ``nvml`` (real GPUs), ``simulated`` (fake GPUs with injected
faults) or ``auto`` (NVML when a driver answers, simulated otherwise). Read a probe through
``DeadlineReader``: an NVML call can hang forever on a wedged driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pynvml

from gridqueue.errors import ConfigError
from gridqueue.probes.base import DeadlineReader, GpuReading, Probe, ProbeReading
from gridqueue.probes.nvml import NvmlProbe
from gridqueue.probes.simulated import Fault, SimulatedProbe

__all__ = [
    "PROBE_KINDS",
    "DeadlineReader",
    "Fault",
    "GpuReading",
    "NvmlProbe",
    "Probe",
    "ProbeReading",
    "SimulatedProbe",
    "make_probe",
]

PROBE_KINDS = ("nvml", "simulated", "auto")


def make_probe(
    kind: str,
    *,
    sim_gpus: int = 1,
    sim_gpu_name: str = "Simulated H100 80GB",
    sim_gpu_memory_gb: float = 80.0,
    fault_source: Callable[[], dict[int, Fault]] | None = None,
    nvml: Any = None,
) -> tuple[Probe, str]:
    """An open probe of ``kind`` and a one-line note for the log and the worker record.

    ``nvml`` replaces the ``pynvml`` module (tests pass a fake). ``nvml`` without a GPU
    stack is a ``ConfigError``; ``auto`` falls back to simulated GPUs and says so.
    """
    if kind not in PROBE_KINDS:
        raise ConfigError(f"unknown probe kind {kind!r}; use one of: {', '.join(PROBE_KINDS)}")

    def simulated(why: str) -> tuple[Probe, str]:
        probe = SimulatedProbe(sim_gpus, sim_gpu_name, sim_gpu_memory_gb, fault_source)
        return probe, f"{why}using simulated GPUs ({sim_gpus} x {sim_gpu_name})"

    if kind == "simulated":
        return simulated("simulated: ")
    nvml_module: Any = nvml if nvml is not None else pynvml
    probe = NvmlProbe(nvml_module)
    try:
        probe.open()
    except nvml_module.NVMLError as exc:
        if kind == "nvml":
            raise ConfigError(
                f"probe nvml: NVML unavailable ({type(exc).__name__}: {exc}); install the "
                "NVIDIA driver, or use probe kind 'simulated' (or 'auto')"
            ) from exc
        return simulated(f"auto: NVML unavailable ({type(exc).__name__}), ")
    if probe.gpu_count == 0 and kind == "auto":
        probe.close()
        return simulated("auto: NVML found no GPUs, ")
    return probe, f"{kind}: {probe.gpu_count} GPU(s), {_driver(nvml_module)}"


def _driver(nvml: Any) -> str:
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except nvml.NVMLError:
        return "driver version unknown"
    text = version.decode() if isinstance(version, bytes) else str(version)
    return f"driver {text}"
