"""The forward protocol's server side: one libp2p stream, one session, until it closes.

The stream runs a server-role ForwardConnection (protocol.connection): it parses the frames
and keeps the conversation's order (an OpenSession first, Steps only in an open session, one
answer each). Every frame is paced per peer (requests/s and bytes/s) before any work, checked
by the serving part, and answered; a bad frame or a message out of order gets an ErrorReply
and the stream goes on, a peer that keeps ignoring its rate limit loses the stream, and so
does one whose frame is over every size limit. Everyone else notices nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from agent.config import LimitsConfig
from agent.net.framed import FramedStream, StreamGone
from agent.policy.peerlimits import LimitExceeded, PeerLimits
from agent.serve.admission import RequestRejected
from agent.serve.sessions import Session
from protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    OutOfOrder,
    ProtocolError,
    Role,
    SessionOpened,
    Step,
    StepResult,
)

log = logging.getLogger("shardmesh.serving")

WRITE_TIMEOUT_S = 30.0


class SessionServer(Protocol):
    """The serving part as the stream handler uses it (agent.serve.serving.Serving)."""

    limits: LimitsConfig
    peer_limits: PeerLimits

    def open_session(self, peer: str, msg: OpenSession) -> Session: ...

    def close_session(self, session: Session) -> None: ...

    async def run_step(self, session: Session | None, msg: Step) -> StepResult: ...

    def kv_free_tokens(self) -> int: ...


class StreamHandler:
    """Answers `/shardmesh/forward/...` streams for one serving part."""

    def __init__(self, serving: SessionServer) -> None:
        self.serving = serving
        self.limits = serving.limits
        self.errors_sent: dict[str, int] = {}

    async def handle_stream(self, stream: Any) -> None:
        # Its own cancel scope, so that end_sessions can stop a handler blocked on a read.
        with trio.CancelScope() as scope:
            await self._serve_stream(stream, scope)

    async def _serve_stream(self, stream: Any, scope: trio.CancelScope) -> None:
        serving = self.serving
        peer = stream.muxed_conn.peer_id.to_base58()
        framed = FramedStream(stream, max_frame=self.limits.max_frame_bytes, role=Role.SERVER)
        session: Session | None = None
        charged = 0  # bytes of this stream already charged to the peer's byte rate
        try:
            while True:
                with trio.move_on_after(self.limits.session_idle_timeout) as idle:
                    try:
                        msg = await framed.next_event()
                    except ProtocolError as exc:  # undecodable, oversized, out of order
                        # A frame that does not decode still costs the peer a request and
                        # its bytes: garbage is paced like anything else.
                        nbytes, charged = framed.bytes_in - charged, framed.bytes_in
                        step = exc.step if isinstance(exc, OutOfOrder) else None
                        if not await self._refuse_frame(
                            framed, peer, nbytes, exc.code, str(exc), step
                        ):
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
                    # The connection lets through only an OpenSession with no session open
                    # and a Step in an open one.
                    if isinstance(msg, OpenSession):
                        session = serving.open_session(peer, msg)
                        session.stream, session.handler = stream, scope
                        reply: Any = SessionOpened(
                            session_id=session.id,
                            max_length=session.max_length,
                            kv_free_tokens=serving.kv_free_tokens(),
                        )
                    elif isinstance(msg, Step):
                        reply = await serving.run_step(session, msg)
                    else:  # not reached: the connection reports anything else as OutOfOrder
                        raise RequestRejected("bad_request", f"unexpected {type(msg).__name__}")
                except RequestRejected as exc:
                    step = msg.step if isinstance(msg, Step) else None
                    if not await self._refuse(framed, peer, exc.code, str(exc), step):
                        return
                    continue
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await framed.send_event(reply)
        except (StreamGone, trio.TooSlowError) as exc:
            log.debug("stream from %s ended: %s", peer, exc)
        finally:
            if session is not None:
                serving.close_session(session)
            await framed.close()

    async def _refuse_frame(
        self,
        framed: FramedStream,
        peer: str,
        nbytes: int,
        code: str,
        message: str,
        step: int | None,
    ) -> bool:
        """Answer an undecodable frame or a message out of order after pacing it; False: drop
        the peer's stream."""
        try:
            await self._pace(peer, nbytes)
        except RequestRejected as exc:
            code, message = exc.code, str(exc)
        return await self._refuse(framed, peer, code, message, step)

    async def _refuse(
        self, framed: FramedStream, peer: str, code: str, message: str, step: int | None
    ) -> bool:
        """Send the error reply; False when the peer keeps ignoring its rate limit and its
        stream is to be dropped."""
        await self._reply_error(framed, code, message, step)
        if code == "rate_limited" and self.serving.peer_limits.should_drop(peer):
            log.info("%s ignores rate limiting; dropping its stream", peer)
            return False
        return True

    async def _pace(self, peer: str, nbytes: int) -> None:
        """Per-peer requests/s and bytes/s: wait for the peer's turn, or refuse the request
        when that wait would be too long."""
        try:
            wait = self.serving.peer_limits.admit(peer, nbytes)
        except LimitExceeded as exc:
            raise RequestRejected(exc.code, str(exc)) from None
        if wait > 0:
            await trio.sleep(wait)

    async def _reply_error(
        self, framed: FramedStream, code: str, message: str, step: int | None
    ) -> None:
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1
        with trio.fail_after(WRITE_TIMEOUT_S):
            await framed.send_event(ErrorReply(code=code, message=message[:1000], step=step))
