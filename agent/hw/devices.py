"""Local device discovery: NVIDIA GPUs through NVML, plus the CPU and RAM.

Discovery never raises for missing or broken hardware: what cannot be read becomes None or a
note in the report, so a machine without a GPU (or with one broken GPU) still serves. NVML is
reached through `NvmlLike`: the `pynvml` module itself, or `agent.hw.nvml_fake` when the
SHARDMESH_FAKE_NVML environment variable names a JSON description.

Imports stay light (no torch, no transformers): `shardmesh devices` must answer in well under a
second.

The parts: agent.hw.report (the report's types), agent.hw.nvml (GPUs), agent.hw.cpu (CPU and
RAM), agent.hw.cuda (CUDA's numbering) and agent.hw.render (the text tables). Their names are
importable from here, where the rest of the agent imports them.
"""

from __future__ import annotations

from agent.hw.cpu import cpu_model_from_cpuinfo, discover_cpu
from agent.hw.cuda import best_cuda_device, cuda_visible_gpus
from agent.hw.nvml import FAKE_NVML_ENV, NvmlLike, NvmlLoadError, discover_gpus, load_nvml
from agent.hw.render import render_devices
from agent.hw.report import (
    CpuInfo,
    DeviceError,
    DeviceReport,
    GpuInfo,
    GpuProcess,
    MemoryInfo,
    cpu_utilization,
)

__all__ = [
    "FAKE_NVML_ENV",
    "CpuInfo",
    "DeviceError",
    "DeviceReport",
    "GpuInfo",
    "GpuProcess",
    "MemoryInfo",
    "NvmlLike",
    "NvmlLoadError",
    "best_cuda_device",
    "cpu_model_from_cpuinfo",
    "cpu_utilization",
    "cuda_visible_gpus",
    "discover",
    "load_nvml",
    "render_devices",
]


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
        gpus = discover_gpus(nvml, notes)
    cpu, memory = discover_cpu(notes)
    return DeviceReport(gpus=gpus, cpu=cpu, memory=memory, notes=notes)
