"""Serving a span of model blocks to the mesh: load, sessions, steps, unload.

Imported only by agents started with `--model` (it imports torch through agent.model).
Requests are checked by agent.serve.admission before any work; the stream side lives in
agent.serve.handler. The serving part knows its host only through `ServingHost`, so it
never imports the daemon.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import trio

from agent.config import ServeConfig
from agent.errors import ShardmeshError
from agent.model.modelinfo import ModelError, ModelInfo, read_model_info
from agent.policy.peerlimits import LimitExceeded, PeerLimits
from agent.serve import memory
from agent.serve.admission import (
    RequestRejected,
    ServingState,
    SessionShape,
    check_open,
    check_step,
)
from agent.serve.batcher import StepBatcher
from agent.serve.batchplan import BatchBounds
from agent.serve.handler import WRITE_TIMEOUT_S, StreamHandler
from agent.serve.host import ServingHost
from agent.serve.placing import auto_place
from agent.serve.sessions import LOCAL_PEER, Session
from agent.serve.stats import STEP_SECONDS
from protocol import FORWARD_PROTOCOL_ID, OpenSession, Step, StepResult

if TYPE_CHECKING:
    from agent.model.blocks import ShardModel

log = logging.getLogger("shardmesh.serving")


class Serving:
    """The serving part of one agent; created before the mesh starts, started inside it."""

    protocol_id = FORWARD_PROTOCOL_ID

    def __init__(self, cfg: ServeConfig, info: ModelInfo) -> None:
        self.cfg = cfg
        self.limits = cfg.limits
        self.info = info
        self.shard: ShardModel | None = None
        self.span: tuple[int, int] = (0, 0)  # meaningful once chosen_span() is not None
        self._span_chosen = False
        self.throughput = 0.0
        self.kv_budget_bytes = 0
        self.sessions: dict[str, Session] = {}
        self._reserved = 0
        self._compute = trio.CapacityLimiter(1)  # one forward at a time on the device
        # Steps of concurrent sessions share forwards (continuous batching).
        self.batcher = StepBatcher(
            BatchBounds(
                max_rows=cfg.limits.max_batch_rows,
                max_tokens=cfg.limits.max_batch_tokens,
                prefill_chunk=cfg.limits.batch_prefill_chunk,
            ),
            self._compute,
            max_wait_s=cfg.limits.max_batch_wait,
        )
        self.batcher.attach(lambda: self.shard)
        self.tokens_served = 0
        self.peer_limits = PeerLimits(cfg.limits)  # one peer over a limit: only it notices
        self.handler = StreamHandler(self)
        # What the serving part is doing on its own ("choosing blocks", "loading blocks
        # 0:4"), read by the agent's lifecycle for its reason line; "" when settled.
        self.activity = ""
        # Set while the owner needs the machine or the agent is stopping: no new sessions.
        # Written only through set_accepting (the lifecycle's drain).
        self.draining = False

    # --- set-up ---------------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: ServeConfig) -> Serving:
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

    def choose_span(self, span: tuple[int, int]) -> None:
        self.span, self._span_chosen = span, True

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def n_blocks(self) -> int:
        return self.info.n_blocks

    def set_accepting(self, accepting: bool) -> None:
        """Admission: whether new sessions are taken. Called only by the agent's lifecycle
        (agent.daemon.lifecycle), the one owner of the agent's state."""
        self.draining = not accepting

    async def start(self, host: ServingHost, nursery: trio.Nursery) -> None:
        """Choose the span, load it, measure it, and open the forward protocol."""
        await self.load(host)
        self.open_protocol(host, nursery)

    def open_protocol(self, host: ServingHost, nursery: trio.Nursery) -> None:
        """Answer the forward protocol (requests get "busy" while no blocks are loaded)."""
        host.set_stream_handler(FORWARD_PROTOCOL_ID, self.handler.handle_stream)
        nursery.start_soon(self.batcher.loop)
        nursery.start_soon(self._log_load)

    async def load(self, host: ServingHost) -> None:
        """Choose the span (again, with auto placement: the mesh may have changed while we
        were away), load its blocks, measure them and size the KV budget."""
        device = memory.pick_device(self.cfg.device, host.devices())
        span = self.cfg.block_range()
        if span is None:
            self.activity = "choosing blocks"
            span = await auto_place(host, self.cfg, self.info, device, self._announce_choice)
        self.choose_span(span)
        self.activity = f"loading blocks {span[0]}:{span[1]}"
        log.info("loading blocks %d:%d of %s on %s", *span, self.info.name, device)
        t0 = time.monotonic()
        try:
            # Abandoned, not waited for, when the agent stops meanwhile (a signal while the
            # blocks load): the thread cannot be interrupted, and the process is exiting.
            # (The ignores: trio_typing's stale stubs predate abandon_on_cancel.)
            shard = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                self._load, device, abandon_on_cancel=True
            )
            self.shard = shard
            self.throughput = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                shard.measure_throughput, abandon_on_cancel=True
            )
        finally:
            self.activity = ""
        self.kv_budget_bytes = memory.kv_budget(self.shard, self.limits)
        self.peer_limits.set_kv_budget(self.kv_budget_bytes, self.shard.kv_bytes_per_token())
        log.info(
            "loaded in %.1f s; throughput %.0f blocks*tokens/s; KV budget %d tokens",
            time.monotonic() - t0,
            self.throughput,
            self.kv_free_tokens(),
        )

    async def unload(self) -> None:
        """End every session (clients fail over and replay elsewhere), then free the blocks'
        memory. Remote sessions end by resetting their stream; the stream handler closes
        them once any forward in flight has finished."""
        await self.end_sessions()
        async with self._compute:  # no forward may be running on the blocks we drop
            shard, self.shard = self.shard, None
            self._span_chosen = False
            self.kv_budget_bytes = 0
            self.throughput = 0.0
            device = str(shard.device) if shard is not None else "cpu"
            del shard
            await trio.to_thread.run_sync(memory.release_memory, device)
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

    async def _announce_choice(self, host: ServingHost, span: tuple[int, int]) -> None:
        self.choose_span(span)
        await host.publish_ad("joining")

    def _load(self, device: str) -> ShardModel:
        """In a worker thread: import model code and build the span's blocks under the one
        lock every model load holds (transformers' lazy imports are not thread-safe)."""
        from agent.model.preload import LOAD_LOCK, import_model_code

        assert self.cfg.model is not None
        with LOAD_LOCK:
            import_model_code(self.info.model_type)
            from agent.model.blocks import ShardModel

            try:
                return ShardModel.load(
                    self.cfg.model, self.span[0], self.span[1], dtype=self.cfg.dtype, device=device
                )
            except ModelError as exc:
                raise ShardmeshError(str(exc)) from None

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

    @property
    def errors_sent(self) -> dict[str, int]:
        """Error replies sent, by code."""
        return self.handler.errors_sent

    def active_sessions(self) -> int:
        return len(self.sessions)

    def state(self) -> ServingState:
        return ServingState(
            loaded=self.shard is not None,
            draining=self.draining,
            model_id=self.model_id,
            span=self.span,
            open_sessions=len(self.sessions),
            reserved_bytes=self._reserved,
            kv_budget_bytes=self.kv_budget_bytes,
            kv_free_tokens=self.kv_free_tokens(),
        )

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "model_name": self.model_name,
            "n_blocks": self.n_blocks,
            "span": list(self.span) if self._span_chosen else None,
            "loaded": self.shard is not None,
            "sessions": len(self.sessions),
            "batch": {
                "last_rows": self.batcher.last_rows,
                "waiting": self.batcher.waiting,
                "forwards": self.batcher.forwards,
                "rows": self.batcher.rows_total,
                "mean_rows": round(self.batcher.rows_total / self.batcher.forwards, 2)
                if self.batcher.forwards
                else 0.0,
            },
            "throughput": round(self.throughput, 1),
            "kv_free_tokens": self.kv_free_tokens(),
            "tokens_served": self.tokens_served,
            "dtype": self.cfg.dtype,
            "draining": self.draining,
            "device": str(self.shard.device) if self.shard else None,
            "forward_errors": dict(self.errors_sent),
            "peer_limits": self.peer_limits.status(),
        }

    # --- sessions and steps ---------------------------------------------------------------
    def _page_tokens(self, tokens: int, max_length: int) -> int:
        """Tokens reserved for a session holding `tokens`: whole pages, within max_length."""
        page = self.limits.kv_page_tokens
        return min(max_length, -(-max(1, tokens) // page) * page)

    def open_session(self, peer: str, msg: OpenSession) -> Session:
        # KV memory is reserved a page at a time as the session grows (_grow_reservation):
        # many short sessions fit where their max_length would not.
        first = self._page_tokens(1, msg.max_length)
        need = self._kv_bytes(msg.start, msg.end, first * msg.batch) if self.shard else 0
        check_open(msg, self.state(), self.limits, need)
        assert self.shard is not None
        if peer != LOCAL_PEER:
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
            reserved_tokens=first,
            opened=time.monotonic(),
        )
        self._reserved += need
        self.sessions[session.id] = session
        log.debug("session %s opened by %s for blocks %d:%d", session.id, peer, msg.start, msg.end)
        return session

    def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.batcher.forget(session.cache)  # no next step to wait for
            self._reserved -= session.reserved_bytes
            if session.peer != LOCAL_PEER:
                self.peer_limits.close_session(session.peer, session.reserved_bytes)
            log.debug("session %s closed after %d steps", session.id, session.steps)

    async def run_step(self, session: Session | None, msg: Step) -> StepResult:
        from agent.model.wire import WireError, from_frame, to_frame

        if session is None:
            raise RequestRejected("no_session", "open a session before sending steps")
        if session.id not in self.sessions or self.shard is None:
            raise RequestRejected("no_session", "the session was ended: blocks unloaded")
        shape = SessionShape(session.batch, session.dtype, session.max_length, session.cache.length)
        check_step(msg, shape, self.info.hidden_size)
        self._grow_reservation(session, session.cache.length + msg.hidden.shape[1])
        shard = self.shard
        try:
            hidden = from_frame(msg.hidden, device=shard.device)
        except WireError as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        t0 = time.perf_counter()
        try:
            out = await self.batcher.run(
                session.cache, hidden, msg.position, (session.start, session.end)
            )
        except ValueError as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        except Exception as exc:  # a bug or device failure: report it, keep serving
            log.exception("forward failed")
            raise RequestRejected("internal", f"forward failed: {type(exc).__name__}") from None
        out = out.to(hidden.dtype)
        session.steps += 1
        t = msg.hidden
        self.tokens_served += t.shape[0] * t.shape[1]
        elapsed = (time.perf_counter() - t0) * 1000
        STEP_SECONDS.observe(elapsed / 1000)
        return StepResult(step=msg.step, hidden=to_frame(out), elapsed_ms=elapsed)

    def _grow_reservation(self, session: Session, tokens: int) -> None:
        """Reserve the KV pages a session needs to hold `tokens`, or refuse the step (the
        client fails over) when the agent's budget or the peer's share has no room."""
        want = self._page_tokens(tokens, session.max_length)
        if want <= session.reserved_tokens:
            return
        extra = self._kv_bytes(session.start, session.end, (want - session.reserved_tokens))
        extra *= session.batch
        if self._reserved + extra > self.kv_budget_bytes:
            raise RequestRejected(
                "kv_budget",
                f"no KV-cache memory for {tokens} tokens of this session "
                f"({self.kv_free_tokens()} tokens free)",
            )
        if session.peer != LOCAL_PEER:
            try:
                self.peer_limits.grow_session(session.peer, extra)
            except LimitExceeded as exc:
                raise RequestRejected(exc.code, str(exc)) from None
        self._reserved += extra
        session.reserved_bytes += extra
        session.reserved_tokens = want

    async def _log_load(self) -> None:
        """Idle sessions are closed by their stream handler (idle timeout); log the load."""
        while True:
            await trio.sleep(30)
            if self.sessions:
                log.info(
                    "%d sessions open, %d KV tokens free", len(self.sessions), self.kv_free_tokens()
                )
