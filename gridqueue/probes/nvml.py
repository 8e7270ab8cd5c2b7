"""The NVML probe: real GPUs through nvidia-ml-py (``pynvml``).

It owns one NVML session (``open`` .. ``close``) and a daemon thread that waits on an NVML
event set for Xid and double-bit ECC events and counts them per GPU, so an Xid raised
between two health reads is never missed. ``read`` samples every field the health
classifier uses. Any NVML call can hang on a wedged driver: run ``read`` through
``DeadlineReader``.

NVML exceptions define ``__eq__`` without ``__hash__``, so they are caught by class and
never kept in sets or dicts.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml

from gridqueue.logs import get_logger
from gridqueue.probes.base import GpuReading, ProbeReading

log = get_logger("gridqueue.probes.nvml")

T = TypeVar("T")

# Xid code the driver logs for a double-bit ECC error; a DBE event carries no Xid of its
# own, so it is counted under this code.
XID_DOUBLE_BIT_ECC = 48


class _GpuGone(Exception):
    """This GPU cannot be read any more: stop reading its other fields."""

    def __init__(self, *, lost: bool = False, reset_required: bool = False) -> None:
        super().__init__("gpu lost" if lost else "gpu reset required")
        self.lost = lost
        self.reset_required = reset_required


@dataclass
class _Gpu:
    index: int
    handle: Any  # None while the device cannot be opened
    open_error: str | None = None
    uuid: str | None = None
    name: str | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)
    xid_events: bool = False  # registered in the event set
    event_types: int = 0  # the nvmlEventType* mask registered for it
    xid_missing: str | None = None  # why its Xid events are not watched


def _handle_key(handle: object) -> object:
    """A hashable identity for a device handle: NVML handles are ctypes pointers, and two
    pointer objects to the same device compare unequal, so compare their addresses."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """Reads NVIDIA GPUs through NVML. ``nvml`` is the ``pynvml`` module, or a fake of it."""

    name = "nvml"

    def __init__(self, nvml: Any = None, xid_poll_ms: int = 500) -> None:
        self.nvml: Any = nvml if nvml is not None else pynvml
        # pynvml passes the wait's timeout as a C unsigned int: a float would raise
        # TypeError in the Xid thread, and a negative one would wait for 49 days.
        if int(xid_poll_ms) <= 0:
            raise ValueError(f"xid_poll_ms must be a positive number of ms, not {xid_poll_ms!r}")
        self.xid_poll_ms = int(xid_poll_ms)
        nv = self.nvml
        # Fields a GPU or driver may simply not offer: None, not a fault.
        self._unavailable: tuple[type[BaseException], ...] = (
            nv.NVMLError_NotSupported,
            nv.NVMLError_FunctionNotFound,
        )
        self._lock = threading.Lock()  # guards xid counts and the Xid thread's last error
        self._gpus: list[_Gpu] = []
        self._by_handle: dict[object, _Gpu] = {}
        self._opened = False
        self._event_set: Any = None
        self._xid_setup_error: str | None = None  # events unavailable on some or all GPUs
        self._xid_wait_error: str | None = None  # the event wait is failing right now
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    def open(self) -> None:
        """Start the NVML session and the Xid event thread. Raises ``pynvml.NVMLError``
        (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``) without a GPU stack."""
        if self._opened:
            return
        nv = self.nvml
        nv.nvmlInit()
        try:
            gpus = [self._open_gpu(i) for i in range(nv.nvmlDeviceGetCount())]
        except Exception:
            nv.nvmlShutdown()  # nvmlInit is reference counted: balance it
            raise
        # Xid events are matched to GPUs by UUID: know it before the first event. One that
        # cannot be read now is read with the GPU's readings; events fall back to the handle.
        for gpu in gpus:
            if gpu.handle is not None:
                with contextlib.suppress(nv.NVMLError):
                    gpu.uuid = _text(nv.nvmlDeviceGetUUID(gpu.handle))
        self._gpus = gpus
        self._by_handle = {_handle_key(g.handle): g for g in gpus if g.handle is not None}
        self._opened = True
        self._stop.clear()
        self._xid_setup_error = None
        self._xid_wait_error = None
        self._start_xid_events()

    def _open_gpu(self, index: int) -> _Gpu:
        """One device's handle. A device that cannot be opened (lost, no permission) does
        not sink the others: it is kept without a handle and read as lost until it opens."""
        nv = self.nvml
        try:
            return _Gpu(index, nv.nvmlDeviceGetHandleByIndex(index))
        except (nv.NVMLError_Uninitialized, nv.NVMLError_DriverNotLoaded):
            raise  # the whole stack, not this device
        except nv.NVMLError as exc:
            log.warning("nvml.gpu_unopened", gpu=index, error=type(exc).__name__)
            return _Gpu(index, None, open_error=type(exc).__name__)

    def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=self.xid_poll_ms / 1000 + 1.0)
            stuck = self._xid_thread.is_alive()
            self._xid_thread = None
            if stuck:
                # Freeing the set under a thread still waiting on it would be a use after
                # free in the driver; leak it, the process is going away anyway.
                self._event_set = None
        nv = self.nvml
        try:
            if self._event_set is not None:
                nv.nvmlEventSetFree(self._event_set)
        except nv.NVMLError as exc:
            log.warning("nvml.event_set_free_failed", error=type(exc).__name__)
        self._event_set = None
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as exc:
            log.warning("nvml.shutdown_failed", error=type(exc).__name__)

    def read(self) -> ProbeReading:
        if not self._opened:
            self.open()
        notes: list[str] = []
        gpus = tuple(self._read_gpu(gpu, notes) for gpu in self._gpus)
        with self._lock:
            for error in (self._xid_setup_error, self._xid_wait_error):
                if error is not None:
                    notes.append(f"xid events: {error}")
        return ProbeReading(probe=self.name, gpus=gpus, error="; ".join(notes) or None)

    def event_registrations(self) -> list[dict[str, Any]]:
        """Per GPU, what the Xid thread watches: ``index``, ``event_types`` (names of the
        registered nvmlEventType* bits) and ``xid_events_missing`` (why not, or None)."""
        nv = self.nvml
        names = (
            (nv.nvmlEventTypeXidCriticalError, "xid_critical_error"),
            (nv.nvmlEventTypeDoubleBitEccError, "double_bit_ecc_error"),
        )
        return [
            {
                "index": gpu.index,
                "event_types": [name for bit, name in names if gpu.event_types & bit],
                "xid_events_missing": self._xid_missing(gpu),
            }
            for gpu in self._gpus
        ]

    # -- one GPU -------------------------------------------------------------------------

    def _read_gpu(self, gpu: _Gpu, notes: list[str]) -> GpuReading:
        nv = self.nvml
        if gpu.handle is None:
            try:  # a device that could not be opened: try again, it may be back
                gpu.handle = nv.nvmlDeviceGetHandleByIndex(gpu.index)
                gpu.open_error = None
            except nv.NVMLError as exc:
                gpu.open_error = type(exc).__name__
                notes.append(f"gpu{gpu.index} cannot be opened: {gpu.open_error}")
                return GpuReading(
                    index=gpu.index,
                    lost=True,
                    xid_counts=self._xid_counts(gpu),
                    xid_events_missing=self._xid_missing(gpu),
                )
        h = gpu.handle
        answered = 0  # calls that returned a value
        failures: list[str] = []  # calls that failed with an error, not "not supported"

        def get(what: str, call: Callable[[], T]) -> T | None:
            nonlocal answered
            try:
                value = call()
            except self._unavailable:
                return None
            except nv.NVMLError_GpuIsLost as exc:
                raise _GpuGone(lost=True) from exc
            except nv.NVMLError_ResetRequired as exc:
                raise _GpuGone(reset_required=True) from exc
            except nv.NVMLError as exc:
                notes.append(f"gpu{gpu.index} {what}: {type(exc).__name__}")
                failures.append(f"{type(exc).__name__}: {exc}")
                return None
            answered += 1
            return value

        try:
            # Identity does not change: read it until we have it, then keep it, so a GPU
            # that falls off the bus is still reported by name.
            if gpu.name is None:
                name = get("name", lambda: nv.nvmlDeviceGetName(h))
                gpu.name = None if name is None else _text(name)
            if gpu.uuid is None:
                uuid = get("uuid", lambda: nv.nvmlDeviceGetUUID(h))
                gpu.uuid = None if uuid is None else _text(uuid)
            memory = get("memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
            utilization = get("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
            temperature_c = get("temperature", lambda: self._temperature_c(h))
            power_mw = get("power", lambda: nv.nvmlDeviceGetPowerUsage(h))
            power_limit_mw = get("power_limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
            clock_event_reasons = get("clock_events", lambda: self._clock_event_reasons(h))
            ecc = get(
                "ecc",
                lambda: nv.nvmlDeviceGetTotalEccErrors(
                    h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                ),
            )
            remapped = get("remapped_rows", lambda: nv.nvmlDeviceGetRemappedRows(h))
            retired = get("retired_pages", lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(h))
            recovery_action = self._recovery_action(gpu, get, notes)
        except _GpuGone as gone:
            return GpuReading(
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                lost=gone.lost,
                reset_required=gone.reset_required,
                xid_counts=self._xid_counts(gpu),
                xid_events_missing=self._xid_missing(gpu),
            )
        # Nothing answered and something failed: the GPU is not answering (an error on
        # one field beside answers, or fields it does not support, is not that).
        read_error = failures[0] if failures and not answered else None
        return GpuReading(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            memory_total_bytes=None if memory is None else int(memory.total),
            memory_used_bytes=None if memory is None else int(memory.used),
            utilization_ratio=None if utilization is None else int(utilization.gpu) / 100,
            temperature_c=None if temperature_c is None else float(temperature_c),
            power_w=None if power_mw is None else int(power_mw) / 1000,
            power_limit_w=None if power_limit_mw is None else int(power_limit_mw) / 1000,
            clock_event_reasons=None if clock_event_reasons is None else int(clock_event_reasons),
            ecc_uncorrected_volatile=None if ecc is None else int(ecc),
            remap_pending=None if remapped is None else bool(remapped[2]),
            remap_failure=None if remapped is None else bool(remapped[3]),
            retired_pages_pending=None if retired is None else bool(retired),
            recovery_action=recovery_action,
            xid_counts=self._xid_counts(gpu),
            read_error=read_error,
            xid_events_missing=self._xid_missing(gpu),
        )

    def _temperature_c(self, handle: Any) -> Any:
        nv = self.nvml
        versioned = getattr(nv, "nvmlDeviceGetTemperatureV", None)
        if versioned is not None:
            try:
                return versioned(handle, nv.NVML_TEMPERATURE_GPU)
            except (nv.NVMLError_FunctionNotFound, nv.NVMLError_ArgumentVersionMismatch):
                pass  # a driver older than the binding: use the deprecated call
        return nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)

    def _clock_event_reasons(self, handle: Any) -> Any:
        nv = self.nvml
        # The bindings always have the new name; a driver older than the rename lacks the
        # symbol, and pynvml raises FunctionNotFound: ask by the old name, as every driver
        # has it (thermal slowdown must not be lost on an older driver).
        call = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if call is not None:
            try:
                return call(handle)
            except nv.NVMLError_FunctionNotFound:
                pass
        return nv.nvmlDeviceGetCurrentClocksThrottleReasons(handle)

    def _recovery_action(
        self, gpu: _Gpu, get: Callable[[str, Callable[[], Any]], Any], notes: list[str]
    ) -> int | None:
        nv = self.nvml
        values = get(
            "recovery_action",
            lambda: nv.nvmlDeviceGetFieldValues(
                gpu.handle, [nv.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
            ),
        )
        if values is None:
            return None
        value = values[0]
        # The call succeeds as a whole and reports each field's own status.
        status = int(value.nvmlReturn)
        if status == nv.NVML_SUCCESS:
            member = {
                nv.NVML_VALUE_TYPE_DOUBLE: "dVal",
                nv.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                nv.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
                nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
                nv.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
                nv.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
            }.get(int(value.valueType), "uiVal")
            return int(getattr(value.value, member))
        if status == nv.NVML_ERROR_GPU_IS_LOST:
            raise _GpuGone(lost=True)
        if status == nv.NVML_ERROR_RESET_REQUIRED:
            raise _GpuGone(reset_required=True)
        # A driver that predates field 230 answers "not supported" or "invalid argument".
        if status not in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_INVALID_ARGUMENT):
            notes.append(f"gpu{gpu.index} recovery_action: NVML error {status}")
        return None

    def _xid_counts(self, gpu: _Gpu) -> dict[int, int]:
        with self._lock:
            return dict(gpu.xid_counts)

    def _xid_missing(self, gpu: _Gpu) -> str | None:
        with self._lock:
            if gpu.xid_events and self._xid_wait_error is not None:
                return f"the event wait fails: {self._xid_wait_error}"
            return gpu.xid_missing

    # -- Xid events ----------------------------------------------------------------------

    def _start_xid_events(self) -> None:
        nv = self.nvml
        mask = nv.nvmlEventTypeXidCriticalError | nv.nvmlEventTypeDoubleBitEccError
        for gpu in self._gpus:
            gpu.xid_events = False
            gpu.event_types = 0
            gpu.xid_missing = None
        try:
            self._event_set = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            self._xid_setup_error = f"cannot create event set: {type(exc).__name__}"
            for gpu in self._gpus:
                gpu.xid_missing = self._xid_setup_error
            return
        registered = 0
        without: list[str] = []
        for gpu in self._gpus:
            if gpu.handle is None:
                # Not opened: read as lost. Its events are not watched even once it opens.
                gpu.xid_missing = f"not registered: the GPU could not be opened ({gpu.open_error})"
                continue
            # Register only the types the GPU offers: asking for one it does not (the
            # double-bit ECC event with ECC off) registers none of them, Xid included.
            try:
                offered = int(nv.nvmlDeviceGetSupportedEventTypes(gpu.handle)) & mask
            except nv.NVMLError_NotSupported:
                offered = 0
            except nv.NVMLError as exc:
                self._xid_setup_error = f"gpu{gpu.index} event types: {type(exc).__name__}"
                gpu.xid_missing = f"event types: {type(exc).__name__}"
                continue
            if not offered & nv.nvmlEventTypeXidCriticalError:
                # Some GPUs (and vGPUs) offer no Xid events: their health comes from the
                # sampled fields alone, and the reading says so.
                without.append(f"gpu{gpu.index}")
                gpu.xid_missing = "the GPU does not offer them"
            if not offered:
                continue
            try:
                nv.nvmlDeviceRegisterEvents(gpu.handle, offered, self._event_set)
                registered += 1
            except nv.NVMLError as exc:
                self._xid_setup_error = f"gpu{gpu.index} register: {type(exc).__name__}"
                gpu.xid_missing = f"register: {type(exc).__name__}"
                continue
            gpu.event_types = offered
            gpu.xid_events = bool(offered & nv.nvmlEventTypeXidCriticalError)
        if without:
            self._xid_setup_error = self._xid_setup_error or (
                f"no Xid events on {', '.join(without)} (the GPU does not offer them)"
            )
        if registered == 0:
            return
        self._xid_thread = threading.Thread(target=self._xid_loop, name="gq-nvml-xid", daemon=True)
        self._xid_thread.start()

    def _xid_loop(self) -> None:
        nv = self.nvml
        event_set = self._event_set
        while not self._stop.is_set():
            try:
                # Short slices, so close() is never kept waiting longer than one of them.
                data = nv.nvmlEventSetWait_v2(event_set, self.xid_poll_ms)
            except nv.NVMLError_Timeout:
                self._set_wait_error(None)  # nothing happened
                continue
            except nv.NVMLError as exc:
                self._set_wait_error(type(exc).__name__)
                # Back off instead of spinning on an event set that keeps failing.
                self._stop.wait(self.xid_poll_ms / 1000)
                continue
            except Exception as exc:
                # Not an NVML answer (a bug, a bad argument): this thread must not end
                # silently, or Xids go unwatched with nothing to say so.
                log.error("nvml.xid_wait_failed", error=repr(exc))
                self._set_wait_error(type(exc).__name__)
                self._stop.wait(self.xid_poll_ms / 1000)
                continue
            self._set_wait_error(None)
            self._count_event(data)

    def _gpu_of_event(self, device: Any) -> _Gpu | None:
        """The GPU an event names, by UUID: the event's device handle need not be the
        pointer GetHandleByIndex returned. By handle only if the UUID cannot be read."""
        try:
            uuid = _text(self.nvml.nvmlDeviceGetUUID(device))
        except self.nvml.NVMLError:
            return self._by_handle.get(_handle_key(device))
        for gpu in self._gpus:
            if gpu.uuid == uuid:
                return gpu
        return self._by_handle.get(_handle_key(device))

    def _set_wait_error(self, error: str | None) -> None:
        with self._lock:
            self._xid_wait_error = error

    def _count_event(self, data: Any) -> None:
        nv = self.nvml
        event_type = int(data.eventType)
        if event_type & nv.nvmlEventTypeXidCriticalError:
            code = int(data.eventData)
        elif event_type & nv.nvmlEventTypeDoubleBitEccError:
            code = XID_DOUBLE_BIT_ECC
        else:
            return
        gpu = self._gpu_of_event(data.device)
        if gpu is None:
            log.warning("nvml.xid_unknown_device", xid=code)
            return
        with self._lock:
            gpu.xid_counts[code] = gpu.xid_counts.get(code, 0) + 1
        log.warning("nvml.xid", gpu=gpu.index, xid=code)
