"""CUDA's numbering of the GPUs NVML reports (CUDA_VISIBLE_DEVICES), and the GPU to use."""

from __future__ import annotations

import os
from collections.abc import Mapping

from agent.hw.report import DeviceReport, GpuInfo


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
