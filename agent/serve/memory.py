"""Device choice and memory budgets for the served blocks and their KV caches."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent.config import LimitsConfig
from agent.hw.devices import DeviceReport, best_cuda_device

if TYPE_CHECKING:
    from agent.model.blocks import ShardModel

WEIGHTS_MEMORY_SHARE = 0.8  # of the device's free memory, for auto placement's block count


def pick_device(device: str, report: DeviceReport | None) -> str:
    """The configured device, or for `auto` the best CUDA GPU NVML reports (else the CPU)."""
    if device != "auto":
        return device
    # NVML indexes by PCI bus; make CUDA agree before torch initialises it.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    index = best_cuda_device(report) if report else None
    if index is None:
        return "cpu"
    import torch

    return f"cuda:{index}" if torch.cuda.is_available() else "cpu"


def release_memory(device: str) -> None:
    """Give freed blocks back: collect cycles, and return CUDA's cached blocks to the driver."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def free_memory(device: str) -> int:
    """Free bytes on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def weights_budget(device: str) -> int:
    """Bytes this agent may spend on weights."""
    return int(free_memory(device) * WEIGHTS_MEMORY_SHARE)


def kv_budget(shard: ShardModel, limits: LimitsConfig) -> int:
    """Bytes the sessions' KV caches may reserve: a fixed token count, or a share of what
    is free once the blocks are loaded."""
    if limits.kv_budget_tokens:
        return limits.kv_budget_tokens * shard.kv_bytes_per_token()
    return int(free_memory(str(shard.device)) * limits.kv_memory_fraction)
