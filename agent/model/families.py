"""The one table of per-family differences between the supported causal LM architectures.

Pure data plus name helpers: no torch or transformers import at module level, so
agent.model.modelinfo can read block prefixes without loading a framework. Module paths are relative
to the `*ForCausalLM` model; class names are looked up in the family's modeling module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Family:
    """What differs between families, as names (never copies of Hugging Face code)."""

    model_type: str
    base: str  # the base model's attribute in the CausalLM: "model" / "transformer"
    blocks: str  # the ModuleList under base: "layers" / "h"
    block_class: str  # fallback when the CausalLM class names no _no_split_modules
    embed: str  # token embedding under base
    positions: str | None  # learned absolute positions under base (gpt2), else None
    rotary_class: str | None  # rotary module class, built from config alone (buffers only)
    norm: str  # final norm under base
    norm_class: str | None  # class in the modeling module; None means torch.nn.LayerNorm
    norm_eps: str  # config attribute holding the final norm's epsilon
    lm_head: str = "lm_head"  # top level, never under base

    @property
    def rotary(self) -> bool:
        """Rotary families pass position_embeddings=(cos, sin) to every block; gpt2 nothing."""
        return self.rotary_class is not None


def _rotary(model_type: str, prefix: str) -> Family:
    return Family(
        model_type=model_type,
        base="model",
        blocks="layers",
        block_class=f"{prefix}DecoderLayer",
        embed="embed_tokens",
        positions=None,
        rotary_class=f"{prefix}RotaryEmbedding",
        norm="norm",
        norm_class=f"{prefix}RMSNorm",
        norm_eps="rms_norm_eps",
    )


FAMILIES: dict[str, Family] = {
    "llama": _rotary("llama", "Llama"),
    "mistral": _rotary("mistral", "Mistral"),
    "qwen2": _rotary("qwen2", "Qwen2"),
    "qwen3": _rotary("qwen3", "Qwen3"),
    "gpt2": Family(
        model_type="gpt2",
        base="transformer",
        blocks="h",
        block_class="GPT2Block",
        embed="wte",
        positions="wpe",
        rotary_class=None,
        norm="ln_f",
        norm_class=None,
        norm_eps="layer_norm_epsilon",
    ),
}


def family_for(model_type: str) -> Family:
    """The family of `model_type`; KeyError names the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        ) from None


def checkpoint_base(family: Family, names: Iterable[str]) -> str:
    """The prefix checkpoint keys carry for modules under `base`: "model." or "".

    Some checkpoints were saved from the base model (the original gpt2 has "h.0...." and
    "wte.weight", no "transformer."), so the prefix is read from the file, not assumed.
    """
    want = family.base + "."
    return want if any(n.startswith(want) for n in names) else ""


def block_key_prefix(family: Family, names: Iterable[str], index: int) -> str:
    """Checkpoint key prefix of block `index`, e.g. "model.layers.3."."""
    return f"{checkpoint_base(family, names)}{family.blocks}.{index}."


def modeling_module(model_type: str) -> ModuleType:
    """The transformers modeling module of the family (imports transformers)."""
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def block_class(config: object) -> type:
    """The decoder block class: the CausalLM's `_no_split_modules[0]`, else the table's name."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    family = family_for(config.model_type)  # type: ignore[attr-defined]
    module = modeling_module(family.model_type)
    names: list[str] = []
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # type: ignore[arg-type]
    if causal_lm is not None:
        names.extend(getattr(causal_lm, "_no_split_modules", None) or [])
    names.append(family.block_class)
    for name in names:
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise KeyError(f"no block class for {family.model_type} in {module.__name__}")
