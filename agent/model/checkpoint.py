"""One checkpoint directory opened for loading: what ShardModel.load (agent.model.blocks) and
ClientHead.load (agent.model.head) both need before they build anything: the model info
(id, shape), the transformers config (sdpa attention), the family's names, the weight index
(tensor name -> file, from the safetensors headers), the dtype and the device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.model.families import Family, family_for
from agent.model.loading import load_config, read_tensors, torch_dtype
from agent.model.modelinfo import (
    ModelError,
    ModelInfo,
    TensorEntry,
    read_model_info,
    read_weight_index,
)


@dataclass(frozen=True)
class Checkpoint:
    info: ModelInfo
    config: Any  # transformers config, _attn_implementation = "sdpa"
    family: Family
    index: dict[str, TensorEntry]
    dtype: torch.dtype
    device: torch.device

    @property
    def path(self) -> Path:
        return self.info.path

    def read_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Tensors `names`, floating ones in the checkpoint's dtype, all on its device."""
        return read_tensors(self.path, self.index, names, dtype=self.dtype, device=self.device)


def open_checkpoint(
    model_dir: str | Path,
    *,
    dtype: torch.dtype | str,
    device: torch.device | str,
    span: tuple[int, int] | None = None,
) -> Checkpoint:
    """Read what loading needs from `model_dir` (ModelError for what is wrong), checking
    `span` = (start, end), when given, against the model's blocks before anything else."""
    info = read_model_info(model_dir)
    if span is not None:
        start, end = span
        if not 0 <= start < end <= info.n_blocks:
            raise ModelError(
                f"span [{start}, {end}) is not within the {info.n_blocks} blocks of {info.name}"
            )
    resolved_dtype = torch_dtype(dtype)
    resolved_device = torch.device(device)
    config = load_config(info.path)
    family = family_for(info.model_type)
    index = read_weight_index(info.path)
    return Checkpoint(
        info=info,
        config=config,
        family=family,
        index=index,
        dtype=resolved_dtype,
        device=resolved_device,
    )
