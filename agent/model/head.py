"""The client's own part of a model: token embeddings (plus learned positions for gpt2), the
final norm and the LM head. Only those tensors are read; the head shares the embedding matrix
when the config ties them or the checkpoint has no lm_head tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agent.model.checkpoint import open_checkpoint
from agent.model.families import Family, checkpoint_base, family_for, modeling_module
from agent.model.loading import check_not_meta
from agent.model.modelinfo import ModelError, ModelInfo


class ClientHead:
    """Embeddings in, logits out, for one model on one device."""

    def __init__(
        self,
        *,
        info: ModelInfo,
        config: Any,
        embed_weight: torch.Tensor,
        position_weight: torch.Tensor | None,
        norm: torch.nn.Module,
        head_weight: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.info = info
        self.config = config
        self.family: Family = family_for(info.model_type)
        self.embed_weight = embed_weight
        self.position_weight = position_weight
        self.norm = norm
        self.head_weight = head_weight
        self.dtype = dtype
        self.device = device
        self.vocab_size = int(embed_weight.shape[0])
        self.max_positions = None if position_weight is None else int(position_weight.shape[0])

    @property
    def tied(self) -> bool:
        return self.head_weight is self.embed_weight

    @classmethod
    def load(
        cls, model_dir: str | Path, *, dtype: torch.dtype | str, device: torch.device | str
    ) -> ClientHead:
        from accelerate import init_empty_weights

        ckpt = open_checkpoint(model_dir, dtype=dtype, device=device)
        info, config, family, index = ckpt.info, ckpt.config, ckpt.family, ckpt.index
        dtype, device = ckpt.dtype, ckpt.device
        base = checkpoint_base(family, index)
        head_name = f"{family.lm_head}.weight"
        tied = bool(getattr(config, "tie_word_embeddings", False)) or head_name not in index

        with init_empty_weights(include_buffers=False):
            norm = _make_norm(family, config)
        norm_keys = {f"{base}{family.norm}.{k}": k for k in norm.state_dict()}
        names = [f"{base}{family.embed}.weight", *norm_keys]
        if family.positions is not None:
            names.append(f"{base}{family.positions}.weight")
        if not tied:
            names.append(head_name)
        tensors = ckpt.read_tensors(names)

        norm.load_state_dict({k: tensors[n] for n, k in norm_keys.items()}, assign=True)
        norm.to(device=device, dtype=dtype).requires_grad_(False).eval()
        check_not_meta(norm, f"{info.name} final norm")
        embed = tensors[f"{base}{family.embed}.weight"]
        positions = tensors.get(f"{base}{family.positions}.weight") if family.positions else None
        head = embed if tied else tensors[head_name]
        if head.shape[-1] != embed.shape[-1]:
            raise ModelError(
                f"{info.name}: lm_head {list(head.shape)} does not fit the hidden size"
            )
        return cls(
            info=info,
            config=config,
            embed_weight=embed,
            position_weight=positions,
            norm=norm,
            head_weight=head,
            dtype=dtype,
            device=device,
        )

    def embed(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """Hidden states [b, q, hidden] for token ids [b, q] at positions [position, position+q)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens>0], got {list(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        q = input_ids.shape[1]
        with torch.inference_mode():
            ids = input_ids.to(device=self.device, dtype=torch.int64)
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
            hidden = F.embedding(ids, self.embed_weight)
            if self.position_weight is not None:
                if position + q > self.position_weight.shape[0]:
                    raise ValueError(
                        f"{self.info.name} has {self.position_weight.shape[0]} positions; "
                        f"tokens up to {position + q} asked"
                    )
                hidden = hidden + self.position_weight[position : position + q].unsqueeze(0)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [b, q, vocab] from the last block's hidden states [b, q, hidden]."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.embed_weight.shape[1]:
            raise ValueError(
                f"hidden states must be [batch, tokens, {self.embed_weight.shape[1]}], "
                f"got {list(hidden.shape)}"
            )
        with torch.inference_mode():
            h = self.norm(hidden.to(device=self.device, dtype=self.dtype))
            return F.linear(h, self.head_weight)


def _make_norm(family: Family, config: Any) -> torch.nn.Module:
    eps = getattr(config, family.norm_eps)
    if family.norm_class is None:
        return torch.nn.LayerNorm(config.hidden_size, eps=eps)
    norm_cls = getattr(modeling_module(family.model_type), family.norm_class)
    return norm_cls(config.hidden_size, eps=eps)
