"""Auto placement on a live mesh: hear the others, pick a span, settle clashes."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from agent.config import ServeConfig
from agent.model.modelinfo import ModelInfo, block_param_bytes
from agent.policy.placement import blocks_that_fit, choose_span
from agent.policy.snapshot import SERVING_STATES
from agent.serve.host import ServingHost
from agent.serve.memory import weights_budget

log = logging.getLogger("shardmesh.serving")

# Auto placement waits this many announce intervals to hear the mesh before choosing.
PLACEMENT_LISTEN_INTERVALS = 2.5
CLASH_ROUNDS = 3


Announce = Callable[[ServingHost, tuple[int, int]], Awaitable[None]]


async def auto_place(
    host: ServingHost, cfg: ServeConfig, info: ModelInfo, device: str, announce: Announce
) -> tuple[int, int]:
    """Hear the mesh first (with jitter, so agents started together see each other's
    "joining" ads and spread out), then pick the span that fills the weakest coverage.
    `announce` publishes a tentative choice as a "joining" ad."""
    listen = cfg.announce_interval * PLACEMENT_LISTEN_INTERVALS * random.uniform(0.5, 1.0)
    log.info(
        "choosing blocks of %s: listening to the mesh for %.1f s first (--blocks START:END "
        "skips this)",
        info.name,
        listen + cfg.announce_interval * 1.5,  # and the first round of the clash check
    )
    await trio.sleep(listen)
    per_block = block_param_bytes(info, cfg.dtype)
    capacity = max(1, blocks_that_fit(weights_budget(device), per_block))
    if cfg.max_blocks:
        capacity = min(capacity, cfg.max_blocks)
    me = host.peer_id
    others = host.spans_for(info.model_id)
    span = choose_span(others, info.n_blocks, capacity, self_id=me)
    # Agents that chose at the same moment may have picked the same span: announce the
    # choice, listen, and let the one with the higher peer id move (a few rounds at most).
    for _ in range(CLASH_ROUNDS):
        await announce(host, span)
        await trio.sleep(cfg.announce_interval * 1.5)
        others = host.spans_for(info.model_id)
        clash = any(
            (p.start, p.end) == span and p.peer_id < me and p.state in SERVING_STATES
            for p in others
        )
        if not clash:
            break
        moved = choose_span(others, info.n_blocks, capacity, self_id=me)
        if moved == span:
            break
        log.info("span %d:%d is also taken by a peer that chose first; moving", *span)
        span = moved
    log.info(
        "auto placement: %d peers serve %s; room for %d blocks; chose %d:%d",
        len(others),
        info.name,
        capacity,
        *span,
    )
    return span
