"""Tiny random-weight models made offline, for tests and the demo.

Each is a real Hugging Face checkpoint directory (config.json, sharded safetensors with an
index, generation_config.json) plus a byte-level BPE tokenizer trained on a few built-in
sentences, so the same loading code that serves real checkpoints serves these.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

TINY_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

VOCAB_SIZE = 512
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the trainer places special tokens first, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Sliding windows small enough that test prompts plus a few decode steps cross them.
QWEN2_SLIDING_WINDOW = 8
MISTRAL_SLIDING_WINDOW = 16

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "The mesh serves blocks of a model to peers that ask for them.",
    "Every machine runs one agent, and the agents find each other.",
    "Hello world! How are you today? I am fine, thank you.",
    "Once upon a time there was a small model that could write stories.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 and 1024 appear in text.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "It was the best of times, it was the worst of times.",
    "In the beginning the peers joined the mesh and shared their capacity.",
)


class TinyModelError(Exception):
    """A tiny model cannot be made (unknown family, unwritable directory)."""


def tiny_config(family: str, *, n_layers: int = 6, hidden: int = 64) -> object:
    """A small config of `family`; hidden must be a multiple of 16 (4 heads of 16+)."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise TinyModelError(
            f"unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}"
        )
    if hidden % 16 or hidden <= 0 or n_layers <= 0:
        raise TinyModelError("tiny models need n_layers > 0 and hidden a positive multiple of 16")
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=VOCAB_SIZE,
            n_positions=256,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=4,
            **ids,
        )
    extra: dict[str, object] = {}
    if family == "qwen2":
        # Layers >= max_window_layers slide; the rest attend to everything.
        extra = {
            "use_sliding_window": True,
            "sliding_window": QWEN2_SLIDING_WINDOW,
            "max_window_layers": max(1, n_layers // 2),
        }
    elif family == "mistral":
        extra = {"sliding_window": MISTRAL_SLIDING_WINDOW}
    return AutoConfig.for_model(
        family,
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        # Qwen checkpoints tie the head to the embeddings, Llama/Mistral do not: cover both.
        tie_word_embeddings=family in ("qwen2", "qwen3"),
        **extra,
        **ids,
    )


def make_tiny_model(
    family: str,
    out_dir: Path,
    *,
    n_layers: int = 6,
    hidden: int = 64,
    seed: int = 0,
    max_shard_size: str = "200KB",
) -> Path:
    """Write a random-weight `family` model and tokenizer to `out_dir`; deterministic per seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, n_layers=n_layers, hidden=hidden)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # fork_rng: seed the init without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    with _quiet_progress():
        model.save_pretrained(out, max_shard_size=max_shard_size)
    save_tiny_tokenizer(out)
    return out


def save_tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE trained on the built-in corpus, loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
    wrapped.save_pretrained(out_dir)
    # Name the class both transformers 4 and 5 know, and keep the template in
    # tokenizer_config.json, where every version looks for it.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (Path(out_dir) / "chat_template.jinja").unlink(missing_ok=True)


def tiny_dir_name(family: str, *, n_layers: int = 6, hidden: int = 64, seed: int = 0) -> str:
    """Directory (and model) name: "tiny-llama" for defaults, parameters appended otherwise."""
    name = f"tiny-{family}"
    if (n_layers, hidden, seed) != (6, 64, 0):
        name += f"-l{n_layers}-h{hidden}-s{seed}"
    return name


def ensure_tiny_model(
    family: str, cache_root: Path, *, n_layers: int = 6, hidden: int = 64, seed: int = 0
) -> Path:
    """The tiny model under `cache_root`, made once; concurrent callers never see a half model.

    The model is written to a private temporary directory and renamed into place; a process
    that loses the race discards its copy and uses the winner's.
    """
    root = Path(cache_root)
    final = root / tiny_dir_name(family, n_layers=n_layers, hidden=hidden, seed=seed)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        make_tiny_model(family, tmp, n_layers=n_layers, hidden=hidden, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    except OSError as e:
        raise TinyModelError(f"cannot write tiny model to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Writing model shards" progress bar on the demo's terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
