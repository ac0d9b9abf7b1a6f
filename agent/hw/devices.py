"""Local device discovery: NVIDIA GPUs through NVML, plus the CPU and RAM.

Discovery never raises for missing or broken hardware: what cannot be read becomes None or a
note in the report, so a machine without a GPU (or with one broken GPU) still serves. NVML is
reached through `NvmlLike`: the `pynvml` module itself, or `agent.nvml_fake` when the
SHARDMESH_FAKE_NVML environment variable names a JSON description.

Imports stay light (no torch, no transformers): `shardmesh devices` must answer in well under a
second.
"""

from __future__ import annotations

import io
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil

FAKE_NVML_ENV = "SHARDMESH_FAKE_NVML"

# NVML return codes are part of its C ABI; pynvml and the fake use the same numbers.
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12

_GIB = 1024**3

T = TypeVar("T")


class DeviceError(Exception):
    """Base of the errors this module raises."""


class NvmlLoadError(DeviceError):
    """No NVML implementation could be loaded (pynvml missing, or a bad fake description)."""


class NvmlLike(Protocol):
    """The part of pynvml that discovery calls (pynvml's own names); the module and FakeNvml fit."""

    NVMLError: type[Exception]
    NVML_TEMPERATURE_GPU: int

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


@dataclass
class GpuProcess:
    pid: int
    used_memory: int | None  # bytes; None where NVML cannot tell (e.g. inside some containers)
    # Percent of the GPU's SMs this process kept busy in NVML's recent samples; None where
    # the GPU keeps no per-process samples. The idle policy tells owner from agent with it.
    sm_util: int | None = None


@dataclass
class GpuInfo:
    index: int  # NVML index (PCI bus order); see best_cuda_device for the CUDA index
    name: str
    uuid: str
    memory_total: int  # bytes
    memory_free: int
    memory_used: int
    utilization: int | None  # percent
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    compute_capability: str | None  # "9.0"
    processes: list[GpuProcess] | None  # None: NVML could not list them


@dataclass
class CpuInfo:
    model: str
    cores_physical: int | None  # None where the OS does not say
    cores_logical: int
    load_1m: float


@dataclass
class MemoryInfo:
    total: int  # bytes
    available: int


@dataclass
class DeviceReport:
    gpus: list[GpuInfo]
    cpu: CpuInfo
    memory: MemoryInfo
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types with stable keys: gpus, cpu, memory, notes."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceReport:
        """Inverse of to_json, e.g. for a report fetched from the daemon."""
        try:
            gpus = [
                GpuInfo(
                    **{
                        **gpu,
                        "processes": None
                        if gpu["processes"] is None
                        else [GpuProcess(**p) for p in gpu["processes"]],
                    }
                )
                for gpu in data["gpus"]
            ]
            return cls(
                gpus=gpus,
                cpu=CpuInfo(**data["cpu"]),
                memory=MemoryInfo(**data["memory"]),
                notes=list(data["notes"]),
            )
        except (KeyError, TypeError) as exc:
            raise DeviceError(f"malformed device report: {exc}") from exc

    def summaries(self) -> list[dict[str, Any]]:
        """One dict per GPU, then one for the CPU (with RAM), as the capacity ad carries them."""
        rows: list[dict[str, Any]] = [
            {
                "kind": "gpu",
                "name": gpu.name,
                "memory_total": gpu.memory_total,
                "memory_free": gpu.memory_free,
                "utilization": None if gpu.utilization is None else float(gpu.utilization),
            }
            for gpu in self.gpus
        ]
        rows.append(
            {
                "kind": "cpu",
                "name": self.cpu.model,
                "memory_total": self.memory.total,
                "memory_free": self.memory.available,
                "utilization": cpu_utilization(self.cpu),
            }
        )
        return rows


def cpu_utilization(cpu: CpuInfo) -> float:
    """Percent busy from the 1-minute load (a sampling-free stand-in for cpu_percent)."""
    return round(min(100.0, 100.0 * cpu.load_1m / max(cpu.cores_logical, 1)), 1)


# -- NVML selection ---------------------------------------------------------------------------


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


# -- discovery --------------------------------------------------------------------------------


def discover(nvml: NvmlLike | None = None) -> DeviceReport:
    """Every GPU NVML sees, the CPU and RAM; failures become None fields or notes."""
    notes: list[str] = []
    gpus: list[GpuInfo] = []
    if nvml is None:
        try:
            nvml = load_nvml()
        except NvmlLoadError as exc:
            notes.append(f"NVML unavailable: {exc}")
    if nvml is not None:
        gpus = _discover_gpus(nvml, notes)
    cpu, memory = _discover_cpu(notes)
    return DeviceReport(gpus=gpus, cpu=cpu, memory=memory, notes=notes)


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


def _discover_gpus(nvml: NvmlLike, notes: list[str]) -> list[GpuInfo]:
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


# -- CPU and RAM ------------------------------------------------------------------------------

# First match wins: x86 ("model name"), Raspberry Pi and other boards ("Model", "Hardware"),
# old ARM kernels ("Processor"), MIPS ("cpu model"), POWER ("cpu").
_CPUINFO_KEYS = ("model name", "Model", "Hardware", "Processor", "cpu model", "cpu")


