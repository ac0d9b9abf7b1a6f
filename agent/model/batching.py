"""Continuous batching: the tensors that let several sessions' steps share one forward pass.

`ShardModel.forward_batch` (agent.model.blocks) drives these; this module knows nothing of
sessions, only of the layout of a batch. Items (one session's step each) are stacked along the
batch axis, item i taking `batch_i` consecutive rows:

- queries are padded on the right to the longest step, `q_max` tokens;
- each layer's keys/values are `[past (padded to l_max) | new (q_max)]`: item i's cached
  tokens at columns [0, length_i), zeros up to `l_max`, then the step's own new keys;
- an additive mask lets a row see only its own valid cached keys and its own new keys,
  causally, inside the layer's sliding window (absolute positions, the rule of
  `blocks.causal_mask`). A padded query row sees only its item's first new key, so it stays
  finite (its output is thrown away; a NaN there would reach real rows through its keys,
  since an additive mask adds to, and does not drop, a masked score).

The blocks see `BatchKV` in place of a cache: its `update()` (the one cache method the decoder
layers call) records the layer's new keys/values and returns the padded concatenation. Nothing
is written to a session's own cache here: `commit` appends each item's real new keys/values
afterwards, through the cache's own `update()`, so a session's cache ends up as if it had run
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Where each item lies in the stacked batch: rows [offsets[i], offsets[i] + batches[i])."""

    batches: tuple[int, ...]  # rows of each item (the session's own batch size)
    steps: tuple[int, ...]  # new tokens of each item (q_i)
    lengths: tuple[int, ...]  # cached tokens of each item before the step (= its position)

    def __post_init__(self) -> None:
        n = len(self.batches)
        if not n or len(self.steps) != n or len(self.lengths) != n:
            raise ValueError("a batch layout needs the same, non-zero number of each field")
        if min(self.batches) < 1 or min(self.steps) < 1 or min(self.lengths) < 0:
            raise ValueError("batches and steps must be positive, lengths not negative")

    @property
    def rows(self) -> int:
        return sum(self.batches)

    @property
    def q_max(self) -> int:
        return max(self.steps)

    @property
    def l_max(self) -> int:
        return max(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, at = [], 0
        for b in self.batches:
            out.append(at)
            at += b
        return tuple(out)

    @property
    def uniform(self) -> bool:
        """Every item at the same length with the same step: no padding anywhere, and the
        batch is one ordinary step of `rows` sequences."""
        return len(set(self.steps)) == 1 and len(set(self.lengths)) == 1

    def per_row(self, values: Sequence[int], device: torch.device) -> torch.Tensor:
        """`values` (one per item) repeated for each of the item's rows: [rows]."""
        return torch.tensor(
            [v for v, b in zip(values, self.batches, strict=True) for _ in range(b)],
            dtype=torch.long,
            device=device,
        )


def batch_positions(layout: BatchLayout, device: torch.device) -> torch.Tensor:
    """Absolute position of every query [rows, q_max]: length_i + t (padding keeps counting)."""
    lengths = layout.per_row(layout.lengths, device)
    return lengths.unsqueeze(1) + torch.arange(layout.q_max, device=device).unsqueeze(0)


def batch_mask(
    layout: BatchLayout,
    window: int | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive mask [rows, 1, q_max, l_max + q_max] (0 attend, finfo.min not)."""
    l_max, q_max = layout.l_max, layout.q_max
    lengths = layout.per_row(layout.lengths, device).view(-1, 1, 1)
    steps = layout.per_row(layout.steps, device).view(-1, 1, 1)
    t = torch.arange(q_max, device=device).view(1, -1, 1)  # query index within the step
    j = torch.arange(l_max + q_max, device=device).view(1, 1, -1)  # key column
    past = j < l_max
    k = j - l_max  # index of a new key within the step (negative over the past columns)
    query_pos = lengths + t
    key_pos = torch.where(past, j, lengths + k)
    valid_key = torch.where(past, j < lengths, k < steps)
    allowed = valid_key & (key_pos <= query_pos)
    if window is not None:
        allowed &= key_pos > query_pos - window
    # A padded query row (t >= step): its item's first new key only, never an empty row.
    allowed = torch.where(t < steps, allowed, j == l_max)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def pad_queries(
    layout: BatchLayout,
    hiddens: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The items' hidden states [b_i, q_i, H] stacked into [rows, q_max, H], zeros as padding
    (finite through every norm and projection)."""
    width = hiddens[0].shape[-1]
    if layout.uniform:
        return torch.cat([h.to(device=device, dtype=dtype) for h in hiddens], dim=0)
    out = torch.zeros(layout.rows, layout.q_max, width, dtype=dtype, device=device)
    for at, h in zip(layout.offsets, hiddens, strict=True):
        out[at : at + h.shape[0], : h.shape[1]] = h
    return out


def split_rows(layout: BatchLayout, out: torch.Tensor) -> list[torch.Tensor]:
    """Each item's real rows [b_i, q_i, H] of the batch's output, padding dropped."""
    return [
        out[at : at + b, :q].contiguous()
        for at, b, q in zip(layout.offsets, layout.batches, layout.steps, strict=True)
    ]


def layer_kv(kv: Any, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A DynamicCache's keys/values of `layer` [b, heads, length, dim], or None when empty.

    Read as the cache layers' `keys`/`values` (transformers 4.56+, where `_snapshot` works);
    the length is checked against the session's own count, so a cache that drifted from it
    fails before anything runs.
    """
    if length == 0:
        return None
    layers = getattr(kv, "layers", None)
    entry = layers[layer] if layers is not None and layer < len(layers) else None
    keys = getattr(entry, "keys", None)
    values = getattr(entry, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ValueError(f"the session's cache holds no keys for block {layer}")
    if keys.dim() != 4 or keys.shape[-2] != length or values.shape[-2] != length:
        raise ValueError(
            f"the session's cache holds {keys.shape[-2]} tokens in block {layer}, not {length}"
        )
    return keys, values


class BatchKV:
    """The cache the blocks see during a batched step (duck-typed: decoder layers call only
    `update(key_states, value_states, layer_idx, ...)` on their cache).

    `update` returns [past | new] for all rows and keeps the new keys/values per layer for
    `commit`; the sessions' caches are only read.
    """

    def __init__(self, layout: BatchLayout, caches: Sequence[Any]) -> None:
        self.layout = layout
        self.caches = list(caches)
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pasts(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [
            layer_kv(kv, layer, n) for kv, n in zip(self.caches, self.layout.lengths, strict=True)
        ]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.new:
            raise RuntimeError(f"block {layer_idx} updated the batch cache twice")
        self.new[layer_idx] = (key_states, value_states)
        pasts = self.pasts(layer_idx)
        return (
            _join(self.layout, [None if p is None else p[0] for p in pasts], key_states),
            _join(self.layout, [None if p is None else p[1] for p in pasts], value_states),
        )

    def commit(self) -> None:
        """Append each item's real new keys/values to its own cache, block by block in order
        (as a solo step's blocks would). Not atomic: the caller snapshots and restores."""
        spans = list(zip(self.layout.offsets, self.layout.batches, self.layout.steps, strict=True))
        for layer in sorted(self.new):
            keys, values = self.new[layer]
            q_max = keys.shape[-2]
            for kv, (at, b, q) in zip(self.caches, spans, strict=True):
                k, v = keys[at : at + b], values[at : at + b]
                if q < q_max:
                    k, v = k[:, :, :q], v[:, :, :q]
                kv.update(k, v, layer)


def _join(
    layout: BatchLayout, pasts: Sequence[torch.Tensor | None], new: torch.Tensor
) -> torch.Tensor:
    """[rows, heads, l_max + q_max, dim]: each item's past at columns [0, length_i), zeros to
    l_max, then the new keys (or values) of all rows."""
    l_max = layout.l_max
    rows, heads, q_max, dim = new.shape
    if l_max == 0:
        return new
    # One memset for all the padding costs less than a fill per item.
    out = torch.zeros(rows, heads, l_max + q_max, dim, dtype=new.dtype, device=new.device)
    for at, b, past in zip(layout.offsets, layout.batches, pasts, strict=True):
        if past is not None:
            out[at : at + b, :, : past.shape[-2]] = past
    out[:, :, l_max:] = new
    return out
