"""The I/O half of the forward protocol: protocol.connection over one libp2p stream.

py-libp2p's `stream.read(n)` may return fewer than n bytes and raises StreamEOF at the end, so
this reads chunks (as many bytes as the decoder wants: the rest of the frame in progress, and
at most one max frame plus a prefix in all), feeds them to the connection and writes the
bytes its `send()` returns. Parsing, the oversize rule and the session's rules all live in
protocol/. No deadlines here: every wait is bounded by the caller (`trio.fail_after`...).

Two hooks for hostile peers: `on_read` is awaited with each chunk's size as it arrives, before
anything more is read (the server charges the bytes to the peer's byte rate there, and waits
when it is over it), and a client awaiting an answer names the most bytes that answer may
take (`next_event(max_frame=...)`, from `result_limit` for a Step): the frame's 4-byte prefix
is read alone and checked first, so an oversized answer costs 4 bytes, not a buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

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
    ProtocolError,
    Role,
    encode_frame,
    read_frame_length,
)
from protocol.forward import (
    FRAME_PREFIX_LEN,
    MAX_ERROR_CODE_LEN,
    MAX_ERROR_MESSAGE_LEN,
    MAX_SESSION_ID_LEN,
)

READ_CHUNK = 1 << 16
# An oversized frame's body is read and dropped (so the session can go on) up to this much;
# past it the stream is closed rather than spending bandwidth on a hostile sender.
MAX_DISCARD = DEFAULT_MAX_DISCARD

# The largest answer without a tensor (a SessionOpened, or an ErrorReply at its decoder's
# limits, up to 4 UTF-8 bytes a character), and what a StepResult carries besides its
# tensor's bytes (tag, step, elapsed_ms, dtype, a shape of up to 4 dims, bin header).
SMALL_REPLY_BYTES = 4 * (MAX_ERROR_CODE_LEN + MAX_ERROR_MESSAGE_LEN + MAX_SESSION_ID_LEN) + 256
RESULT_OVERHEAD = 256


def result_limit(tensor_bytes: int) -> int:
    """The most bytes the answer to a Step may take when its StepResult carries a tensor of
    `tensor_bytes` (the shape and wire dtype of the Step's own): that, or an ErrorReply."""
    return max(SMALL_REPLY_BYTES, tensor_bytes + RESULT_OVERHEAD)


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
        on_read: Callable[[int], Awaitable[None]] | None = None,
        read_max: int | None = None,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        # Awaited with each chunk's size as it arrives, before anything more is read.
        self.on_read = on_read
        # The most bytes one read asks for (None: what the decoder wants); keeps what one
        # read charges to on_read small.
        self.read_max = read_max
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
        if self.read_max is not None:
            n = min(n, self.read_max)
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
        if self.on_read is not None:
            await self.on_read(len(chunk))  # before anything more is read
        return chunk

    async def next_event(self, *, max_frame: int | None = None) -> Message:
        """The next message through the connection's rules (`receive()` without a role).

        `max_frame`: the most bytes the next frame's body may claim (a client awaiting an
        answer: `result_limit` for a Step, SMALL_REPLY_BYTES for an OpenSession). Its prefix
        is read alone and checked before anything else; one claiming more, or bytes that came
        unasked before it, end the stream (StreamGone) with none of its body read."""
        conn = self.conn
        if conn is None:
            return await self.receive()
        if max_frame is not None:
            await self._bounded_prefix(conn, max_frame)
        while True:
            try:
                event = conn.next_event()
            except FramingLost as exc:
                raise StreamGone(str(exc)) from None
            if event is not None:
                return event
            conn.receive_data(await self._read(conn.wanted(READ_CHUNK)))

    async def _bounded_prefix(self, conn: ForwardConnection, max_frame: int) -> None:
        """Read the next frame's prefix alone and refuse a claim over `max_frame`."""
        if conn.buffered or conn.frames.pending or conn.frames.failed:
            # Only answers come, one per request, and the last one was taken whole: anything
            # already here came unasked, and its claimed length was never checked.
            raise StreamGone("the peer sent bytes that answer nothing")
        head = b""
        while len(head) < FRAME_PREFIX_LEN:
            head += await self._read(FRAME_PREFIX_LEN - len(head))
        try:
            read_frame_length(head, max_frame)
        except ProtocolError as exc:
            raise StreamGone(f"answer refused at its prefix: {exc}") from None
        conn.receive_data(head)

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


__all__ = [
    "MAX_DISCARD",
    "RESULT_OVERHEAD",
    "SMALL_REPLY_BYTES",
    "DecodeError",
    "FrameTooLarge",
    "FramedStream",
    "Role",
    "StreamGone",
    "result_limit",
]
