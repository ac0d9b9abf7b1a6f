"""Verified outputs: recompute sampled steps of a span on independent peers and outvote liars.

A peer may return wrong hidden states, by fault or on purpose. For a chosen fraction of the
route's steps (a random draw, seeded from the OS unless a seed is given to reproduce a run, so
a peer cannot know which of its steps are checked), every hop's step is also run by a
*witness*: a chain of sessions on other peers covering the same blocks. A witness can only
recompute step t if it holds the span's KV state, so it is fed the span's recorded inputs
(the client keeps them for failover replay anyway): a new witness replays them all, a kept
one only the tokens it missed since its last check. The primary and the witness run the step
concurrently, so verifying every step costs about one extra forward per hop, not a round trip.

Outputs are compared in float32 by the worst per-row relative L2 error, so an honest bf16 or
fp16 peer agrees with an fp32 one (measured 0.006-0.009 over 3-6 tiny blocks, bf16 vs fp32)
while a tampered row (~1.0) does not. On a disagreement more independent witnesses are asked
until a strict majority agrees; every peer of a losing opinion is reported, avoided for the
rest of the session and named in the result. If the primary lost, its hop fails over through
the client's usual replay machinery and the step's output is the majority's, so the tokens
stay exact. A span no independent peer serves is counted as unverified, never a failure.

Limits: a step that is not sampled is not checked, and what a peer corrupts there flows on;
a witness learns which steps were sampled (it is fed then), so colluding peers could share
that; a losing witness that is a chain of several peers has all of them reported, since only
its end result was compared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import trio

from agent.config import ClientConfig
from agent.policy.routing import NoRoute, find_route
from agent.route.chunks import in_chunks
from agent.route.hops import HopError, LocalHop, RemoteHop
from agent.route.session import HopState, RouteSession
from agent.route.view import GenerationError
from agent.route.vote import StepSampler, agrees, majority, relative_error, tail_tokens

log = logging.getLogger("shardmesh.verify")

# Relative error per row that still counts as agreement: absorbs bf16/fp16 vs fp32 peers
# (under 0.01 measured over a few blocks) with room for deeper spans; tampering is ~1.
DEFAULT_TOLERANCE = ClientConfig.verify_tolerance
# Opinions gathered at most for one disputed step (the primary's included).
MAX_OPINIONS = 5
# Witnesses tried for one opinion before the step is left unverified.
MAX_WITNESS_TRIES = 3


class WitnessStale(Exception):
    """A kept witness is ahead of the step it is asked for: replace it."""


class Witness:
    """A second opinion on one span: sessions on a chain of peers, fed the span's inputs."""

    def __init__(self, start: int, end: int, hops: list[RemoteHop | LocalHop]) -> None:
        self.start, self.end = start, end
        self.hops = hops
        self.synced = 0  # tokens of the span's history it has consumed
        self.last: tuple[int, torch.Tensor] | None = None  # (position, output) of its last step

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(h.peer_id for h in self.hops)

    def describe(self) -> str:
        return "+".join(p[-8:] for p in self.peers)

    async def run(
        self, inputs: Sequence[torch.Tensor], h: torch.Tensor, position: int, max_bytes: int
    ) -> torch.Tensor:
        """Its output rows for `h` at `position`, after catching up on the inputs it missed."""
        q = h.shape[1]
        if self.last is not None and self.last[0] == position and self.synced == position + q:
            return self.last[1]  # a step re-run after a failover: already computed
        if self.synced > position:
            raise WitnessStale(f"witness holds {self.synced} tokens, asked for {position}")
        x = torch.cat([*tail_tokens(inputs, self.synced, position), h], dim=1)
        for hop in self.hops:
            x = torch.cat(await in_chunks(hop.step, x, self.synced, max_bytes), dim=1)
        out = x[:, -q:]
        self.synced, self.last = position + q, (position, out)
        return out

    async def close(self) -> None:
        for hop in self.hops:
            await hop.close()


@dataclass
class Opinion:
    peers: tuple[str, ...]
    out: torch.Tensor
    witness: Witness | None  # None: the primary's


