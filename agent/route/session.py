"""One inference session across a route: per-hop sessions, failover by re-routing only the
lost span and replaying its inputs, so the tokens come out the same."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio

from agent.config import ClientConfig
from agent.policy.routing import Hop, NoRoute, find_route
from agent.route.chunks import in_chunks
from agent.route.health import PeerHealth
from agent.route.hops import HopError, LocalHop, RemoteHop
from agent.route.loading import load_failures, loading_now, model_peers
from agent.route.view import GenerationError, MeshView, ModelLoading

log = logging.getLogger("shardmesh.client")


@dataclass
class HopState:
    hop: RemoteHop | LocalHop
    inputs: list[torch.Tensor] = field(default_factory=list)  # replayed on failover


class StepCheck(Protocol):
    """Hooks a step checker (agent.route.verify.Verifier) gets around each step's hops."""

    def begin_step(self) -> None: ...

    async def run_hop(
        self, session: RouteSession, state: HopState, h: torch.Tensor, position: int
    ) -> torch.Tensor: ...

    async def end_step(self, session: RouteSession) -> None: ...

    async def close(self) -> None: ...

    def result_fields(self) -> dict[str, Any]: ...


# --- one inference session across a route ----------------------------------------------------
class RouteSession:
    def __init__(
        self,
        view: MeshView,
        model_id: str,
        n_blocks: int,
        *,
        max_length: int,
        batch: int = 1,
        cfg: ClientConfig | None = None,
        health: PeerHealth | None = None,
    ) -> None:
        self.view = view
        self.model_id = model_id
        self.n_blocks = n_blocks
        self.max_length = max_length
        self.batch = batch
        self.cfg = cfg or ClientConfig()
        self.health = health or PeerHealth()
        self.hops: list[HopState] = []
        self.failovers = 0
        self.failures: list[str] = []
        self.avoid: set[str] = set()  # peers outvoted by verification: never again here
        self.verifier: StepCheck | None = None

    def route(self) -> list[dict[str, Any]]:
        return [{"peer_id": s.hop.peer_id, "span": [s.hop.start, s.hop.end]} for s in self.hops]

    async def open(self) -> None:
        self.hops = await self._open_span(0, self.n_blocks)

    async def close(self) -> None:
        for state in self.hops:
            await state.hop.close()
        self.hops = []
        if self.verifier is not None:
            await self.verifier.close()

    def _plan(self, start: int, end: int) -> list[Hop]:
        spans = self.view.spans(self.model_id)
        avoid = self.health.avoid() | self.avoid
        return find_route(spans, start, end, rtt_ms=self.health.rtt_ms, avoid=avoid)

    async def _open_span(self, start: int, end: int) -> list[HopState]:
        """Route [start, end) and open a session on every hop, retrying around failures."""
        deadline = time.monotonic() + self.cfg.reroute_wait_s
        delay = 0.2
        while True:
            try:
                plan = self._plan(start, end)
            except NoRoute as exc:
                if time.monotonic() >= deadline:
                    raise self._unserved(exc, start, end) from None
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            opened: list[HopState] = []
            try:
                for hop in plan:
                    h = self._make_hop(hop)
                    await h.open(self.model_id, self.max_length, self.batch)
                    opened.append(HopState(h))
                return opened
            except HopError as exc:
                for state in opened:
                    await state.hop.close()
                self._note_failure(exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _unserved(self, exc: NoRoute, start: int, end: int) -> GenerationError:
        """Why [start, end) has no route after the wait: peers still loading it (the model is
        loading, not missing), or plainly not served (naming peers whose load failed)."""
        avoid = self.health.avoid() | self.avoid
        loading = loading_now(self.view, self.model_id, start, end, avoid)
        if loading is not None:
            return ModelLoading(
                f"{loading.describe()}; its blocks did not come online within "
                f"{self.cfg.reroute_wait_s:g} s: try again shortly"
            )
        avoided = len(self.health.avoid())
        extra = f" ({avoided} peers avoided after failures)" if avoided else ""
        failed = load_failures(model_peers(self.view, self.model_id), self.view.self_id)
        return GenerationError(f"model {self.model_id} is not fully served: {exc}{extra}{failed}")

    def _make_hop(self, hop: Hop) -> RemoteHop | LocalHop:
        if hop.peer_id == self.view.self_id and self.view.local is not None:
            return LocalHop(self.view.local, hop, self.view.self_id, self.cfg)
        return RemoteHop(self.view, hop, self.cfg, self.health)

    def _note_failure(self, exc: HopError) -> None:
        # Counted here, not in mark_failed: verification also marks witnesses that fail or
        # lose a vote, and those are no failovers.
        self.failovers += 1
        self.health.failovers += 1
        self.failures.append(str(exc))
        self.health.mark_failed(exc.peer_id, self.cfg.failed_peer_cooldown_s)
        log.warning("failover %d: %s", self.failovers, exc)
        if self.failovers > self.cfg.max_failovers:
            raise GenerationError(f"gave up after {self.failovers} failures; last: {exc}")

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Send hidden states for positions [position, position+q) through every hop."""
        i = 0
        h = hidden
        if self.verifier is not None:
            self.verifier.begin_step()
        while i < len(self.hops):
            state = self.hops[i]
            try:
                if self.verifier is not None:
                    out = await self.verifier.run_hop(self, state, h, position)
                else:
                    out = await state.hop.step(h, position)
            except HopError as exc:
                self._note_failure(exc)
                await state.hop.close()
                self.hops[i : i + 1] = await self._replace(state)
                continue  # same input, same position, on the replacement
            state.inputs.append(h)
            h = out
            i += 1
        if self.verifier is not None:
            await self.verifier.end_step(self)
        return h

    async def _replace(self, lost: HopState) -> list[HopState]:
        """Re-route only the lost span and rebuild the replacements' caches by replay."""
        while True:
            new = await self._open_span(lost.hop.start, lost.hop.end)
            try:
                if lost.inputs:
                    x = torch.cat(lost.inputs, dim=1)
                    for state in new:
                        state.inputs.append(x)
                        outs = await in_chunks(state.hop.step, x, 0, self.cfg.max_chunk_bytes)
                        x = torch.cat(outs, dim=1)
                log.info(
                    "replaced %s on blocks %d:%d by %s (replayed %d tokens)",
                    lost.hop.peer_id[-8:],
                    lost.hop.start,
                    lost.hop.end,
                    ", ".join(s.hop.peer_id[-8:] for s in new),
                    sum(t.shape[1] for t in lost.inputs),
                )
                return new
            except HopError as exc:
                for state in new:
                    await state.hop.close()
                self._note_failure(exc)
