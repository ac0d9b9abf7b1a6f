"""The CPU and RAM, through psutil and /proc/cpuinfo."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from agent.hw.report import CpuInfo, MemoryInfo

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


def discover_cpu(notes: list[str]) -> tuple[CpuInfo, MemoryInfo]:
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
