"""Shared loading steps: config with a real attention implementation, and tensors by name.

Tensors are read with safetensors' `safe_open().get_tensor()` from only the files that hold the
requested names (the header index says which). Tensors in their stored dtype on CPU stay lazy
mmap views of the checkpoint, so never rewrite checkpoint files in place under a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from agent.model.modelinfo import ModelError, TensorEntry, read_config


def load_config(path: Path) -> Any:
    """The transformers config of `path`, set to sdpa attention.

    After AutoConfig.from_pretrained `_attn_implementation` is None; hand-built modules would
    then fall back silently and skip masks.
    """
    from transformers import AutoConfig

    read_config(path)  # ModelError with a clear message before transformers says anything
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the config in {path}: {e}") from None
    config._attn_implementation = "sdpa"
    return config


def read_tensors(
    path: Path,
    index: dict[str, TensorEntry],
    names: Iterable[str],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Tensors `names` from the checkpoint, floating ones cast to `dtype`, all on `device`."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        entry = index.get(name)
        if entry is None:
            raise ModelError(f"checkpoint in {path} has no tensor {name!r}")
        by_file.setdefault(entry.file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in sorted(by_file.items()):
        try:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    target = dtype if t.is_floating_point() else t.dtype
                    out[name] = t.to(device=device, dtype=target)
        except (OSError, RuntimeError) as e:
            raise ModelError(f"cannot read {path / file}: {e}") from None
    return out


def check_not_meta(module: torch.nn.Module, what: str) -> None:
    """ModelError if any parameter or buffer was left unloaded on the meta device."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{what}: not loaded from the checkpoint: {', '.join(left[:5])}")


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a torch dtype or its name ("bfloat16", "torch.float16")."""
    result: Any = dtype
    if not isinstance(dtype, torch.dtype):
        result = getattr(torch, str(dtype).removeprefix("torch."), None)
    if result not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return result  # type: ignore[no-any-return]  # one of the three dtypes
