"""The reference: the same model run locally by Hugging Face transformers, in this process."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch


def load_full(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def full_step(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, tuple, Any]:
    """One cached step of the whole model: (logits, hidden states per block boundary, cache).
    The cache keyword is `cache=` from transformers 5.24, `past_key_values=` before."""
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True, **{keyword: cache})
    return out.logits, out.hidden_states, getattr(out, keyword)


def hf_generate(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from `generate()`, without the prompt (stops at EOS like the mesh)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()