class Verifier:
    """Per route session: which steps to check, the witnesses kept per span, the tallies."""

    def __init__(self, cfg: ClientConfig) -> None:
        try:
            self.sampler = StepSampler(cfg.verify_fraction, cfg.verify_seed)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        if not cfg.verify_tolerance > 0 or not math.isfinite(cfg.verify_tolerance):
            raise GenerationError(
                f"the verify tolerance must be a positive number, got {cfg.verify_tolerance}"
            )
        self.cfg = cfg
        self.tolerance = cfg.verify_tolerance
        self.witnesses: dict[tuple[int, int], Witness] = {}
        self.verified_steps = 0
        self.unverified_steps = 0
        self.mismatches = 0
        self.suspects: list[dict[str, Any]] = []
        self._step_no = -1
        self._selected = False
        self._step_ok = True
        self._decided: dict[tuple[int, int], torch.Tensor] = {}

    # --- hooks called by RouteSession.step --------------------------------------------------
    def begin_step(self) -> None:
        self._step_no += 1
        self._selected = self.sampler()
        self._step_ok = True
        self._decided.clear()

    async def end_step(self, session: RouteSession) -> None:
        if self._selected:
            if self._step_ok:
                self.verified_steps += 1
            else:
                self.unverified_steps += 1
        # Witnesses of spans the route no longer has (it failed over to other splits).
        live = {(s.hop.start, s.hop.end) for s in session.hops}
        for span in [s for s in self.witnesses if s not in live]:
            await self.witnesses.pop(span).close()

    async def run_hop(
        self, session: RouteSession, state: HopState, h: torch.Tensor, position: int
    ) -> torch.Tensor:
        """The hop's output for this step; raises HopError for a primary outvoted."""
        if not self._selected:
            return await state.hop.step(h, position)
        span = (state.hop.start, state.hop.end)
        primary = state.hop.peer_id
        decided = self._decided.get(span)
        if decided is not None:
            # A replacement re-running a step the majority settled: it must agree with it.
            rerun = await state.hop.step(h, position)
            err = relative_error(rerun, decided)
            if err > self.tolerance:
                self.mismatches += 1
                why = (
                    f"disagreed with the majority already settled on blocks {span[0]}:{span[1]} "
                    f"(relative error {err:.3g} > {self.tolerance:g})"
                )
                self._report(session, primary, span, position, why, primary=True)
                raise HopError(
                    primary, f"output disagrees with the majority on {span[0]}:{span[1]}"
                )
            return decided

        out: torch.Tensor | None = None
        failure: HopError | None = None
        second: tuple[Witness, torch.Tensor] | None = None

        async def run_primary() -> None:
            nonlocal out, failure
            try:
                out = await state.hop.step(h, position)
            except HopError as exc:
                failure = exc

        async def run_witness() -> None:
            nonlocal second
            second = await self._kept_opinion(session, span, state, h, position)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_primary)
            nursery.start_soon(run_witness)
        if failure is not None:
            if second is not None:  # keep it: the replacement's re-run reuses its answer
                self.witnesses[span] = second[0]
            raise failure
        assert out is not None
        if second is None:
            self._step_ok = False
            log.debug("step %d: no independent peer for blocks %d:%d", self._step_no, *span)
            return out
        witness, other = second
        if agrees(out, other, self.tolerance):
            self.witnesses[span] = witness
            return out
        return await self._dispute(session, state, h, position, out, witness, other)

    async def close(self) -> None:
        for w in self.witnesses.values():
            await w.close()
        self.witnesses.clear()

    def result_fields(self) -> dict[str, Any]:
        return {
            "verified_steps": self.verified_steps,
            "unverified_steps": self.unverified_steps,
            "mismatches": self.mismatches,
            "suspect_peers": list(self.suspects),
        }

    # --- disputes ----------------------------------------------------------------------------
    async def _dispute(
        self,
        session: RouteSession,
        state: HopState,
        h: torch.Tensor,
        position: int,
        out: torch.Tensor,
        witness: Witness,
        other: torch.Tensor,
    ) -> torch.Tensor:
        span = (state.hop.start, state.hop.end)
        primary = state.hop.peer_id
        self.mismatches += 1
        log.warning(
            "step %d: blocks %d:%d of %s and witness %s disagree (relative error %.3g); "
            "asking for more opinions",
            self._step_no, *span, primary[-8:], witness.describe(),
            relative_error(out, other),
        )  # fmt: skip
        opinions = [Opinion((primary,), out, None), Opinion(witness.peers, other, witness)]
        verdict = majority([o.out for o in opinions], self.tolerance)
        while not verdict.decided and len(opinions) < MAX_OPINIONS:
            used = {p for o in opinions for p in o.peers}
            extra = await self._fresh_opinion(session, span, state, h, position, used)
            if extra is None:
                break
            opinions.append(Opinion(extra[0].peers, extra[1], extra[0]))
            verdict = majority([o.out for o in opinions], self.tolerance)
        if verdict.winner is None:
            self._step_ok = False
            log.warning(
                "step %d: no majority among %d opinions on blocks %d:%d; step left unverified",
                self._step_no, len(opinions), *span,
            )  # fmt: skip
            self.witnesses[span] = witness
            for o in opinions[2:]:
                if o.witness is not None:
                    await o.witness.close()
            return out
        winning = opinions[verdict.winner].out
        kept: Witness | None = None
        for i, o in enumerate(opinions):
            if i in verdict.minority:
                err = relative_error(o.out, winning)
                reason = (
                    f"outvoted: the majority ({len(verdict.majority)} of {len(opinions)} "
                    f"opinions) differs on blocks {span[0]}:{span[1]} "
                    f"(relative error {err:.3g} > {self.tolerance:g})"
                )
                if len(o.peers) > 1:
                    reason += f" as part of the chain {'+'.join(p[-8:] for p in o.peers)}"
                for peer in o.peers:
                    self._report(session, peer, span, position, reason, primary=peer == primary)
                if o.witness is not None:
                    await o.witness.close()
            elif o.witness is not None:
                if kept is None:
                    kept = o.witness
                else:
                    await o.witness.close()
        if kept is not None:
            self.witnesses[span] = kept
        if 0 in verdict.minority:
            self._decided[span] = winning
            raise HopError(primary, f"output disagrees with the majority on {span[0]}:{span[1]}")
        return out

    def _report(
        self,
        session: RouteSession,
        peer: str,
        span: tuple[int, int],
        position: int,
        why: str,
        *,
        primary: bool,
    ) -> None:
        session.avoid.add(peer)
        if not primary:  # a primary's failover marks it already
            session.health.mark_failed(peer, session.cfg.failed_peer_cooldown_s)
        self.suspects.append(
            {
                "peer_id": peer,
                "span": list(span),
                "step": self._step_no,
                "position": position,
                "reason": why,
            }
        )
        log.warning("suspect peer %s: %s; avoided for the rest of the session", peer, why)

    # --- witnesses ---------------------------------------------------------------------------
    async def _kept_opinion(
        self,
        session: RouteSession,
        span: tuple[int, int],
        state: HopState,
        h: torch.Tensor,
        position: int,
    ) -> tuple[Witness, torch.Tensor] | None:
        """The span's kept witness (if still independent and trusted) answers; else a new one."""
        primary = state.hop.peer_id
        w = self.witnesses.pop(span, None)
        if w is not None and (primary in w.peers or any(p in session.avoid for p in w.peers)):
            await w.close()
            w = None
        if w is not None:
            try:
                return w, await w.run(state.inputs, h, position, session.cfg.max_chunk_bytes)
            except (HopError, WitnessStale) as exc:
                log.info("witness %s for blocks %d:%d dropped: %s", w.describe(), *span, exc)
                if isinstance(exc, HopError):
                    session.health.mark_failed(exc.peer_id, session.cfg.failed_peer_cooldown_s)
                await w.close()
        return await self._fresh_opinion(session, span, state, h, position, {primary})

    async def _fresh_opinion(
        self,
        session: RouteSession,
        span: tuple[int, int],
        state: HopState,
        h: torch.Tensor,
        position: int,
        exclude: set[str],
    ) -> tuple[Witness, torch.Tensor] | None:
        """Open a witness on peers outside `exclude` and replay the span's history into it."""
        tried: set[str] = set()
        for _ in range(MAX_WITNESS_TRIES):
            avoid = exclude | tried | session.avoid | session.health.avoid()
            try:
                plan = find_route(
                    session.view.spans(session.model_id),
                    *span,
                    rtt_ms=session.health.rtt_ms,
                    avoid=avoid,
                )
            except NoRoute:
                return None
            hops = [session._make_hop(hop) for hop in plan]
            w = Witness(span[0], span[1], [])
            try:
                for hop in hops:
                    await hop.open(session.model_id, session.max_length, session.batch)
                    w.hops.append(hop)
                return w, await w.run(state.inputs, h, position, session.cfg.max_chunk_bytes)
            except HopError as exc:
                log.info("witness %s for blocks %d:%d failed: %s", w.describe(), *span, exc)
                tried.add(exc.peer_id)
                session.health.mark_failed(exc.peer_id, session.cfg.failed_peer_cooldown_s)
                for hop in hops:
                    await hop.close()
        return None
