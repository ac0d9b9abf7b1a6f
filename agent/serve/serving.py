"""Serving a span of model blocks to the mesh: load, place, sessions, the forward protocol.

Imported only by agents started with `--model` (it imports torch). Every request is checked
against the session and the limits before any work; a bad request gets an ErrorReply on its
stream and changes nothing, and the agent keeps serving everyone else.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from agent.api.metrics import STEP_SECONDS
from agent.config import AgentConfig
from agent.errors import ShardmeshError
from agent.model.modelinfo import ModelError, ModelInfo, block_param_bytes, read_model_info
from agent.net.framed import FramedStream, StreamGone
from agent.policy.peerlimits import LimitExceeded, PeerLimits
from agent.policy.placement import blocks_that_fit, choose_span
from protocol import (
    FORWARD_PROTOCOL_ID,
    CloseSession,
    ErrorReply,
    FrameTooLarge,
    OpenSession,
    ProtocolError,
    SessionOpened,
    Step,
    StepResult,
)

if TYPE_CHECKING:
    import torch

    from agent.daemon.node import Node
    from agent.model.blocks import SessionCache, ShardModel

log = logging.getLogger("shardmesh.serving")

# Auto placement waits this many announce intervals to hear the mesh before choosing.
PLACEMENT_LISTEN_INTERVALS = 2.5
WRITE_TIMEOUT_S = 30.0
WIRE_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class RequestRejected(Exception):
    """A request that breaks a limit or does not fit: becomes an ErrorReply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Session:
    id: str
    peer: str
    start: int
    end: int
    max_length: int
    batch: int
    dtype: str
    cache: SessionCache
    reserved_bytes: int
    opened: float
    steps: int = 0
    stream: Any = None  # the libp2p stream it lives on (None for the agent's own client)
    handler: trio.CancelScope | None = None  # cancels that stream's handler


