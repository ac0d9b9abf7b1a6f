"""Long inputs in frame-sized pieces: a prefill or a replay never exceeds a frame."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import torch


async def in_chunks(
    step: Callable[[torch.Tensor, int], Awaitable[torch.Tensor]],
    x: torch.Tensor,
    position: int,
    max_bytes: int,
) -> list[torch.Tensor]:
    """Send x [b, q, h] through `step` in pieces of at most max_bytes (float32 on the wire),
    so a long prefill or replay never exceeds a frame; returns each piece's output."""
    per_token = max(1, x.shape[0] * x.shape[2] * 4)
    chunk = max(1, max_bytes // per_token)
    return [await step(x[:, s : s + chunk], position + s) for s in range(0, x.shape[1], chunk)]
