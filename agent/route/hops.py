"""One hop of a route: a session on a remote peer over one libp2p stream, or on the agent
that hosts the client (no stream, the same messages and checks)."""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
import trio

from agent.config import ClientConfig
from agent.model.loading import torch_dtype
from agent.model.wire import from_frame, to_frame
from agent.net.framed import SMALL_REPLY_BYTES, FramedStream, StreamGone, result_limit
from agent.policy.routing import Hop
from agent.route.health import PeerHealth
from agent.route.view import LocalForward, MeshView
from protocol import (
    FORWARD_PROTOCOL_ID,
    CloseSession,
    ErrorReply,
    LocalProtocolError,
    OpenSession,
    ProtocolError,
    Role,
    SessionOpened,
    Step,
    StepResult,
    TensorFrame,
)

# The decoder's ceiling on the client side; each answer is held to far less: what its request
# needs (FramedStream.next_event(max_frame=...)), refused at its length prefix.
CLIENT_MAX_FRAME = 1 << 30
_FLOAT_WIRE = ("float32", "float16", "bfloat16")


class HopError(Exception):
    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"peer {peer_id[-8:]}: {reason}")
        self.peer_id = peer_id
        self.reason = reason


# --- hops -----------------------------------------------------------------------------------
class RemoteHop:
    """One session on one remote peer over one libp2p stream, kept for the whole session.

    The stream runs a client-role ForwardConnection (protocol.connection): OpenSession first,
    one Step at a time, each answered by the StepResult with its number (and the shape sent)
    or an ErrorReply; anything else from the peer is a HopError. Each answer may take only
    the bytes its request needs (a StepResult: the Step's own tensor size plus a little), so
    a server claiming more is refused after the 4 bytes of its length prefix.
    """

    def __init__(self, view: MeshView, hop: Hop, cfg: ClientConfig, health: PeerHealth) -> None:
        self.view = view
        self.host = view.host
        self.peer_id, self.start, self.end = hop.peer_id, hop.start, hop.end
        self.cfg = cfg
        self.health = health
        self.framed: FramedStream | None = None
        self._step_no = 0

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        t0 = time.perf_counter()
        try:
            with trio.fail_after(self.cfg.open_timeout_s):
                if not self.view.mesh.is_connected(self.peer_id):
                    # Known from its ad but never dialled (a client that joined through
                    # one bootstrap peer, say): connect at the addresses it advertises.
                    await self.view.mesh.dial(self.view.peer_addrs(self.peer_id))
                stream = await self.host.new_stream(
                    ID.from_base58(self.peer_id), [TProtocol(FORWARD_PROTOCOL_ID)]
                )
                # No discarding on this side: a frame over the ceiling ends the stream at once.
                self.framed = FramedStream(
                    stream, max_frame=CLIENT_MAX_FRAME, role=Role.CLIENT, max_discard=0
                )
                await self.framed.send_event(
                    OpenSession(
                        model_id=model_id,
                        start=self.start,
                        end=self.end,
                        max_length=max_length,
                        dtype=self.cfg.wire_dtype,
                        batch=batch,
                    )
                )
                reply = await self.framed.next_event(max_frame=SMALL_REPLY_BYTES)
        except trio.TooSlowError:
            raise HopError(self.peer_id, "timed out opening a session") from None
        except (StreamGone, ProtocolError) as exc:
            raise HopError(self.peer_id, f"cannot open a session: {exc}") from None
        except Exception as exc:  # dial failures surface as assorted libp2p types
            raise HopError(self.peer_id, f"cannot reach peer: {exc}") from None
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"refused the session: {reply.code}: {reply.message}")
        if not isinstance(reply, SessionOpened):  # not reached: the connection checks it
            raise HopError(self.peer_id, f"unexpected reply {type(reply).__name__}")
        self.health.observe(self.peer_id, (time.perf_counter() - t0) * 1000)

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        assert self.framed is not None
        self._step_no += 1
        frame = to_frame(hidden.to(torch_dtype(self.cfg.wire_dtype)))
        t0 = time.perf_counter()
        try:
            with trio.fail_after(self.cfg.step_timeout_s):
                await self.framed.send_event(
                    Step(step=self._step_no, position=position, hidden=frame),
                    expect_shape=frame.shape,
                )
                reply = await self.framed.next_event(max_frame=result_limit(len(frame.data)))
        except trio.TooSlowError:
            raise HopError(
                self.peer_id, f"no answer within {self.cfg.step_timeout_s:g} s"
            ) from None
        except (StreamGone, ProtocolError) as exc:  # out of order or the wrong shape included
            raise HopError(self.peer_id, str(exc)) from None
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"{reply.code}: {reply.message}")
        if not isinstance(reply, StepResult):  # not reached: the connection checks it
            raise HopError(self.peer_id, "answered out of order")
        out = _received_tensor(reply.hidden)
        self.health.observe(self.peer_id, (time.perf_counter() - t0) * 1000 - reply.elapsed_ms)
        return out

    async def close(self) -> None:
        if self.framed is None:
            return
        with trio.move_on_after(1):
            with contextlib.suppress(StreamGone, LocalProtocolError):
                await self.framed.send_event(CloseSession())
        await self.framed.close()
        self.framed = None


def _received_tensor(frame: TensorFrame) -> torch.Tensor:
    """The tensor of a StepResult just decoded, on the CPU. Its bytes came off the wire into an
    object nobody else holds, so the tensor takes them as they are: no second copy per hop
    (from_frame copies, to own writable memory; nothing here writes to a hop's output)."""
    data = frame.data
    if frame.dtype not in _FLOAT_WIRE or type(data) is not bytes or not data:
        return from_frame(frame, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": the bytes are ours
        t = torch.frombuffer(data, dtype=torch_dtype(frame.dtype))
    return t.view(frame.shape)


class LocalHop:
    """A hop on the agent that hosts this client: no stream, same checks as a remote one."""

    def __init__(self, local: LocalForward, hop: Hop, self_id: str, cfg: ClientConfig) -> None:
        self.local = local
        self.peer_id, self.start, self.end = self_id, hop.start, hop.end
        self.cfg = cfg
        self.session: Any = None

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        msg = OpenSession(
            model_id=model_id,
            start=self.start,
            end=self.end,
            max_length=max_length,
            dtype=self.cfg.wire_dtype,
            batch=batch,
        )
        reply = await self.local.open(msg)
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"{reply.code}: {reply.message}")
        self.session = reply[0]

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        frame = to_frame(hidden.to(torch_dtype(self.cfg.wire_dtype)))
        reply = await self.local.step(self.session, Step(step=0, position=position, hidden=frame))
        if isinstance(reply, ErrorReply):
            raise HopError(self.peer_id, f"{reply.code}: {reply.message}")
        return from_frame(reply.hidden, device="cpu")

    async def close(self) -> None:
        if self.session is not None:
            self.local.close(self.session)
            self.session = None
