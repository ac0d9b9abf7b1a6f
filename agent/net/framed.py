"""The I/O half of the forward protocol: protocol.connection over one libp2p stream.

py-libp2p's `stream.read(n)` may return fewer than n bytes and raises StreamEOF at the end, so
this reads chunks (as many bytes as the decoder wants: the rest of the frame in progress, and
at most one max frame plus a prefix in all), feeds them to the connection and writes the
bytes its `send()` returns. Parsing, the oversize rule and the session's rules all live in
protocol/. No deadlines here: every wait is bounded by the caller (`trio.fail_after`...).
"""

from __future__ import annotations

import contextlib

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamError

from protocol import (
    DEFAULT_MAX_DISCARD,
    DecodeError,
    ForwardConnection,
    FrameDecoder,
    FrameTooLarge,
    FramingLost,
    Message,
    Role,
    encode_frame,
)

READ_CHUNK = 1 << 16
# An oversized frame's body is read and dropped (so the session can go on) up to this much;
# past it the stream is closed rather than spending bandwidth on a hostile sender.
MAX_DISCARD = DEFAULT_MAX_DISCARD


class StreamGone(Exception):
    """The peer closed or reset the stream, framing on it is lost, or it timed out."""


class FramedStream:
    """Forward-protocol messages over one stream.

    With a `role`, `conn` is that side's ForwardConnection and a conversation goes through
    `next_event()` / `send_event()`, which keep its rules. `receive()` / `send()` move single
    frames without them (on the same decoder, leaving the connection's state alone): for
    tools and tests that speak out of turn on purpose, and all a stream without a role has.

    Errors: a frame that does not decode, one over `max_frame` (its body skipped) and a
    message out of order raise their ProtocolError and leave the stream usable; StreamGone
    means it is not (closed, reset, or a frame over MAX_DISCARD too: framing is lost).
    """

    # Bytes over every framed stream in this process (the forward protocol), for /metrics.
    total_in = 0
    total_out = 0

    def __init__(
        self,
        stream: INetStream,
        *,
        max_frame: int,
        role: Role | None = None,
        max_discard: int = MAX_DISCARD,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.conn: ForwardConnection | None = None
        if role is not None:
            self.conn = ForwardConnection(role, max_frame=max_frame, max_discard=max_discard)
        self._frames = (
            self.conn.frames
            if self.conn is not None
            else FrameDecoder(max_frame, max_discard=max_discard)
        )
        self.bytes_in = 0
        self.bytes_out = 0

    # --- reading --------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        try:
            chunk = await self.stream.read(max(1, n))
        except StreamError as exc:
            raise StreamGone(f"stream closed: {type(exc).__name__}") from None
        except Exception as exc:  # muxer/connection errors surface as assorted types
            raise StreamGone(f"stream failed: {exc!r}") from None
        if not chunk:
            raise StreamGone("stream closed")
        self.bytes_in += len(chunk)
        FramedStream.total_in += len(chunk)
        return chunk

    async def next_event(self) -> Message:
        """The next message through the connection's rules (`receive()` without a role)."""
        conn = self.conn
        if conn is None:
            return await self.receive()
        while True:
            try:
                event = conn.next_event()
            except FramingLost as exc:
                raise StreamGone(str(exc)) from None
            if event is not None:
                return event
            conn.receive_data(await self._read(conn.wanted(READ_CHUNK)))

    async def receive(self) -> Message:
        """The next frame's message, no session rules applied. DecodeError / FrameTooLarge
        leave the stream usable (the bad frame was consumed); StreamGone means it is not."""
        frames = self._frames
        while True:
            try:
                msg = frames.next_message()
                if msg is not None:
                    return msg
                frames.feed(await self._read(frames.wanted(READ_CHUNK)))
            except FramingLost as exc:
                raise StreamGone(str(exc)) from None

    # --- writing --------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except Exception as exc:
            raise StreamGone(f"write failed: {exc!r}") from None
        self.bytes_out += len(data)
        FramedStream.total_out += len(data)

    async def send_event(
        self, msg: Message, *, expect_shape: tuple[int, ...] | None = None
    ) -> None:
        """Send `msg` if the connection's state allows it (LocalProtocolError if not);
        `expect_shape`: see ForwardConnection.send. Without a role: `send()`."""
        conn = self.conn
        await self.write(
            encode_frame(msg) if conn is None else conn.send(msg, expect_shape=expect_shape)
        )

    async def send(self, msg: Message) -> None:
        """One frame, no session rules applied (the connection's state is left alone)."""
        await self.write(encode_frame(msg))

    async def close(self) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(Exception):
                await self.stream.close()


__all__ = ["MAX_DISCARD", "DecodeError", "FrameTooLarge", "FramedStream", "Role", "StreamGone"]
