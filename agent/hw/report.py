"""What device discovery reports (agent.hw.devices): the GPUs, the CPU and RAM, and notes; JSON
both ways, and the rows a capacity ad carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class DeviceError(Exception):
    """Base of the errors this module raises."""


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
