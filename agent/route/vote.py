"""Comparing opinions on one step, pure: which steps to check, agreement within a tolerance,
a strict majority, and the slice of a span's history a witness still needs."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_TINY = 1e-12


class StepSampler:
    """Which steps to verify: none at fraction 0, all at 1, else a seeded Bernoulli draw
    (seed None: from the OS, so a lying peer cannot predict the unchecked steps)."""

    def __init__(self, fraction: float, seed: int | None = None) -> None:
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise ValueError(f"the verify fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self._rng = random.Random(seed)

    def __call__(self) -> bool:
        if self.fraction <= 0.0:
            return False
        if self.fraction >= 1.0:
            return True
        return self._rng.random() < self.fraction


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-row ||a - b|| / max(||a||, ||b||) in float32; inf for other shapes or NaN."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    x = a.detach().to("cpu", torch.float32).reshape(-1, a.shape[-1])
    y = b.detach().to("cpu", torch.float32).reshape(-1, b.shape[-1])
    diff = (x - y).norm(dim=-1)
    scale = torch.maximum(x.norm(dim=-1), y.norm(dim=-1)).clamp_min(_TINY)
    err = float((diff / scale).max())
    return err if math.isfinite(err) else math.inf


def agrees(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return relative_error(a, b) <= tolerance


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing opinions: `winner` agrees with a strict majority (None: no
    majority yet); `minority` are the opinions that disagree with the winner."""

    winner: int | None
    majority: tuple[int, ...] = ()
    minority: tuple[int, ...] = ()

    @property
    def decided(self) -> bool:
        return self.winner is not None


def majority(outputs: Sequence[torch.Tensor], tolerance: float) -> Verdict:
    """The opinion that agrees with the most others, if that group is a strict majority of
    at least two. Agreement within a tolerance is not transitive, so the group is the
    winner's own neighbourhood; ties go to the earliest opinion (the primary's)."""
    n = len(outputs)
    groups = [
        tuple(j for j in range(n) if j == i or agrees(outputs[i], outputs[j], tolerance))
        for i in range(n)
    ]
    if not groups:
        return Verdict(None)
    best = max(range(n), key=lambda i: (len(groups[i]), -i))
    size = len(groups[best])
    if size < 2 or 2 * size <= n:
        return Verdict(None)
    minority = tuple(j for j in range(n) if j not in groups[best])
    return Verdict(best, groups[best], minority)


def tail_tokens(inputs: Sequence[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """Tokens [start, end) (dim 1) of the concatenation of `inputs`, without concatenating
    what is not needed."""
    out: list[torch.Tensor] = []
    offset = 0
    for x in inputs:
        n = x.shape[1]
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            out.append(x[:, lo - offset : hi - offset])
        offset += n
    if offset < end:
        raise ValueError(f"the span's history holds {offset} tokens, not {end}")
    return out
