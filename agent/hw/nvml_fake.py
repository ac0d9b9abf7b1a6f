"""A fake NVML with the same function names, units and error type as `pynvml`.

Built from a JSON description so tests (and agents run by tests) see the GPUs they need on a
machine with none. Raw NVML units are kept (power in milliwatts, capability as a tuple) so the
discovery code runs unchanged on the fake and on the real module.

JSON shape (every GPU key is optional; a missing key makes its query raise "Not Supported"):

    {
      "driver": true,              # false: nvmlInit raises LibraryNotFound;
                                   # "not_loaded": nvmlInit raises DriverNotLoaded
      "bytes_strings": false,      # true: name/uuid come back as bytes (old pynvml releases)
      "gpus": [
        {
          "name": "NVIDIA H100 80GB HBM3",
          "uuid": "GPU-0b4c...",
          "memory_total": 85899345920, "memory_used": 1073741824,  # bytes; free = total - used
          "utilization": 12, "memory_utilization": 3,             # percent
          "temperature_c": 41,
          "power_w": 123.5, "power_limit_w": 700,                  # watts, reported as mW
          "compute_capability": [9, 0],
          "compute_processes": [{"pid": 4242, "used_memory": 1073741824}],
          "graphics_processes": [],
          "process_utilization": [{"pid": 4242, "sm_util": 80}],  # percent, per process
          "fail": false            # true: every query on this GPU raises "GPU is lost"
        }
      ]
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0

# Same wording as pynvml, so notes read the same on the fake and on a real machine.
_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Mirror of pynvml.NVMLError: the NVML return code is in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_LIBRARY_NOT_FOUND)


class NVMLError_DriverNotLoaded(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_DRIVER_NOT_LOADED)


class FakeNvmlConfigError(ValueError):
    """The fake's JSON description is missing or malformed."""


@dataclass(frozen=True)
class FakeMemory:
    """Shaped like pynvml's c_nvmlMemory_t."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """Shaped like pynvml's c_nvmlUtilization_t."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class FakeProcess:
    """Shaped like pynvml's friendly process object (usedGpuMemory may be None)."""

    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class FakeUtilizationSample:
    """Shaped like pynvml's c_nvmlProcessUtilizationSample_t."""

    pid: int
    timeStamp: int
    smUtil: int
    memUtil: int


@dataclass(frozen=True)
class FakeHandle:
    index: int


