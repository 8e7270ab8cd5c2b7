"""A fake of the ``pynvml`` module: the same function and constant names, genuine pynvml
structs and handles, and the genuine ``pynvml.NVMLError_*`` exceptions.

Each GPU is a ``FakeGpu`` whose fields the test changes at will. A GPU can be lost (every
call on it raises ``NVMLError_GpuIsLost``), need a reset, lack a function (raises
``NVMLError_NotSupported``), fail a function or every call with any NVML error
(``NVMLError_Unknown``, ``NVMLError_NoPermission``: ``FakeGpu.errors``), or hang in a
function (the call blocks on an Event until ``release()``). Xid events queued with
``raise_xid`` come out of ``nvmlEventSetWait_v2`` for event sets that registered that GPU,
as a real ``c_nvmlEventData_t``; ``wait_error`` makes the wait itself fail.

What real ``pynvml`` rejects, the fake rejects the same way: its integer arguments go
through the same ``ctypes`` conversions (a float timeout is a ``TypeError``, a negative
one wraps to a wait of ~49 days), and without ``libnvidia-ml.so.1`` ``nvmlInit`` raises
``NVMLError_LibraryNotFound`` and every other call ``NVMLError_Uninitialized``.
``FakeNvml.from_spec`` builds one from JSON, so another process (a worker started by a
test) can run on the same fake GPUs.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import pynvml

GIB = 2**30

# The only field id this fake knows; others answer "invalid argument" per field.
RECOVERY_ACTION_FIELD = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_total_bytes: int = 80 * GIB
    memory_used_bytes: int = 2 * GIB
    utilization_percent: int = 35
    temperature_c: int = 45
    power_mw: int = 250_000
    power_limit_mw: int = 700_000
    clock_event_reasons: int = 0
    ecc_uncorrected_volatile: int = 0
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, uncorr, pending, failure
    retired_pages_pending: int = 0
    recovery_action: int = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    lost: bool = False
    reset_required: bool = False
    events_supported: bool = True
    # GetHandleByIndex fails for this GPU alone with this error (lost, no permission).
    handle_error: type[pynvml.NVMLError] | None = None
    # What nvmlDeviceGetSupportedEventTypes answers: a GPU with ECC off offers no
    # double-bit ECC events, and registering a type it does not offer registers nothing.
    supported_event_types: int = (
        pynvml.nvmlEventTypeXidCriticalError
        | pynvml.nvmlEventTypeDoubleBitEccError
        | pynvml.nvmlEventTypeSingleBitEccError
    )
    # Function names (or "field:<id>") this GPU does not support.
    not_supported: set[str] = field(default_factory=set)
    # Function name -> the NVML error that call raises on this GPU; "*" is every call on
    # it (a GPU that answers nothing but NVMLError_Unknown, or a process without access).
    errors: dict[str, type[pynvml.NVMLError]] = field(default_factory=dict)


class _EventSet:
    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # gpu index -> event type mask
        self.events: queue.Queue[Any] = queue.Queue()


class FakeNvml:
    """Stands in for the ``pynvml`` module; pass it as ``NvmlProbe(nvml=...)``."""

    # The genuine exception classes: the code under test catches these.
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_ArgumentVersionMismatch = pynvml.NVMLError_ArgumentVersionMismatch
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_ResetRequired = pynvml.NVMLError_ResetRequired
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_Unknown = pynvml.NVMLError_Unknown

    # The genuine constants.
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_RESET_REQUIRED = pynvml.NVML_ERROR_RESET_REQUIRED
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
    NVML_VALUE_TYPE_DOUBLE = pynvml.NVML_VALUE_TYPE_DOUBLE
    NVML_VALUE_TYPE_UNSIGNED_INT = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_INT = pynvml.NVML_VALUE_TYPE_SIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_SHORT = pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError
    nvmlEventTypeDoubleBitEccError = pynvml.nvmlEventTypeDoubleBitEccError

    def __init__(
        self,
        gpus: int | list[FakeGpu] = 1,
        *,
        driver_loaded: bool = True,
        library_found: bool = True,
    ) -> None:
        if isinstance(gpus, int):
            gpus = [
                FakeGpu(uuid=f"GPU-00000000-0000-0000-0000-{index:012d}") for index in range(gpus)
            ]
        self.gpus = gpus
        self.driver_loaded = driver_loaded
        # False: no libnvidia-ml.so.1 on the machine (no driver installed at all).
        self.library_found = library_found
        # What nvmlEventSetWait_v2 raises instead of waiting (GpuIsLost, Unknown); None waits.
        self.wait_error: type[pynvml.NVMLError] | None = None
        self.init_count = 0
        # Opaque device handles, as NVML gives them: pointers never dereferenced.
        self._handles = [
            ctypes.cast(ctypes.c_void_p(0x1000 + 0x100 * index), pynvml.c_nvmlDevice_t)
            for index in range(len(gpus))
        ]
        self._event_sets: list[_EventSet] = []
        self._lock = threading.Lock()
        self._hanging: set[str] = set()
        self._release = threading.Event()
        self.calls: dict[str, int] = {}  # entries per function: shows whether a read began
        self.hung_calls = 0  # calls blocked right now
        # Symbols the "driver" lacks: calling one raises NVMLError_FunctionNotFound, as
        # pynvml does when the library has no such function (an older driver).
        self.missing_functions: set[str] = set()
        # Events name their device with a handle of their own, not the pointer
        # GetHandleByIndex returned: the same device, another pointer value. Whether a real
        # driver reuses the pointer cannot be assumed.
        self._event_handles = [
            ctypes.cast(ctypes.c_void_p(0x9000 + 0x100 * index), pynvml.c_nvmlDevice_t)
            for index in range(len(gpus))
        ]

    # -- test controls -------------------------------------------------------------------

    def hang(self, function: str) -> None:
        """From now on, ``function`` blocks until ``release()``: a wedged driver."""
        self._release.clear()
        self._hanging.add(function)

    def release(self) -> None:
        self._hanging.clear()
        self._release.set()

    def raise_xid(self, index: int, xid: int) -> None:
        self._raise_event(index, pynvml.nvmlEventTypeXidCriticalError, xid)

    def raise_double_bit_ecc(self, index: int) -> None:
        self._raise_event(index, pynvml.nvmlEventTypeDoubleBitEccError, 0)

    def _raise_event(self, index: int, event_type: int, event_data: int) -> None:
        data = pynvml.c_nvmlEventData_t()
        data.device = self._event_handles[index]
        data.eventType = event_type
        data.eventData = event_data
        for event_set in self._event_sets:
            if event_set.registered.get(index, 0) & event_type:
                event_set.events.put(data)

    # -- plumbing ------------------------------------------------------------------------

    def _enter(self, function: str) -> None:
        with self._lock:
            self.calls[function] = self.calls.get(function, 0) + 1
        # pynvml looks the symbol up in a loaded library, and without nvmlInit the library
        # answers "uninitialized" (with no library loaded at all, pynvml says the same).
        if self.init_count <= 0 or not self.library_found:
            raise pynvml.NVMLError_Uninitialized()
        if function in self.missing_functions:
            raise pynvml.NVMLError_FunctionNotFound()
        if function in self._hanging:
            with self._lock:
                self.hung_calls += 1
            try:
                self._release.wait()
            finally:
                with self._lock:
                    self.hung_calls -= 1

    def _index(self, handle: Any) -> int:
        address = ctypes.cast(handle, ctypes.c_void_p).value
        for handles in (self._handles, self._event_handles):
            for index, known in enumerate(handles):
                if ctypes.cast(known, ctypes.c_void_p).value == address:
                    return index
        raise pynvml.NVMLError_InvalidArgument()

    def _gpu(self, function: str, handle: Any) -> FakeGpu:
        self._enter(function)
        gpu = self.gpus[self._index(handle)]
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if gpu.reset_required:
            raise pynvml.NVMLError_ResetRequired()
        error = gpu.errors.get(function) or gpu.errors.get("*")
        if error is not None:
            raise error()
        if function in gpu.not_supported:
            raise pynvml.NVMLError_NotSupported()
        return gpu

    # -- the pynvml API ------------------------------------------------------------------

    def nvmlInit(self) -> None:
        with self._lock:
            self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        if not self.library_found:
            raise pynvml.NVMLError_LibraryNotFound()
        if not self.driver_loaded:
            raise pynvml.NVMLError_DriverNotLoaded()
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "575.57.08"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        index = ctypes.c_uint(index).value  # as pynvml converts it: a float is a TypeError
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        handle_error = self.gpus[index].handle_error
        if handle_error is not None:
            raise handle_error()
        return self._handles[index]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        memory = pynvml.c_nvmlMemory_t()
        memory.total = gpu.memory_total_bytes
        memory.used = gpu.memory_used_bytes
        memory.free = gpu.memory_total_bytes - gpu.memory_used_bytes
        return memory

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        rates = pynvml.c_nvmlUtilization_t()
        rates.gpu = gpu.utilization_percent
        rates.memory = gpu.utilization_percent // 2
        return rates

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperatureV", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError_InvalidArgument()
        return gpu.temperature_c

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError_InvalidArgument()
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        """The call's name before the rename; every driver has this symbol."""
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        if (error_type, counter_type) != (
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        ):
            raise pynvml.NVMLError_InvalidArgument()  # only the counter the probe wants
        return gpu.ecc_uncorrected_volatile

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return self._gpu("nvmlDeviceGetRemappedRows", handle).remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetRetiredPagesPendingStatus", handle).retired_pages_pending

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> Any:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for value, field_id in zip(values, field_ids, strict=True):
            value.fieldId = field_id
            if field_id != RECOVERY_ACTION_FIELD:
                value.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
            elif f"field:{field_id}" in gpu.not_supported:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            else:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = gpu.recovery_action
        return values

    def nvmlEventSetCreate(self) -> _EventSet:
        self._enter("nvmlEventSetCreate")
        event_set = _EventSet()
        self._event_sets.append(event_set)
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        gpu = self._gpu("nvmlDeviceGetSupportedEventTypes", handle)
        if not gpu.events_supported:
            raise pynvml.NVMLError_NotSupported()
        return gpu.supported_event_types

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: _EventSet) -> None:
        gpu = self._gpu("nvmlDeviceRegisterEvents", handle)
        event_types = ctypes.c_ulonglong(event_types).value  # as pynvml converts it
        # NVML: a type the device does not support fails the call, and none of the
        # requested types is registered.
        if not gpu.events_supported or event_types & ~gpu.supported_event_types:
            raise pynvml.NVMLError_NotSupported()
        index = self._index(handle)
        event_set.registered[index] = event_set.registered.get(index, 0) | event_types

    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait_v2")
        # pynvml passes c_uint(timeoutms): a float is a TypeError before the driver is
        # called, and a negative number wraps around to a wait of about 49 days.
        timeout_ms = ctypes.c_uint(timeout_ms).value
        if self.wait_error is not None:
            raise self.wait_error()
        try:
            return event_set.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError_Timeout() from None

    def nvmlEventSetWait(self, event_set: _EventSet, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)  # pynvml's alias

    def nvmlEventSetFree(self, event_set: _EventSet) -> None:
        self._enter("nvmlEventSetFree")
        self._event_sets.remove(event_set)


