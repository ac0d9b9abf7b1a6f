"""Generating tokens through the mesh: embeddings and head here, the blocks on the route."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import trio

from agent.config import ClientConfig
from agent.model.sampling import Sampler, SamplingParams
from agent.route.chunks import in_chunks
from agent.route.headbatch import head_batcher
from agent.route.health import PeerHealth
from agent.route.session import RouteSession
from agent.route.view import GenerationError, MeshView

if TYPE_CHECKING:
    from agent.model.head import ClientHead


@dataclass
class GenerationResult:
    token_ids: list[int]
    route: list[dict[str, Any]]
    prefill_s: float
    decode_tokens_per_s: float
    failovers: int
    text: str | None = None
    failures: list[str] = field(default_factory=list)
    # Verified outputs (agent.route.verify): sampled steps checked / left unchecked for want of an
    # independent peer, disagreements seen, and the peers outvoted ({peer_id, span, reason}).
    verified_steps: int = 0
    unverified_steps: int = 0
    mismatches: int = 0
    suspect_peers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "route": self.route,
            "prefill_s": round(self.prefill_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "failovers": self.failovers,
            "failures": self.failures,
            "verified_steps": self.verified_steps,
            "unverified_steps": self.unverified_steps,
            "mismatches": self.mismatches,
            "suspect_peers": self.suspect_peers,
        }


# Called with each new token; returning True stops the generation (a stop string matched).
OnToken = Callable[[int], Awaitable[bool | None]]


async def generate_ids(
    view: MeshView,
    head: ClientHead,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: OnToken | None = None,
    cfg: ClientConfig | None = None,
    health: PeerHealth | None = None,
) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids (batch 1) through the mesh."""
    cfg = cfg or ClientConfig()
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    if max_new_tokens < 1:
        raise GenerationError("max_new_tokens must be at least 1")
    vocab = head.info.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise GenerationError(f"prompt ids must be in [0, {vocab})")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    sampler = Sampler(sampling or SamplingParams())
    session = RouteSession(
        view,
        head.info.model_id,
        head.info.n_blocks,
        max_length=len(prompt_ids) + max_new_tokens,
        cfg=cfg,
        health=health,
    )
    if cfg.verify_fraction > 0:
        from agent.route.verify import Verifier

        session.verifier = Verifier(cfg)
    # Off the event loop, and in one matmul with other generations through this head.
    logits = head_batcher(head).logits
    tokens: list[int] = []
    try:
        t0 = time.perf_counter()
        await session.open()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        hidden = head.embed(ids, 0)
        out = (await in_chunks(session.step, hidden, 0, cfg.max_chunk_bytes))[-1]
        token = int(sampler((await logits(out[:, -1:]))[:, -1])[0])
        prefill_s = time.perf_counter() - t0
        tokens.append(token)
        stop = bool(on_token and await on_token(token))
        t1 = time.perf_counter()
        position = len(prompt_ids)
        while not stop and len(tokens) < max_new_tokens and token not in eos:
            hidden = head.embed(torch.tensor([[token]], dtype=torch.long), position)
            out = await session.step(hidden, position)
            position += 1
            token = int(sampler((await logits(out))[:, -1])[0])
            tokens.append(token)
            stop = bool(on_token and await on_token(token))
        decode_s = time.perf_counter() - t1
        decoded = len(tokens) - 1
        return GenerationResult(
            token_ids=tokens,
            route=session.route(),
            prefill_s=prefill_s,
            decode_tokens_per_s=decoded / decode_s if decoded and decode_s > 0 else 0.0,
            failovers=session.failovers,
            failures=session.failures,
            **(session.verifier.result_fields() if session.verifier else {}),
        )
    finally:
        with trio.CancelScope(shield=True):
            await session.close()