def cpu_model_from_cpuinfo(text: str) -> str | None:
    """The CPU's model name from /proc/cpuinfo text, or None if it names none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if sep and value and key not in fields:
            fields[key] = value
    return next((fields[key] for key in _CPUINFO_KEYS if key in fields), None)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    return cpu_model_from_cpuinfo(text) or platform.processor() or platform.machine() or "unknown"


def _discover_cpu(notes: list[str]) -> tuple[CpuInfo, MemoryInfo]:
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    try:
        load_1m = float(psutil.getloadavg()[0])
    except (OSError, AttributeError) as exc:
        notes.append(f"CPU load unavailable: {exc}")
        load_1m = 0.0
    cpu = CpuInfo(
        model=_cpu_model(),
        cores_physical=psutil.cpu_count(logical=False),
        cores_logical=logical,
        load_1m=round(load_1m, 2),
    )
    vm = psutil.virtual_memory()
    return cpu, MemoryInfo(total=int(vm.total), available=int(vm.available))


# -- choosing and showing ---------------------------------------------------------------------


def best_cuda_device(report: DeviceReport, env: Mapping[str, str] | None = None) -> int | None:
    """The CUDA index of the GPU with the most free memory, or None without a usable GPU."""
    visible = cuda_visible_gpus(report, env)
    if not visible:
        return None
    cuda_index, _ = max(visible, key=lambda pair: (pair[1].memory_free, -pair[0]))
    return cuda_index


def cuda_visible_gpus(
    report: DeviceReport, env: Mapping[str, str] | None = None
) -> list[tuple[int, GpuInfo]]:
    """(CUDA index, GPU) for each discovered GPU that CUDA will see.

    NVML numbers every GPU on the machine; CUDA numbers only those in CUDA_VISIBLE_DEVICES
    (indices or UUID prefixes), in that order. The CUDA index equals the NVML index only under
    CUDA_DEVICE_ORDER=PCI_BUS_ID (set it before CUDA starts) or on machines whose GPUs are all
    alike, since CUDA's default order puts the fastest first.
    """
    env = os.environ if env is None else env
    spec = env.get("CUDA_VISIBLE_DEVICES")
    gpus = report.gpus
    if spec is None:
        return [(gpu.index, gpu) for gpu in gpus]
    by_index = {gpu.index: gpu for gpu in gpus}
    visible: list[tuple[int, GpuInfo]] = []
    for position, raw in enumerate(spec.split(",")):
        entry = raw.strip()
        if entry.isdigit():
            # A GPU that failed discovery still takes its CUDA position; it is just not listed.
            gpu = by_index.get(int(entry))
            if gpu is not None:
                visible.append((position, gpu))
            continue
        matches = [gpu for gpu in gpus if entry and gpu.uuid.startswith(entry)]
        if len(matches) != 1:
            # CUDA stops at the first entry it cannot resolve ("", "-1", an unknown UUID); MIG
            # instances cannot be mapped from here either, so stop rather than misnumber.
            break
        visible.append((position, matches[0]))
    return visible


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / _GIB:.1f}"


def _or_dash(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_devices(report: DeviceReport, width: int = 100) -> str:
    """Human-readable tables (memory in GiB) with the notes underneath."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def table(title: str) -> Table:
        return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False, emoji=False)

    if report.gpus:
        gpu_table = table("GPUs (memory in GiB)")
        gpu_table.add_column("#")
        gpu_table.add_column("Name", min_width=12)
        for header in ("Used/Total", "Free", "Util", "Temp", "Power W", "CC", "Procs"):
            gpu_table.add_column(header, no_wrap=True)
        for gpu in report.gpus:
            power = (
                "-"
                if gpu.power_w is None and gpu.power_limit_w is None
                else f"{_or_dash(gpu.power_w, '{:.0f}')}/{_or_dash(gpu.power_limit_w, '{:.0f}')}"
            )
            gpu_table.add_row(
                str(gpu.index),
                Text(gpu.name),  # Text: a "[" in a name is not rich markup
                f"{_gib(gpu.memory_used)}/{_gib(gpu.memory_total)}",
                _gib(gpu.memory_free),
                _or_dash(gpu.utilization, "{}%"),
                _or_dash(gpu.temperature_c, "{}°C"),
                power,
                _or_dash(gpu.compute_capability),
                _or_dash(None if gpu.processes is None else len(gpu.processes)),
            )
        console.print(gpu_table)
        procs = [(g.index, p) for g in report.gpus for p in g.processes or []]
        if procs:
            proc_table = table("GPU processes")
            proc_table.add_column("GPU")
            proc_table.add_column("PID", justify="right")
            proc_table.add_column("Used GiB", justify="right")
            for index, proc in procs:
                proc_table.add_row(str(index), str(proc.pid), _gib(proc.used_memory))
            console.print()
            console.print(proc_table)
    else:
        console.print("GPUs: none found")

    cpu, mem = report.cpu, report.memory
    console.print()
    cpu_table = table("CPU and RAM (GiB)")
    cpu_table.add_column("Model", min_width=12)
    for header in ("Cores phys/log", "Load 1m", "RAM total", "RAM available"):
        cpu_table.add_column(header, no_wrap=True)
    cpu_table.add_row(
        Text(cpu.model),
        f"{_or_dash(cpu.cores_physical)}/{cpu.cores_logical}",
        f"{cpu.load_1m:.2f}",
        _gib(mem.total),
        _gib(mem.available),
    )
    console.print(cpu_table)

    if report.notes:
        console.print()
        console.print("Notes:")
        for note in report.notes:
            console.print(Text(f"  - {note}"))
    # rich pads titles to the table's width; drop that so the text diffs and pastes cleanly.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