# -- a fake described in JSON, for another process ----------------------------------------


def _error_class(name: str) -> type[pynvml.NVMLError]:
    """``"Unknown"`` or ``"NVMLError_Unknown"`` -> ``pynvml.NVMLError_Unknown``."""
    full = name if name.startswith("NVMLError_") else f"NVMLError_{name}"
    error = getattr(pynvml, full, None)
    if not (isinstance(error, type) and issubclass(error, pynvml.NVMLError)):
        raise ValueError(f"no pynvml error class {full!r}")
    return error


def fake_from_spec(spec: str | dict[str, Any]) -> FakeNvml:
    """A fake from JSON: ``{"gpus": [<FakeGpu fields>...] | N, "driver_loaded": bool,
    "library_found": bool, "wait_error": "GpuIsLost"}``. Error classes are named
    (``"handle_error": "NoPermission"``, ``"errors": {"*": "Unknown"}``); sets are lists."""
    data: dict[str, Any] = json.loads(spec) if isinstance(spec, str) else dict(spec)
    raw_gpus = data.get("gpus", 1)
    gpus: int | list[FakeGpu]
    if isinstance(raw_gpus, int):
        gpus = raw_gpus
    else:
        gpus = []
        for index, raw in enumerate(raw_gpus):
            fields = dict(raw)
            fields.setdefault("uuid", f"GPU-00000000-0000-0000-0000-{index:012d}")
            if fields.get("handle_error"):
                fields["handle_error"] = _error_class(fields["handle_error"])
            fields["errors"] = {
                function: _error_class(name) for function, name in fields.get("errors", {}).items()
            }
            fields["not_supported"] = set(fields.get("not_supported", ()))
            if "remapped_rows" in fields:
                fields["remapped_rows"] = tuple(fields["remapped_rows"])
            gpus.append(FakeGpu(**fields))
    fake = FakeNvml(
        gpus,
        driver_loaded=bool(data.get("driver_loaded", True)),
        library_found=bool(data.get("library_found", True)),
    )
    if data.get("wait_error"):
        fake.wait_error = _error_class(data["wait_error"])
    fake.missing_functions = set(data.get("missing_functions", ()))
    return fake


# The environment variable that carries a fake's JSON spec into another process.
SPEC_ENV = "FAKE_NVML_SPEC"


def install(fake: FakeNvml) -> None:
    """Make this process's gridqueue probes open ``fake`` where they would open ``pynvml``:
    ``make_probe`` (``--probe nvml``/``auto``) and a default ``NvmlProbe``."""
    import gridqueue.probes
    import gridqueue.probes.nvml

    setattr(gridqueue.probes, "pynvml", fake)  # noqa: B010 (the module global make_probe reads)
    setattr(gridqueue.probes.nvml, "pynvml", fake)  # noqa: B010


def install_from_env() -> FakeNvml | None:
    """Install the fake that ``$FAKE_NVML_SPEC`` describes, if it is set."""
    spec = os.environ.get(SPEC_ENV)
    if not spec:
        return None
    fake = fake_from_spec(spec)
    install(fake)
    return fake
