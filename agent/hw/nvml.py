"""NVIDIA GPUs through NVML: `NvmlLike` is the `pynvml` module itself, or agent.hw.nvml_fake
when the SHARDMESH_FAKE_NVML environment variable names a JSON description. Reading a GPU
never raises for broken hardware: what cannot be read becomes None or a note."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from agent.hw.report import DeviceError, GpuInfo, GpuProcess

FAKE_NVML_ENV = "SHARDMESH_FAKE_NVML"

# NVML return codes are part of its C ABI; pynvml and the fake use the same numbers.
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12

T = TypeVar("T")


class NvmlLoadError(DeviceError):
    """No NVML implementation could be loaded (pynvml missing, or a bad fake description)."""


class NvmlLike(Protocol):
    """The part of pynvml that discovery calls (pynvml's own names); the module and FakeNvml fit."""

    @property
    def NVMLError(self) -> type[Exception]: ...  # read-only: the fake's is a subclass
    @property
    def NVML_TEMPERATURE_GPU(self) -> int: ...

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlDeviceGetProcessUtilization(self, handle: Any, last_seen: int) -> list[Any]: ...


def load_nvml() -> NvmlLike:
    """The fake described by $SHARDMESH_FAKE_NVML (read afresh each call), else pynvml."""
    fake_path = os.environ.get(FAKE_NVML_ENV)
    if fake_path:
        from agent.hw.nvml_fake import FakeNvmlConfigError, fake_from_file

        try:
            return fake_from_file(fake_path)
        except FakeNvmlConfigError as exc:
            raise NvmlLoadError(str(exc)) from exc
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlLoadError("pynvml is not installed (pip install nvidia-ml-py)") from exc
    return pynvml  # type: ignore[return-value]  # the module fits NvmlLike structurally


def _nvml_errors(nvml: NvmlLike) -> tuple[type[Exception], ...]:
    # pynvml raises NVMLLibraryMismatchError (not an NVMLError) from unversioned calls such as
    # the process lists when the driver is older than the bindings.
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    return (nvml.NVMLError, mismatch) if mismatch is not None else (nvml.NVMLError,)


def _describe(exc: Exception) -> str:
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may itself be gone
        text = ""
    return text or f"{type(exc).__name__} {getattr(exc, 'value', '')}".strip()


def _init_failure_note(exc: Exception) -> str:
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return "NVML unavailable: driver not found (libnvidia-ml.so.1 not loadable)"
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVML unavailable: driver not loaded"
    return f"NVML unavailable: {_describe(exc)}"


def discover_gpus(nvml: NvmlLike, notes: list[str]) -> list[GpuInfo]:
    errors = _nvml_errors(nvml)
    try:
        nvml.nvmlInit()
    except errors as exc:
        notes.append(_init_failure_note(exc))
        return []
    gpus: list[GpuInfo] = []
    try:
        try:
            count = nvml.nvmlDeviceGetCount()
        except errors as exc:
            notes.append(f"NVML: cannot count GPUs: {_describe(exc)}")
            return []
        for index in range(count):
            try:
                gpus.append(_query_gpu(nvml, index, errors, notes))
            except errors as exc:
                notes.append(f"GPU {index}: query failed: {_describe(exc)}")
    finally:
        try:
            nvml.nvmlShutdown()
        except errors as exc:
            notes.append(f"NVML shutdown failed: {_describe(exc)}")
    return gpus


def _query_gpu(
    nvml: NvmlLike, index: int, errors: tuple[type[Exception], ...], notes: list[str]
) -> GpuInfo:
    """Identity and memory are required (they raise: the GPU is reported failed); the rest is
    optional and becomes None."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)

    def optional(label: str, query: Callable[[], T]) -> T | None:
        try:
            return query()
        except errors as exc:
            # "Not Supported" is normal (e.g. power on some boards, utilisation under MIG).
            if getattr(exc, "value", None) != _NVML_ERROR_NOT_SUPPORTED:
                notes.append(f"GPU {index}: {label}: {_describe(exc)}")
            return None

    util = optional("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    power_mw = optional("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    limit_mw = optional("power limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    capability = optional(
        "compute capability", lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle)
    )
    compute = optional(
        "compute processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    )
    graphics = optional(
        "graphics processes", lambda: nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
    )
    processes = _merge_processes(compute, graphics)
    if processes is not None:
        _add_process_utilization(nvml, handle, processes, errors)
    return GpuInfo(
        index=index,
        name=name,
        uuid=uuid,
        memory_total=int(mem.total),
        memory_free=int(mem.free),
        memory_used=int(mem.used),
        utilization=None if util is None else int(util.gpu),
        temperature_c=optional(
            "temperature",
            lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        ),
        power_w=None if power_mw is None else power_mw / 1000.0,  # NVML reports milliwatts
        power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
        compute_capability=None if capability is None else f"{capability[0]}.{capability[1]}",
        processes=processes,
    )


_NVML_ERROR_NOT_FOUND = 6


def _add_process_utilization(
    nvml: NvmlLike, handle: Any, processes: list[GpuProcess], errors: tuple[type[Exception], ...]
) -> None:
    """Fill sm_util from NVML's per-process samples (the newest per pid). NVML answers
    "not found" when no process ran since the timestamp, and "not supported" on some boards;
    both leave sm_util as it is."""
    try:
        samples = nvml.nvmlDeviceGetProcessUtilization(handle, 0)
    except errors as exc:
        if getattr(exc, "value", None) != _NVML_ERROR_NOT_FOUND:
            return
        samples = []  # no process used the GPU lately: every one of them at 0%
    newest: dict[int, tuple[int, int]] = {}
    for sample in samples or []:
        pid, stamp = int(sample.pid), int(sample.timeStamp)
        if pid not in newest or stamp >= newest[pid][0]:
            newest[pid] = (stamp, int(sample.smUtil))
    for proc in processes:
        if proc.pid in newest:
            proc.sm_util = newest[proc.pid][1]
        else:
            proc.sm_util = 0


def _text(value: str | bytes) -> str:
    # pynvml returns bytes for some strings (the UUID today, names in old releases).
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _merge_processes(*lists: list[Any] | None) -> list[GpuProcess] | None:
    """One entry a pid across the compute and graphics lists; None if no list could be read."""
    if all(entries is None for entries in lists):
        return None
    merged: dict[int, GpuProcess] = {}
    for entries in lists:
        for proc in entries or []:
            pid = int(proc.pid)
            used = proc.usedGpuMemory
            used = None if used is None else int(used)
            seen = merged.get(pid)
            if seen is None:
                merged[pid] = GpuProcess(pid=pid, used_memory=used)
            elif used is not None and (seen.used_memory is None or used > seen.used_memory):
                seen.used_memory = used
    return sorted(merged.values(), key=lambda p: p.pid)
