"""A contiguous span [start, end) of a causal LM's blocks, run with a per-session KV cache.

Only the span's tensors are read. Blocks are the model's own classes (built from the config by
layer index), so the numbers match the full Hugging Face model; what the full model's forward
adds around them (positions, rotary cos/sin, the causal mask) is rebuilt here in a way that does
not depend on holding block 0 or on transformers' internal mask helpers. `forward_batch` runs
the steps of several sessions as one pass (the padding and masks are in agent.model.batching).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from agent.model.batching import (
    BatchKV,
    BatchLayout,
    batch_mask,
    batch_positions,
    pad_queries,
    split_rows,
)
from agent.model.checkpoint import open_checkpoint
from agent.model.families import (
    Family,
    block_class,
    block_key_prefix,
    family_for,
    modeling_module,
)
from agent.model.loading import check_not_meta
from agent.model.modelinfo import ModelError, ModelInfo

# The cache keyword of a decoder block, newest first: transformers 5.24+, 4.56-5.23, older.
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


class PositionError(ValueError):
    """A step's position is not the session's cached length (a lost or repeated step)."""


@dataclass(eq=False)
class SessionCache:
    """One session's KV cache on one server, plus the session's own token count.

    `kv.get_seq_length()` reads layer 0, empty on any server that does not hold block 0, so the
    length is tracked here.
    """

    kv: Any  # transformers.DynamicCache, indexed by global block number
    length: int = 0
    batch: int | None = None
    span: tuple[int, int] | None = None  # the blocks [s, e) this session runs, from step one

    def nbytes(self) -> int:
        """Bytes held by cached keys and values."""
        total = 0
        for layer in getattr(self.kv, "layers", ()):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class BatchItem(NamedTuple):
    """One session's step in `ShardModel.forward_batch`: the arguments of `forward`."""

    cache: SessionCache
    hidden: torch.Tensor  # [b_i, q_i, hidden]
    position: int  # the session's cached length
    span: tuple[int, int] | None = None  # blocks [s, e); None: all the loaded blocks


