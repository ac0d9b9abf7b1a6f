"""Running a whole model through the mesh: route, per-hop sessions, failover, generation.

The client runs embeddings and the LM head itself and streams hidden states through a
route of peers that together cover every block. Each hop keeps the inputs it was sent, so
when a peer dies, stalls or answers with an error, only its span is re-routed and the
replacement's KV cache is rebuilt by replaying those inputs: the tokens come out the same.

Python API (see the README):

    async with open_client(bootstrap=[addr]) as client:
        result = await client.generate("tiny-llama", prompt_ids=[1, 2, 3], max_new_tokens=8)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import trio

from agent.errors import ShardmeshError
from agent.model.loading import torch_dtype
from agent.model.sampling import Sampler, SamplingParams
from agent.model.wire import from_frame, to_frame
from agent.net.framed import FramedStream, StreamGone
from agent.policy.routing import Hop, NoRoute, find_route
from agent.policy.snapshot import PeerSpan
from protocol import (
    FORWARD_PROTOCOL_ID,
    CloseSession,
    ErrorReply,
    OpenSession,
    ProtocolError,
    SessionOpened,
    Step,
    StepResult,
)

if TYPE_CHECKING:
    from libp2p.abc import IHost

    from agent.model.head import ClientHead
    from agent.net.mesh import Mesh
    from agent.route.verify import Verifier
    from agent.serve.serving import Serving

log = logging.getLogger("shardmesh.client")


class GenerationError(ShardmeshError):
    """Generation could not complete (no coverage, every replica failed, ...)."""


@dataclass(frozen=True)
class ClientConfig:
    step_timeout_s: float = 30.0
    open_timeout_s: float = 10.0
    max_failovers: int = 6
    failed_peer_cooldown_s: float = 60.0
    reroute_wait_s: float = 10.0  # how long to wait for a replacement to appear in the table
    wire_dtype: str = "float32"
    max_chunk_bytes: int = 16 * 1024 * 1024  # prefill/replay chunks stay well under frames
    # Verified outputs (agent.verify): the share of steps each hop also runs on a witness
    # (0 = off, 1 = every step), the per-row relative error still counted as agreement
    # (absorbs bf16/fp16 vs fp32 peers), and the seed of the step draw (None: from the OS,
    # so a peer cannot know which steps are checked; set it only to reproduce a run).
    verify_fraction: float = 0.0
    verify_tolerance: float = 0.05
    verify_seed: int | None = None


class MeshView(Protocol):
    """What the client needs from whoever hosts it (the agent, or a standalone node)."""

    host: IHost
    mesh: Mesh
    self_id: str
    serving: Serving | None

    def spans(self, model_id: str) -> list[PeerSpan]: ...

    def peer_addrs(self, peer_id: str) -> list[str]: ...


@dataclass
class PeerHealth:
    """Round-trip times seen per peer, and peers that failed recently (avoided a while)."""

    rtt_ms: dict[str, float] = field(default_factory=dict)
    failed_until: dict[str, float] = field(default_factory=dict)
    failovers: int = 0  # failovers over every session using this object (/metrics)

    def observe(self, peer_id: str, ms: float) -> None:
        old = self.rtt_ms.get(peer_id)
        self.rtt_ms[peer_id] = ms if old is None else 0.7 * old + 0.3 * ms

    def mark_failed(self, peer_id: str, cooldown_s: float) -> None:
        self.failed_until[peer_id] = time.monotonic() + cooldown_s

    def avoid(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self.failed_until.items() if until > now}


class HopError(Exception):
    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"peer {peer_id[-8:]}: {reason}")
        self.peer_id = peer_id
        self.reason = reason


# --- hops -----------------------------------------------------------------------------------
class RemoteHop:
    """One session on one remote peer over one libp2p stream, kept for the whole session."""

    def __init__(self, view: MeshView, hop: Hop, cfg: ClientConfig, health: PeerHealth) -> None:
        self.view = view
        self.host = view.host
        self.peer_id, self.start, self.end = hop.peer_id, hop.start, hop.end
        self.cfg = cfg
        self.health = health
        self.framed: FramedStream | None = None
        self._step_no = 0

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        from libp2p.peer.id import ID

        t0 = time.perf_counter()
        try:
            with trio.fail_after(self.cfg.open_timeout_s):
                if not self.view.mesh.is_connected(self.peer_id):
                    # Known from its ad but never dialled (a client that joined through
                    # one bootstrap peer, say): connect at the addresses it advertises.
                    await self.view.mesh.dial(self.view.peer_addrs(self.peer_id))
                stream = await self.host.new_stream(
                    ID.from_base58(self.peer_id), [FORWARD_PROTOCOL_ID]
                )
                self.framed = FramedStream(stream, max_frame=1 << 30)
                await self.framed.send(
                    OpenSession(
                        model_id=model_id,
                        start=self.start,
                        end=self.end,
                        max_length=max_length,
                        dtype=self.cfg.wire_dtype,
                        batch=batch,
                    )
                )
                reply = await self.framed.receive()
        except trio.TooSlowError:
            raise HopError(self.peer_id, "timed out opening a session") from None
        except (StreamGone, ProtocolError) as exc:
            raise HopError(self.peer_id, f"cannot open a session: {exc}") from None
        except Exception as exc:  # dial failures surface as assorted libp2p types
            raise HopError(self.peer_id, f"cannot reach peer: {exc}") from None
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"refused the session: {reply.code}: {reply.message}")
        if not isinstance(reply, SessionOpened):
            raise HopError(self.peer_id, f"unexpected reply {type(reply).__name__}")
        self.health.observe(self.peer_id, (time.perf_counter() - t0) * 1000)

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        assert self.framed is not None
        self._step_no += 1
        frame = to_frame(hidden.to(torch_dtype(self.cfg.wire_dtype)))
        t0 = time.perf_counter()
        try:
            with trio.fail_after(self.cfg.step_timeout_s):
                await self.framed.send(Step(step=self._step_no, position=position, hidden=frame))
                reply = await self.framed.receive()
        except trio.TooSlowError:
            raise HopError(
                self.peer_id, f"no answer within {self.cfg.step_timeout_s:g} s"
            ) from None
        except (StreamGone, ProtocolError) as exc:
            raise HopError(self.peer_id, str(exc)) from None
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"{reply.code}: {reply.message}")
        if not isinstance(reply, StepResult) or reply.step != self._step_no:
            raise HopError(self.peer_id, "answered out of order")
        out = from_frame(reply.hidden, device="cpu")
        if out.shape != hidden.shape:
            raise HopError(self.peer_id, f"returned shape {list(out.shape)}")
        self.health.observe(self.peer_id, (time.perf_counter() - t0) * 1000 - reply.elapsed_ms)
        return out

    async def close(self) -> None:
        if self.framed is None:
            return
        with trio.move_on_after(1):
            with contextlib.suppress(StreamGone):
                await self.framed.send(CloseSession())
        await self.framed.close()
        self.framed = None


class LocalHop:
    """A hop on the agent that hosts this client: no stream, same checks as a remote one."""

    def __init__(self, serving: Serving, hop: Hop, self_id: str, cfg: ClientConfig) -> None:
        self.serving = serving
        self.peer_id, self.start, self.end = self_id, hop.start, hop.end
        self.cfg = cfg
        self.session: Any = None

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        from agent.serve.serving import RequestRejected

        msg = OpenSession(
            model_id=model_id,
            start=self.start,
            end=self.end,
            max_length=max_length,
            dtype=self.cfg.wire_dtype,
            batch=batch,
        )
        try:
            self.session = self.serving.open_session("local", msg)
        except RequestRejected as exc:
            raise HopError(self.peer_id, f"{exc.code}: {exc}") from None

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        from agent.serve.serving import RequestRejected

        frame = to_frame(hidden.to(torch_dtype(self.cfg.wire_dtype)))
        try:
            result = await self.serving.run_step(
                self.session, Step(step=0, position=position, hidden=frame)
            )
        except RequestRejected as exc:
            raise HopError(self.peer_id, f"{exc.code}: {exc}") from None
        return from_frame(result.hidden, device="cpu")

    async def close(self) -> None:
        if self.session is not None:
            self.serving.close_session(self.session)
            self.session = None


@dataclass
class HopState:
    hop: RemoteHop | LocalHop
    inputs: list[torch.Tensor] = field(default_factory=list)  # replayed on failover


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
        self.verifier: Verifier | None = None

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
                    avoided = len(self.health.avoid())
                    extra = f" ({avoided} peers avoided after failures)" if avoided else ""
                    raise GenerationError(
                        f"model {self.model_id} is not fully served: {exc}{extra}"
                    ) from None
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

    def _make_hop(self, hop: Hop) -> RemoteHop | LocalHop:
        if hop.peer_id == self.view.self_id and self.view.serving is not None:
            return LocalHop(self.view.serving, hop, self.view.self_id, self.cfg)
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
                        outs = await _in_chunks(state.hop.step, x, 0, self.cfg.max_chunk_bytes)
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


async def _in_chunks(
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


# --- generation ------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    token_ids: list[int]
    route: list[dict[str, Any]]
    prefill_s: float
    decode_tokens_per_s: float
    failovers: int
    text: str | None = None
    failures: list[str] = field(default_factory=list)
    # Verified outputs (agent.verify): sampled steps checked / left unchecked for want of an
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
    tokens: list[int] = []
    try:
        t0 = time.perf_counter()
        await session.open()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        hidden = head.embed(ids, 0)
        out = (await _in_chunks(session.step, hidden, 0, cfg.max_chunk_bytes))[-1]
        token = int(sampler(head.logits(out[:, -1:])[:, -1])[0])
        prefill_s = time.perf_counter() - t0
        tokens.append(token)
        stop = bool(on_token and await on_token(token))
        t1 = time.perf_counter()
        position = len(prompt_ids)
        while not stop and len(tokens) < max_new_tokens and token not in eos:
            hidden = head.embed(torch.tensor([[token]], dtype=torch.long), position)
            out = await session.step(hidden, position)
            position += 1
            token = int(sampler(head.logits(out)[:, -1])[0])
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


# --- a standalone client node ----------------------------------------------------------------
class StandaloneView:
    """A mesh node that only listens to ads and opens sessions (no ads, no serving)."""

    serving = None

    def __init__(self, mesh: Any) -> None:
        from agent.policy.peertable import PeerTable

        self.mesh = mesh
        self.host = mesh.host
        self.self_id = mesh.peer_id
        self.table = PeerTable(mesh.peer_id)

    def spans(self, model_id: str) -> list[PeerSpan]:
        self.table.expire(time.monotonic(), self.mesh.is_connected)
        return self.table.spans_for(model_id)

    def on_ad(self, ad: Any) -> None:
        self.table.update(ad, time.monotonic())

    def peer_addrs(self, peer_id: str) -> list[str]:
        return self.table.addrs(peer_id)


@asynccontextmanager
async def open_standalone(
    bootstrap: Sequence[str],
    *,
    join_timeout_s: float = 15.0,
    swarm_secret_file: Path | None = None,
) -> AsyncIterator[StandaloneView]:
    """Join the mesh through `bootstrap` with a throwaway identity and listen to its ads
    (a private swarm's members admit it only with the swarm's secret)."""
    import tempfile

    from libp2p.crypto.ed25519 import create_new_key_pair

    from agent.config import AgentConfig, SwarmConfig
    from agent.net.mesh import open_mesh

    if not bootstrap:
        raise GenerationError("a standalone client needs at least one --bootstrap address")
    cfg = AgentConfig(
        state_dir=Path(tempfile.gettempdir()),
        listen=("/ip4/127.0.0.1/tcp/0",),
        mdns=False,
        swarm=SwarmConfig(secret_file=swarm_secret_file),
    )
    async with open_mesh(cfg, create_new_key_pair()) as mesh, trio.open_nursery() as nursery:
        view = StandaloneView(mesh)
        nursery.start_soon(mesh.receive_ads, view.on_ad)
        errors = []
        with trio.move_on_after(join_timeout_s):
            for addr in bootstrap:
                try:
                    await mesh.dial([addr])
                    break
                except ConnectionError as exc:
                    errors.append(str(exc))
            else:
                raise GenerationError(f"cannot join the mesh: {'; '.join(errors)}")
        if not mesh.connected_peers():
            raise GenerationError("cannot join the mesh: bootstrap peers did not answer in time")
        try:
            yield view
        finally:
            nursery.cancel_scope.cancel()


async def wait_for_model(view: StandaloneView, want: str, timeout_s: float) -> tuple[str, int]:
    """Wait until some peer advertises a model matching `want` (id or unique name) and every
    block is served; returns (model id, n_blocks)."""
    from agent.policy.modelresolve import resolve_model

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            model_id, n_blocks = resolve_model(want, view.table.models())
            find_route(view.spans(model_id), 0, n_blocks, rtt_ms={})
            return model_id, n_blocks
        except (ShardmeshError, NoRoute) as exc:
            if time.monotonic() >= deadline:
                raise GenerationError(str(exc)) from None
        await trio.sleep(0.2)