class Serving:
    """The serving part of one agent; created before the mesh starts, started inside it."""

    protocol_id = FORWARD_PROTOCOL_ID

    def __init__(self, cfg: AgentConfig, info: ModelInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.shard: ShardModel | None = None
        self.span: tuple[int, int] = (0, 0)  # meaningful once chosen_span() is not None
        self._span_chosen = False
        self.throughput = 0.0
        self.kv_budget_bytes = 0
        self.sessions: dict[str, Session] = {}
        self._reserved = 0
        self._compute = trio.CapacityLimiter(1)  # one forward at a time on the device
        self.tokens_served = 0
        self.errors_sent: dict[str, int] = {}
        self.peer_limits = PeerLimits(cfg.limits)  # one peer over a limit: only it notices
        # Set while the owner needs the machine or the agent is stopping: no new sessions.
        self.draining = False

    # --- set-up ---------------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: AgentConfig) -> Serving:
        assert cfg.model is not None
        try:
            info = read_model_info(cfg.model)
        except ModelError as exc:
            raise ShardmeshError(str(exc)) from None
        span = cfg.block_range()
        if span is not None and span[1] > info.n_blocks:
            raise ShardmeshError(
                f"--blocks {span[0]}:{span[1]} is outside {info.name}, which has "
                f"{info.n_blocks} blocks"
            )
        if cfg.threads:
            import torch

            # Here, on the main thread before any worker exists: the forward runs in trio's
            # worker threads, and OpenMP takes a thread's team size from where it was set.
            torch.set_num_threads(cfg.threads)
        return cls(cfg, info)

    def chosen_span(self) -> tuple[int, int] | None:
        return self.span if self._span_chosen else None

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def n_blocks(self) -> int:
        return self.info.n_blocks

    async def start(self, node: Node, nursery: trio.Nursery) -> None:
        """Choose the span, load it, measure it, and open the forward protocol."""
        await self.load(node)
        self.open_protocol(node, nursery)

    def open_protocol(self, node: Node, nursery: trio.Nursery) -> None:
        """Answer the forward protocol (requests get "busy" while no blocks are loaded)."""
        node.mesh.host.set_stream_handler(FORWARD_PROTOCOL_ID, self.handle_stream)
        nursery.start_soon(self._log_load)

    async def load(self, node: Node) -> None:
        """Choose the span (again, with auto placement: the mesh may have changed while we
        were away), load its blocks, measure them and size the KV budget."""
        device = _pick_device(self.cfg, node)
        span = self.cfg.block_range()
        if span is None:
            span = await self._auto_place(node, device)
        self.span, self._span_chosen = span, True
        node.info.reason = f"loading blocks {span[0]}:{span[1]}"
        log.info("loading blocks %d:%d of %s on %s", *span, self.info.name, device)
        t0 = time.monotonic()
        self.shard = await trio.to_thread.run_sync(self._load, device)
        self.throughput = await trio.to_thread.run_sync(self.shard.measure_throughput)
        self.kv_budget_bytes = _kv_budget(self.shard, self.cfg)
        self.peer_limits.set_kv_budget(self.kv_budget_bytes, self.shard.kv_bytes_per_token())
        log.info(
            "loaded in %.1f s; throughput %.0f blocks*tokens/s; KV budget %d tokens",
            time.monotonic() - t0,
            self.throughput,
            self.kv_free_tokens(),
        )
        self.draining = False

    async def unload(self) -> None:
        """End every session (clients fail over and replay elsewhere), then free the blocks'
        memory. Remote sessions end by resetting their stream; the stream handler closes
        them once any forward in flight has finished."""
        self.draining = True
        await self.end_sessions()
        async with self._compute:  # no forward may be running on the blocks we drop
            shard, self.shard = self.shard, None
            self._span_chosen = False
            self.kv_budget_bytes = 0
            self.throughput = 0.0
            device = str(shard.device) if shard is not None else "cpu"
            del shard
            await trio.to_thread.run_sync(_release_memory, device)
        log.info("blocks unloaded; memory returned")

    async def end_sessions(self) -> None:
        """End every open session now; a remote client sees its stream reset and fails over."""
        for session in list(self.sessions.values()):
            if session.stream is None:
                self.close_session(session)
            else:
                # The reset tells the client at once; cancelling the handler wakes it from
                # its read (a forward in flight finishes first: threads are not cancelled).
                with trio.move_on_after(1.0):
                    try:
                        await session.stream.reset()
                    except Exception as exc:  # already gone: its handler cleans up
                        log.debug("resetting a session stream: %s", exc)
                if session.handler is not None:
                    session.handler.cancel()
        with trio.move_on_after(WRITE_TIMEOUT_S):
            while self.sessions:
                await trio.sleep(0.05)
        for session in list(self.sessions.values()):
            self.close_session(session)

    def _load(self, device: str) -> ShardModel:
        from agent.model.blocks import ShardModel

        try:
            return ShardModel.load(
                self.cfg.model, self.span[0], self.span[1], dtype=self.cfg.dtype, device=device
            )
        except ModelError as exc:
            raise ShardmeshError(str(exc)) from None

    async def _auto_place(self, node: Node, device: str) -> tuple[int, int]:
        # Hear the mesh first (with jitter, so agents started together see each other's
        # "joining" ads and spread out), then pick the span that fills the weakest coverage.
        node.info.reason = "choosing blocks"
        wait = self.cfg.announce_interval * PLACEMENT_LISTEN_INTERVALS
        await trio.sleep(wait * random.uniform(0.5, 1.0))
        budget = _memory_budget(device)
        per_block = block_param_bytes(self.info, self.cfg.dtype)
        capacity = max(1, blocks_that_fit(budget, per_block))
        if self.cfg.max_blocks:
            capacity = min(capacity, self.cfg.max_blocks)
        me = node.mesh.peer_id
        others = node.table.spans_for(self.model_id)
        span = choose_span(others, self.n_blocks, capacity, self_id=me)
        # Agents that chose at the same moment may have picked the same span: announce the
        # choice, listen, and let the one with the higher peer id move (a few rounds at most).
        for _ in range(3):
            self.span, self._span_chosen = span, True
            await node.publish_ad("joining")
            await trio.sleep(self.cfg.announce_interval * 1.5)
            others = node.table.spans_for(self.model_id)
            clash = any(
                (p.start, p.end) == span and p.peer_id < me and p.state in ("joining", "online")
                for p in others
            )
            if not clash:
                break
            moved = choose_span(others, self.n_blocks, capacity, self_id=me)
            if moved == span:
                break
            log.info("span %d:%d is also taken by a peer that chose first; moving", *span)
            span = moved
        log.info(
            "auto placement: %d peers serve %s; room for %d blocks; chose %d:%d",
            len(others),
            self.info.name,
            capacity,
            *span,
        )
        return span

    # --- accounting -----------------------------------------------------------------------
    def _kv_bytes(self, start: int, end: int, tokens: int) -> int:
        assert self.shard is not None
        per_block = self.shard.kv_bytes_per_token() // max(1, self.shard.n_blocks)
        return per_block * (end - start) * tokens

    def kv_free_tokens(self) -> int:
        if self.shard is None:
            return 0
        per_token = max(1, self.shard.kv_bytes_per_token())
        return max(0, (self.kv_budget_bytes - self._reserved) // per_token)

    def active_sessions(self) -> int:
        return len(self.sessions)

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "model_name": self.model_name,
            "n_blocks": self.n_blocks,
            "span": list(self.span) if self._span_chosen else None,
            "loaded": self.shard is not None,
            "sessions": len(self.sessions),
            "throughput": round(self.throughput, 1),
            "kv_free_tokens": self.kv_free_tokens(),
            "tokens_served": self.tokens_served,
            "dtype": self.cfg.dtype,
            "draining": self.draining,
            "device": str(self.shard.device) if self.shard else None,
            "forward_errors": dict(self.errors_sent),
            "peer_limits": self.peer_limits.status(),
        }

    # --- the forward protocol -------------------------------------------------------------
    async def handle_stream(self, stream: Any) -> None:
        # Its own cancel scope, so that end_sessions can stop a handler blocked on a read.
        with trio.CancelScope() as scope:
            await self._serve_stream(stream, scope)

    async def _serve_stream(self, stream: Any, scope: trio.CancelScope) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        framed = FramedStream(stream, max_frame=self.cfg.limits.max_frame_bytes)
        session: Session | None = None
        charged = 0  # bytes of this stream already charged to the peer's byte rate
        try:
            while True:
                with trio.move_on_after(self.cfg.limits.session_idle_timeout) as idle:
                    try:
                        msg = await framed.receive()
                    except ProtocolError as exc:  # FrameTooLarge included
                        # A frame that does not decode still costs the peer a request and
                        # its bytes: garbage is paced like anything else.
                        nbytes, charged = framed.bytes_in - charged, framed.bytes_in
                        code = "too_large" if isinstance(exc, FrameTooLarge) else exc.code
                        if not await self._refuse_frame(framed, peer, nbytes, code, str(exc)):
                            return
                        continue
                if idle.cancelled_caught:
                    log.info("session of %s idle too long; closing", peer)
                    return
                if isinstance(msg, CloseSession):
                    return
                nbytes, charged = framed.bytes_in - charged, framed.bytes_in
                try:
                    await self._pace(peer, nbytes)
                    if isinstance(msg, OpenSession):
                        if session is not None:
                            raise RequestRejected("bad_request", "a session is already open")
                        session = self.open_session(peer, msg)
                        session.stream, session.handler = stream, scope
                        reply: Any = SessionOpened(
                            session_id=session.id,
                            max_length=session.max_length,
                            kv_free_tokens=self.kv_free_tokens(),
                        )
                    elif isinstance(msg, Step):
                        reply = await self.run_step(session, msg)
                    else:
                        raise RequestRejected("bad_request", f"unexpected {type(msg).__name__}")
                except RequestRejected as exc:
                    step = msg.step if isinstance(msg, Step) else None
                    if not await self._refuse(framed, peer, exc.code, str(exc), step):
                        return
                    continue
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await framed.send(reply)
        except (StreamGone, trio.TooSlowError) as exc:
            log.debug("stream from %s ended: %s", peer, exc)
        finally:
            if session is not None:
                self.close_session(session)
            await framed.close()

    async def _refuse_frame(
        self, framed: FramedStream, peer: str, nbytes: int, code: str, message: str
    ) -> bool:
        """Answer an undecodable frame after pacing it; False: drop the peer's stream."""
        try:
            await self._pace(peer, nbytes)
        except RequestRejected as exc:
            code, message = exc.code, str(exc)
        return await self._refuse(framed, peer, code, message, None)

    async def _refuse(
        self, framed: FramedStream, peer: str, code: str, message: str, step: int | None
    ) -> bool:
        """Send the error reply; False when the peer keeps ignoring its rate limit and its
        stream is to be dropped."""
        await self._reply_error(framed, code, message, step)
        if code == "rate_limited" and self.peer_limits.should_drop(peer):
            log.info("%s ignores rate limiting; dropping its stream", peer)
            return False
        return True

    async def _pace(self, peer: str, nbytes: int) -> None:
        """Per-peer requests/s and bytes/s: wait for the peer's turn, or refuse the request
        when that wait would be too long."""
        try:
            wait = self.peer_limits.admit(peer, nbytes)
        except LimitExceeded as exc:
            raise RequestRejected(exc.code, str(exc)) from None
        if wait > 0:
            await trio.sleep(wait)

    async def _reply_error(
        self, framed: FramedStream, code: str, message: str, step: int | None
    ) -> None:
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1
        with trio.fail_after(WRITE_TIMEOUT_S):
            await framed.send(ErrorReply(code=code, message=message[:1000], step=step))

    def open_session(self, peer: str, msg: OpenSession) -> Session:
        lim = self.cfg.limits
        if self.shard is None:
            raise RequestRejected("busy", "blocks are not loaded")
        if self.draining:
            raise RequestRejected("draining", "this peer is draining: its owner needs it")
        if msg.model_id != self.model_id:
            raise RequestRejected(
                "wrong_model", f"this peer serves {self.model_id}, not {msg.model_id}"
            )
        lo, hi = self.span
        if not lo <= msg.start < msg.end <= hi:
            raise RequestRejected(
                "span_not_served", f"blocks {msg.start}:{msg.end} are not within {lo}:{hi}"
            )
        if msg.dtype not in WIRE_FLOAT_DTYPES:
            # The wire dtype is the client's choice; blocks compute in the agent's --dtype.
            raise RequestRejected(
                "wrong_dtype", f"hidden states must be one of {WIRE_FLOAT_DTYPES}"
            )
        if msg.batch < 1 or msg.batch > lim.max_batch:
            raise RequestRejected("bad_request", f"batch must be 1..{lim.max_batch}")
        if msg.max_length < 1 or msg.max_length > lim.max_session_tokens:
            raise RequestRejected(
                "too_long", f"max_length must be 1..{lim.max_session_tokens} tokens"
            )
        if len(self.sessions) >= lim.max_sessions:
            raise RequestRejected("too_many_sessions", f"{lim.max_sessions} sessions are open")
        need = self._kv_bytes(msg.start, msg.end, msg.max_length * msg.batch)
        if self._reserved + need > self.kv_budget_bytes:
            raise RequestRejected(
                "kv_budget",
                f"not enough KV-cache memory for {msg.batch}x{msg.max_length} tokens "
                f"({self.kv_free_tokens()} tokens free)",
            )
        if peer != "local":  # the agent's own client is its owner: global limits only
            try:
                self.peer_limits.open_session(peer, need)
            except LimitExceeded as exc:
                raise RequestRejected(exc.code, str(exc)) from None
        session = Session(
            id=secrets.token_hex(8),
            peer=peer,
            start=msg.start,
            end=msg.end,
            max_length=msg.max_length,
            batch=msg.batch,
            dtype=msg.dtype,
            cache=self.shard.new_cache(),
            reserved_bytes=need,
            opened=time.monotonic(),
        )
        self._reserved += need
        self.sessions[session.id] = session
        log.debug("session %s opened by %s for blocks %d:%d", session.id, peer, msg.start, msg.end)
        return session

    def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self._reserved -= session.reserved_bytes
            if session.peer != "local":
                self.peer_limits.close_session(session.peer, session.reserved_bytes)
            log.debug("session %s closed after %d steps", session.id, session.steps)

    async def run_step(self, session: Session | None, msg: Step) -> StepResult:
        from agent.model.wire import WireError, from_frame, to_frame

        if session is None:
            raise RequestRejected("no_session", "open a session before sending steps")
        if session.id not in self.sessions or self.shard is None:
            raise RequestRejected("no_session", "the session was ended: blocks unloaded")
        t = msg.hidden
        if t.dtype != session.dtype:
            raise RequestRejected("wrong_dtype", f"hidden states must be {session.dtype}")
        if (
            len(t.shape) != 3
            or t.shape[0] != session.batch
            or t.shape[1] < 1
            or (t.shape[2] != self.info.hidden_size)
        ):
            raise RequestRejected(
                "wrong_shape",
                f"hidden states must be [{session.batch}, tokens, {self.info.hidden_size}], "
                f"got {list(t.shape)}",
            )
        if msg.position != session.cache.length:
            raise RequestRejected(
                "position",
                f"step at position {msg.position}, but the session holds "
                f"{session.cache.length} tokens",
            )
        if msg.position + t.shape[1] > session.max_length:
            raise RequestRejected(
                "too_long", f"positions beyond the session's max length {session.max_length}"
            )
        shard = self.shard
        assert shard is not None
        try:
            hidden = from_frame(t, device=shard.device)
        except WireError as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        t0 = time.perf_counter()
        try:
            out = await trio.to_thread.run_sync(
                self._forward, session, hidden, msg.position, limiter=self._compute
            )
        except ValueError as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        except Exception as exc:  # a bug or device failure: report it, keep serving
            log.exception("forward failed")
            raise RequestRejected("internal", f"forward failed: {type(exc).__name__}") from None
        session.steps += 1
        self.tokens_served += t.shape[0] * t.shape[1]
        elapsed = (time.perf_counter() - t0) * 1000
        STEP_SECONDS.observe(elapsed / 1000)
        return StepResult(step=msg.step, hidden=to_frame(out), elapsed_ms=elapsed)

    def _forward(self, session: Session, hidden: torch.Tensor, position: int) -> torch.Tensor:
        assert self.shard is not None
        out = self.shard.forward(session.cache, hidden, position, span=(session.start, session.end))
        return out.to(hidden.dtype)

    async def _log_load(self) -> None:
        """Idle sessions are closed by their stream handler (idle timeout); log the load."""
        while True:
            await trio.sleep(30)
            if self.sessions:
                log.info(
                    "%d sessions open, %d KV tokens free", len(self.sessions), self.kv_free_tokens()
                )


def _pick_device(cfg: AgentConfig, node: Node) -> str:
    if cfg.device != "auto":
        return cfg.device
    # NVML indexes by PCI bus; make CUDA agree before torch initialises it.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from agent.hw.devices import best_cuda_device

    report = node.info.devices
    index = best_cuda_device(report) if report else None
    if index is None:
        return "cpu"
    import torch

    return f"cuda:{index}" if torch.cuda.is_available() else "cpu"


def _release_memory(device: str) -> None:
    """Give freed blocks back: collect cycles, and return CUDA's cached blocks to the driver."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _free_memory(device: str) -> int:
    """Free bytes on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _memory_budget(device: str) -> int:
    """Bytes this agent may spend on weights: 80% of the device's free memory."""
    return int(_free_memory(device) * 0.8)


def _kv_budget(shard: ShardModel, cfg: AgentConfig) -> int:
    if cfg.limits.kv_budget_tokens:
        return cfg.limits.kv_budget_tokens * shard.kv_bytes_per_token()
    return int(_free_memory(str(shard.device)) * cfg.limits.kv_memory_fraction)
