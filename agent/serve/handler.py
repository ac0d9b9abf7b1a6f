"""The forward protocol's server side: one libp2p stream, one session, until it closes.

The stream runs a server-role ForwardConnection (protocol.connection): it parses the frames
and keeps the conversation's order (an OpenSession first, Steps only in an open session, one
answer each). A peer holds at most `per_peer_streams` forward streams: one more is reset at
once. Every byte is charged to the peer's byte rate as it is read (a peer over it waits
before more of its frame is read), every frame to its request rate before any work; then it
is checked by the serving part and answered. A bad frame or a message out of order gets an
ErrorReply and the stream goes on, a peer that keeps ignoring its rate limit loses the
stream, and so does one whose frame is over every size limit. The stream closes
`session_idle_timeout` after its last useful message (the OpenSession that opened its session,
or a step that ran): garbage, errors and refused requests do not keep it open. Everyone else
notices nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Protocol

import trio

from agent.config import LimitsConfig
from agent.net.framed import READ_CHUNK, FramedStream, StreamGone
from agent.net.upstream import trust
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
        peer = stream.muxed_conn.peer_id.to_base58()
        peer_limits = self.serving.peer_limits
        try:
            peer_limits.open_stream(peer)
        except LimitExceeded as exc:
            log.debug("%s: %s; resetting the new one", peer, exc)
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()
            return
        try:
            # Its own cancel scope, so that end_sessions can stop a handler blocked on a read.
            with trio.CancelScope() as scope:
                await self._serve_stream(stream, peer, scope)
        finally:
            peer_limits.close_stream(peer)

    async def _serve_stream(self, stream: Any, peer: str, scope: trio.CancelScope) -> None:
        serving = self.serving
        limits = self.limits
        framed = FramedStream(
            stream,
            max_frame=limits.max_frame_bytes,
            role=Role.SERVER,
            on_read=functools.partial(self._charge_bytes, peer),
            # One read charges at most a second of the peer's bytes (and one chunk).
            read_max=max(1024, min(READ_CHUNK, int(limits.per_peer_bytes_per_s))),
        )
        session: Session | None = None
        idle_s = limits.session_idle_timeout
        deadline = trio.current_time() + idle_s  # from the last useful message
        try:
            while True:
                if trio.current_time() >= deadline:  # frames already buffered included
                    log.info("session of %s idle too long; closing", peer)
                    return
                with trio.move_on_at(deadline) as idle:
                    try:
                        msg = await framed.next_event()
                    except ProtocolError as exc:  # undecodable, oversized, out of order
                        # A frame that does not decode still costs the peer a request (its
                        # bytes were charged as they came): garbage is paced like anything
                        # else, and does not move the idle deadline.
                        step = exc.step if isinstance(exc, OutOfOrder) else None
                        if not await self._refuse_frame(framed, peer, exc.code, str(exc), step):
                            return
                        continue
                if idle.cancelled_caught:
                    log.info("session of %s idle too long; closing", peer)
                    return
                if isinstance(msg, CloseSession):
                    return
                try:
                    await self._pace(peer)
                    # The connection lets through only an OpenSession with no session open
                    # and a Step in an open one.
                    if isinstance(msg, OpenSession):
                        session = serving.open_session(peer, msg)
                        session.stream, session.handler = stream, scope
                        # A session admitted: the peer is no stranger to the yamux guard.
                        trust(stream.muxed_conn)
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
                deadline = trio.current_time() + idle_s  # a session opened, or a step ran
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
        code: str,
        message: str,
        step: int | None,
    ) -> bool:
        """Answer an undecodable frame or a message out of order after pacing it; False: drop
        the peer's stream."""
        try:
            await self._pace(peer)
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

    async def _pace(self, peer: str) -> None:
        """Per-peer requests/s (and bytes/s debt): wait for the peer's turn, or refuse the
        request when that wait would be too long. Its bytes were charged as they came."""
        try:
            wait = self.serving.peer_limits.admit(peer, 0)
        except LimitExceeded as exc:
            raise RequestRejected(exc.code, str(exc)) from None
        if wait > 0:
            await trio.sleep(wait)

    async def _charge_bytes(self, peer: str, nbytes: int) -> None:
        """`nbytes` just read from `peer`: charged to its byte rate; when it is over that, the
        stream waits before reading more (its frame in progress included)."""
        wait = self.serving.peer_limits.charge_bytes(peer, nbytes)
        if wait > 0:
            await trio.sleep(wait)

    async def _reply_error(
        self, framed: FramedStream, code: str, message: str, step: int | None
    ) -> None:
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1
        with trio.fail_after(WRITE_TIMEOUT_S):
            await framed.send_event(ErrorReply(code=code, message=message[:1000], step=step))
