"""Continuous batching, the pure half: which waiting steps the next forward carries.

No I/O, no torch: the batcher (agent.serve.batcher) hands a snapshot of its queue, in arrival
order, and gets back slices to run. The rules:

- One forward runs one span of blocks: the span of the oldest waiting step; steps of other
  spans wait for a later forward (they are next once they are the oldest).
- Decode steps first: every waiting step of that span whose remaining tokens fit in
  `prefill_chunk` goes in whole, so a running decode never waits behind a long prefill.
- Prefill next, in chunks: what is left of the token budget goes to longer steps, oldest
  first, each cut to at most `prefill_chunk` tokens (a step of 2,000 tokens runs over several
  forwards, interleaved with everyone's decodes).
- Bounds: `max_rows` sequences and `max_tokens` tokens (rows x tokens) per forward. The oldest
  step always goes (cut to fit the token budget), so nothing starves, however large.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """One step in the queue, as the planner sees it."""

    key: int  # the batcher's handle for the step
    span: tuple[int, int]  # the blocks [s, e) its session runs
    rows: int  # the session's batch size (sequences)
    remaining: int  # tokens of the step not yet run


@dataclass(frozen=True)
class Slice:
    """Run the next `tokens` of step `key` in this forward."""

    key: int
    tokens: int


@dataclass(frozen=True)
class BatchBounds:
    max_rows: int  # sequences per forward
    max_tokens: int  # rows x tokens per forward
    prefill_chunk: int  # tokens of one step per forward at most, once others wait


def plan_batch(waiting: Sequence[Waiting], bounds: BatchBounds) -> list[Slice]:
    """The slices of the next forward, oldest first ([] when nothing waits)."""
    if not waiting:
        return []
    oldest = waiting[0]
    span = oldest.span
    # The oldest step always runs: whole if it fits every bound, else its first chunk.
    by_budget = bounds.max_tokens // max(1, oldest.rows)
    first_tokens = max(1, min(oldest.remaining, bounds.prefill_chunk, by_budget))
    plan = [Slice(oldest.key, first_tokens)]
    rows, tokens = oldest.rows, oldest.rows * first_tokens
    same_span = [w for w in waiting[1:] if w.span == span]
    decodes = [w for w in same_span if w.remaining <= bounds.prefill_chunk]
    prefills = [w for w in same_span if w.remaining > bounds.prefill_chunk]
    for w in decodes:
        cost = w.rows * w.remaining
        if rows + w.rows <= bounds.max_rows and tokens + cost <= bounds.max_tokens:
            plan.append(Slice(w.key, w.remaining))
            rows, tokens = rows + w.rows, tokens + cost
    for w in prefills:
        room = (bounds.max_tokens - tokens) // w.rows
        if rows + w.rows > bounds.max_rows or room < 1:
            continue
        n = min(w.remaining, bounds.prefill_chunk, room)
        plan.append(Slice(w.key, n))
        rows, tokens = rows + w.rows, tokens + w.rows * n
    return plan


def gather_wait(waiting: int, active: int, waited_s: float, max_wait_s: float) -> float:
    """Seconds the next forward should still wait for more steps (0: run now).

    `waiting`: sessions with a step queued; `active`: sessions that stepped recently (their
    next step is on its way). When the device is the bottleneck, a forward over all of them
    costs little more than one over a few, and waiting lets streams that a pipeline spread
    over its stages meet again in one batch. Never waits when every active session is
    already queued (a lone stream pays nothing), nor past `max_wait_s` in all.
    """
    if waiting >= active or max_wait_s <= 0:
        return 0.0
    return max(0.0, max_wait_s - waited_s)