class ShardModel:
    """Blocks [start, end) of one model on one device."""

    def __init__(
        self,
        *,
        info: ModelInfo,
        config: Any,
        blocks: torch.nn.ModuleList,
        rotary: torch.nn.Module | None,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.info = info
        self.config = config
        self.family: Family = family_for(info.model_type)
        self.blocks = blocks
        self.rotary = rotary
        self.start = start
        self.end = end
        self.dtype = dtype
        self.device = device
        self.hidden_size = info.hidden_size
        self._windows = [_sliding_window(config, i) for i in range(start, end)]
        self._call = _BlockCall.for_block(type(blocks[0]))

    @property
    def n_blocks(self) -> int:
        return self.end - self.start

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | str,
        device: torch.device | str,
    ) -> ShardModel:
        """Read only blocks [start, end) of the checkpoint in `model_dir`."""
        from accelerate import init_empty_weights

        ckpt = open_checkpoint(model_dir, dtype=dtype, device=device, span=(start, end))
        info, config, family, index = ckpt.info, ckpt.config, ckpt.family, ckpt.index
        dtype, device = ckpt.dtype, ckpt.device
        block_cls = block_class(config)
        # Parameters on meta, buffers real (rotary inv_freq, gpt2's causal buffer).
        with init_empty_weights(include_buffers=False):
            blocks = torch.nn.ModuleList(block_cls(config, layer_idx=i) for i in range(start, end))
        keys = {
            i: (block_key_prefix(family, index, i), list(block.state_dict()))
            for i, block in zip(range(start, end), blocks, strict=True)
        }
        # One pass over the files, each opened once, however many blocks it holds.
        names = [prefix + k for prefix, wanted in keys.values() for k in wanted]
        tensors = ckpt.read_tensors(names)
        for i, block in zip(range(start, end), blocks, strict=True):
            prefix, wanted = keys[i]
            block.load_state_dict({k: tensors.pop(prefix + k) for k in wanted}, assign=True)
            block.to(device=device, dtype=dtype)
            block.requires_grad_(False)
            block.eval()
            check_not_meta(block, f"{info.name} block {i}")
        rotary = None
        if family.rotary_class is not None:
            rotary_cls = getattr(modeling_module(family.model_type), family.rotary_class)
            # Kept in float32: cos/sin are computed in float and cast to the hidden dtype.
            rotary = rotary_cls(config=config).to(device).eval()
        return cls(
            info=info,
            config=config,
            blocks=blocks,
            rotary=rotary,
            start=start,
            end=end,
            dtype=dtype,
            device=device,
        )

    def new_cache(self) -> SessionCache:
        """An empty cache for one session. A plain DynamicCache keeps every token (no trimming of
        sliding-window layers), which the explicit masks and the rollback rely on."""
        from transformers import DynamicCache

        return SessionCache(kv=DynamicCache())

    def forward(
        self,
        cache: SessionCache,
        hidden: torch.Tensor,
        position: int,
        *,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run `hidden` [b, q, hidden] at positions [position, position+q) through the blocks.

        `span` picks a sub-range [s, e) of the loaded blocks (default: all of them); a session
        keeps the span of its first step. `position` must equal the session's cached length.
        On any exception the cache is left exactly as it was before the call.
        """
        first, last = self.check_step(cache, hidden, position, span=span)
        b, q, _ = hidden.shape
        with torch.inference_mode():
            h = hidden.to(device=self.device, dtype=self.dtype)
            positions = torch.arange(position, position + q, device=self.device).unsqueeze(0)
            pos_emb = self.rotary(h, positions) if self.rotary is not None else None
            lo, hi = first - self.start, last - self.start
            windows = self._windows[lo:hi]
            masks: dict[int | None, torch.Tensor | None] = {}
            for w in set(windows):
                masks[w] = causal_mask(b, q, position, w, dtype=self.dtype, device=self.device)
            saved = _snapshot(cache.kv)
            try:
                for block, window in zip(self.blocks[lo:hi], windows, strict=True):
                    out = self._call(
                        block,
                        h,
                        cache=cache.kv,
                        mask=masks[window],
                        position_ids=positions.expand(b, q),
                        position_embeddings=pos_emb,
                    )
                    h = out[0] if isinstance(out, tuple) else out
            except BaseException:
                _restore(cache.kv, saved)
                raise
            cache.length += q
            cache.batch = b
            cache.span = (first, last)
        return h

    def check_step(
        self,
        cache: SessionCache,
        hidden: torch.Tensor,
        position: int,
        *,
        span: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        """The checks `forward` and `forward_batch` make of one step, without running it: the
        span [s, e) the step runs, or PositionError / ValueError. Touches nothing."""
        first, last = (self.start, self.end) if span is None else span
        if not self.start <= first < last <= self.end:
            raise ValueError(
                f"blocks [{first}, {last}) are not within the served [{self.start}, {self.end})"
            )
        if cache.span is not None and cache.span != (first, last):
            raise ValueError(
                f"the session runs blocks [{cache.span[0]}, {cache.span[1]}), not [{first}, {last})"
            )
        if position != cache.length:
            raise PositionError(
                f"step at position {position}, but the session holds {cache.length} tokens"
            )
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size or hidden.shape[1] == 0:
            raise ValueError(
                f"hidden states must be [batch, tokens>0, {self.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise ValueError(f"hidden states must be floating point, got {hidden.dtype}")
        b = hidden.shape[0]
        if cache.batch is not None and b != cache.batch:
            raise ValueError(f"batch {b} does not match the session's batch {cache.batch}")
        return first, last

    def forward_batch(self, items: Sequence[BatchItem]) -> list[torch.Tensor]:
        """Run the steps of several sessions as one pass over the blocks (continuous batching).

        Each item is one session's step, as `forward(item.cache, item.hidden, item.position,
        span=item.span)` would run it: hidden [b_i, q_i, hidden] at positions
        [position, position + q_i). Items may differ in cached length, in q (a prefill chunk
        next to single-token decodes) and in b_i. Returns each item's output [b_i, q_i, hidden],
        in the order of `items`, equal to the solo step's up to float rounding, and leaves each
        session's cache as the solo step would (same shapes and length; later solo or batched
        steps continue it).

        Checked before anything runs: each item gets `check_step`'s checks, the first failure
        re-raised as the same type (PositionError, ValueError) prefixed "batch item {i}: " (a
        scheduler can call `check_step` per session first, to drop only the bad one); then
        ValueError when the items do not all run the same span (None meaning all the loaded
        blocks; the caller groups by span) or when one session appears twice. All or nothing:
        on any exception, then or later, every item's cache is left exactly as it was. One item
        runs `forward` itself; no items return [].
        """
        items = [BatchItem(*item) for item in items]
        if not items:
            return []
        spans = []
        for i, (cache, hidden, position, span) in enumerate(items):
            try:
                spans.append(self.check_step(cache, hidden, position, span=span))
            except ValueError as e:
                raise type(e)(f"batch item {i}: {e}") from e
        if len(set(spans)) > 1:
            raise ValueError(
                "the items of a batch must run the same blocks, got "
                + ", ".join(f"[{s}, {e})" for s, e in dict.fromkeys(spans))
            )
        if len({id(item.cache) for item in items}) < len(items):
            raise ValueError("a session appears more than once in the batch")
        first, last = spans[0]
        if len(items) == 1:
            item = items[0]
            return [self.forward(item.cache, item.hidden, item.position, span=(first, last))]
        layout = BatchLayout(
            batches=tuple(item.hidden.shape[0] for item in items),
            steps=tuple(item.hidden.shape[1] for item in items),
            lengths=tuple(item.position for item in items),
        )
        caches = [item.cache for item in items]
        with torch.inference_mode():
            h = pad_queries(layout, [i.hidden for i in items], dtype=self.dtype, device=self.device)
            positions = batch_positions(layout, self.device)
            pos_emb = self.rotary(h, positions) if self.rotary is not None else None
            lo, hi = first - self.start, last - self.start
            windows = self._windows[lo:hi]
            masks: dict[int | None, torch.Tensor | None] = {}
            for w in set(windows):
                if layout.uniform:  # one ordinary step of `rows` sequences
                    masks[w] = causal_mask(
                        layout.rows,
                        layout.q_max,
                        layout.l_max,
                        w,
                        dtype=self.dtype,
                        device=self.device,
                    )
                else:
                    masks[w] = batch_mask(layout, w, dtype=self.dtype, device=self.device)
            kv = BatchKV(layout, [c.kv for c in caches])
            for block, window in zip(self.blocks[lo:hi], windows, strict=True):
                out = self._call(
                    block,
                    h,
                    cache=kv,
                    mask=masks[window],
                    position_ids=positions,
                    position_embeddings=pos_emb,
                )
                h = out[0] if isinstance(out, tuple) else out
            results = split_rows(layout, h)
            saved = [_snapshot(c.kv) for c in caches]
            try:
                kv.commit()
            except BaseException:
                for c, state in zip(caches, saved, strict=True):
                    _restore(c.kv, state)
                raise
            for c, b, q in zip(caches, layout.batches, layout.steps, strict=True):
                c.length += q
                c.batch = b
                c.span = (first, last)
        return results

    def kv_bytes_per_token(self, batch: int = 1) -> int:
        """KV-cache bytes one token of one session costs on this span."""
        heads = self.config.num_attention_heads
        kv_heads = getattr(self.config, "num_key_value_heads", None) or heads
        head_dim = getattr(self.config, "head_dim", None) or self.hidden_size // heads
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_blocks * kv_heads * head_dim * itemsize * batch

    def measure_throughput(self, tokens: int = 8, *, max_seconds: float = 1.0) -> float:
        """Blocks x tokens per second on a short synthetic batch-1 decode (for capacity ads)."""
        cache = self.new_cache()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, self.hidden_size, generator=gen).to(self.device, self.dtype)
        self.forward(cache, x, 0)  # warm-up: first-call allocations are not throughput
        self._sync()
        done = 0
        t0 = time.perf_counter()
        while done < max(1, tokens):
            self.forward(cache, x, cache.length)
            done += 1
            if time.perf_counter() - t0 > max_seconds:
                break
        self._sync()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        return self.n_blocks * done / elapsed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def causal_mask(
    batch: int,
    q: int,
    position: int,
    window: int | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The additive mask [batch, 1, q, position+q] (0 attend, finfo.min not), or None.

    None where sdpa is exact without one: a single query token that sees the whole cache (an
    additive mask there gave bf16 noise and a different greedy path than generate()), and a
    prefill of an empty cache within the window, where sdpa's is_causal is right and faster.
    A multi-token append to a non-empty cache always needs the mask: sdpa's is_causal aligns
    top-left and would drop the cached keys.
    """
    kv = position + q
    within_window = window is None or kv <= window
    if within_window and (q == 1 or position == 0):
        return None
    rows = torch.arange(position, kv, device=device).unsqueeze(1)
    cols = torch.arange(kv, device=device).unsqueeze(0)
    allowed = cols <= rows
    if window is not None:
        # transformers' sliding_window_overlay rule: the last `window` tokens, self included.
        allowed &= cols > rows - window
    mask = torch.zeros(q, kv, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(1, 1, q, kv).expand(batch, 1, q, kv)


def _sliding_window(config: Any, layer: int) -> int | None:
    """The window of global layer `layer`: per config.layer_types where present (Qwen2/3),
    else config.sliding_window for every layer (Mistral), else None."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer] == "sliding_attention" else None
    return int(window)


class _BlockCall:
    """Calls a block with the keyword names its forward accepts in this transformers version."""

    def __init__(self, params: set[str]) -> None:
        cache_kw = next((k for k in _CACHE_KEYWORDS if k in params), None)
        if cache_kw is None:
            raise ModelError("decoder block takes no KV-cache argument; transformers too old?")
        self.cache_kw: str = cache_kw
        self.position_ids = "position_ids" in params
        self.position_embeddings = "position_embeddings" in params
        self.use_cache = "use_cache" in params
        self.cache_position = "cache_position" in params  # layers before transformers 5

    @classmethod
    def for_block(cls, block_cls: type) -> _BlockCall:
        # inspect.signature follows __wrapped__ through transformers' deprecation decorators.
        return cls(set(inspect.signature(block_cls.forward).parameters))  # type: ignore[attr-defined]

    def __call__(
        self,
        block: torch.nn.Module,
        hidden: torch.Tensor,
        *,
        cache: Any,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> Any:
        kwargs: dict[str, Any] = {self.cache_kw: cache, "attention_mask": mask}
        if self.position_ids:
            kwargs["position_ids"] = position_ids
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        if self.use_cache:
            kwargs["use_cache"] = True
        if self.cache_position:
            kwargs["cache_position"] = position_ids[0]
        return block(hidden, **kwargs)


def _snapshot(kv: Any) -> tuple[int, list[dict[str, Any]]]:
    """Each cache layer's attributes. Layers grow by torch.cat into new tensors, so keeping the
    old references is enough to roll back, whatever the transformers version calls them."""
    layers = getattr(kv, "layers", [])
    return len(layers), [dict(vars(layer)) for layer in layers]


def _restore(kv: Any, saved: tuple[int, list[dict[str, Any]]]) -> None:
    count, states = saved
    layers = getattr(kv, "layers", [])
    del layers[count:]
    for layer, state in zip(layers, states, strict=True):
        vars(layer).clear()
        vars(layer).update(state)