class FakeNvml:
    """The subset of the pynvml module that shardmesh calls, answered from a description."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST

    def __init__(self, description: dict[str, Any]) -> None:
        _validate(description)
        self._driver: bool | str = description.get("driver", True)
        self._bytes_strings = bool(description.get("bytes_strings", False))
        self._gpus: list[dict[str, Any]] = list(description.get("gpus", []))
        self.init_count = 0  # live nvmlInit calls not yet shut down; tests check it returns to 0

    # -- library lifetime -------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self._driver is False:
            raise NVMLError_LibraryNotFound()
        if self._driver == "not_loaded":
            raise NVMLError_DriverNotLoaded()
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self._gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    # -- per-device queries -----------------------------------------------------------------
    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        return self._text(self._field(handle, "name"))

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        return self._text(self._field(handle, "uuid"))

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> FakeMemory:
        total = int(self._field(handle, "memory_total"))
        used = int(self._gpu(handle).get("memory_used", 0))
        return FakeMemory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        gpu = int(self._field(handle, "utilization"))
        return FakeUtilization(gpu=gpu, memory=int(self._gpu(handle).get("memory_utilization", 0)))

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._field(handle, "temperature_c"))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return round(float(self._field(handle, "power_w")) * 1000)  # NVML reports milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return round(float(self._field(handle, "power_limit_w")) * 1000)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeHandle) -> tuple[int, int]:
        major, minor = self._field(handle, "compute_capability")
        return int(major), int(minor)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[FakeProcess]:
        return _processes(self._field(handle, "compute_processes"))

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[FakeProcess]:
        return _processes(self._field(handle, "graphics_processes"))

    def nvmlDeviceGetProcessUtilization(
        self, handle: FakeHandle, last_seen: int
    ) -> list[FakeUtilizationSample]:
        entries = self._field(handle, "process_utilization")
        if not entries:
            raise NVMLError(NVML_ERROR_NOT_FOUND)  # what NVML says when no process ran
        return [
            FakeUtilizationSample(
                pid=int(e["pid"]), timeStamp=1, smUtil=int(e["sm_util"]), memUtil=0
            )
            for e in entries
        ]

    # -- helpers ----------------------------------------------------------------------------
    def _check_init(self) -> None:
        if self.init_count <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: FakeHandle) -> dict[str, Any]:
        self._check_init()
        gpu = self._gpus[handle.index]
        if gpu.get("fail"):
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _field(self, handle: FakeHandle, key: str) -> Any:
        gpu = self._gpu(handle)
        if key not in gpu:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu[key]

    def _text(self, value: Any) -> str | bytes:
        text = str(value)
        return text.encode() if self._bytes_strings else text


def _processes(entries: list[dict[str, Any]]) -> list[FakeProcess]:
    return [FakeProcess(pid=int(p["pid"]), usedGpuMemory=p.get("used_memory")) for p in entries]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_capability(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)


def _is_process_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, dict)
        and _is_int(p.get("pid"))
        and (p.get("used_memory") is None or _is_int(p.get("used_memory")))
        for p in value
    )


# Checked up front so a typo in a test fixture fails loudly instead of reading as "unsupported".
_GPU_KEYS = {
    "name": lambda v: isinstance(v, str),
    "uuid": lambda v: isinstance(v, str),
    "memory_total": _is_int,
    "memory_used": _is_int,
    "utilization": _is_int,
    "memory_utilization": _is_int,
    "temperature_c": _is_int,
    "power_w": _is_number,
    "power_limit_w": _is_number,
    "compute_capability": _is_capability,
    "compute_processes": _is_process_list,
    "graphics_processes": _is_process_list,
    "process_utilization": lambda v: (
        isinstance(v, list)
        and all(
            isinstance(e, dict) and _is_int(e.get("pid")) and _is_int(e.get("sm_util")) for e in v
        )
    ),
    "fail": lambda v: isinstance(v, bool),
}


def _validate(description: Any) -> None:
    if not isinstance(description, dict):
        raise FakeNvmlConfigError("fake NVML description must be a JSON object")
    unknown = set(description) - {"driver", "bytes_strings", "gpus"}
    if unknown:
        raise FakeNvmlConfigError(f"fake NVML description has unknown keys: {sorted(unknown)}")
    driver = description.get("driver", True)
    if not (isinstance(driver, bool) or driver == "not_loaded"):
        raise FakeNvmlConfigError(
            f'fake NVML "driver" must be true, false or "not_loaded": {driver!r}'
        )
    gpus = description.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, dict) for g in gpus):
        raise FakeNvmlConfigError('fake NVML "gpus" must be a list of objects')
    for index, gpu in enumerate(gpus):
        for key, value in gpu.items():
            check = _GPU_KEYS.get(key)
            if check is None:
                raise FakeNvmlConfigError(f"fake NVML GPU {index}: unknown key {key!r}")
            if not check(value):
                raise FakeNvmlConfigError(
                    f"fake NVML GPU {index}: bad value for {key!r}: {value!r}"
                )


def fake_from_file(path: str | Path) -> FakeNvml:
    """Read the description afresh; callers reload to see edits made while an agent runs."""
    try:
        description = json.loads(Path(path).read_text())
    except OSError as exc:
        raise FakeNvmlConfigError(f"cannot read fake NVML file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise FakeNvmlConfigError(f"fake NVML file {path} is not valid JSON: {exc}") from exc
    return FakeNvml(description)
