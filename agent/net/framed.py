"""Length-prefixed protocol messages over a libp2p stream (the I/O half of protocol.forward).

py-libp2p's `stream.read(n)` may return fewer than n bytes and raises StreamEOF at the end,
so reads go through a small buffer. Every wait has a deadline chosen by the caller.
"""

from __future__ import annotations

import contextlib

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamError

from protocol import (
    DecodeError,
    FrameTooLarge,
    Message,
    decode_message,
    encode_frame,
)
from protocol.forward import FRAME_PREFIX_LEN, read_frame_length

READ_CHUNK = 1 << 16
# An oversized frame's body is read and dropped (so the session can go on) up to this much;
# past it the stream is closed rather than spending bandwidth on a hostile sender.
MAX_DISCARD = 256 * 1024 * 1024


class StreamGone(Exception):
    """The peer closed or reset the stream, or it timed out."""


class FramedStream:
    # Bytes over every framed stream in this process (the forward protocol), for /metrics.
    total_in = 0
    total_out = 0

    def __init__(self, stream: INetStream, *, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            try:
                chunk = await self.stream.read(max(READ_CHUNK, n - len(self._buf)))
            except StreamError as exc:
                raise StreamGone(f"stream closed: {type(exc).__name__}") from None
            except Exception as exc:  # muxer/connection errors surface as assorted types
                raise StreamGone(f"stream failed: {exc!r}") from None
            if not chunk:
                raise StreamGone("stream closed")
            self.bytes_in += len(chunk)
            FramedStream.total_in += len(chunk)
            self._buf += chunk

    async def _take(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _discard(self, n: int) -> None:
        while n > 0:
            if not self._buf:
                await self._fill(1)
            k = min(n, len(self._buf))
            del self._buf[:k]
            n -= k

    async def receive(self) -> Message:
        """The next message. DecodeError / FrameTooLarge leave the stream usable (the bad
        frame was consumed); StreamGone means it is not."""
        prefix = await self._take(FRAME_PREFIX_LEN)
        try:
            length = read_frame_length(prefix, self.max_frame)
        except FrameTooLarge:
            length = int.from_bytes(prefix, "big")
            if length > MAX_DISCARD:
                raise StreamGone(f"frame of {length} bytes exceeds every limit") from None
            await self._discard(length)
            raise
        body = await self._take(length)
        return decode_message(body, max_frame=self.max_frame)

    async def send(self, msg: Message) -> None:
        data = encode_frame(msg)
        try:
            await self.stream.write(data)
        except Exception as exc:
            raise StreamGone(f"write failed: {exc!r}") from None
        self.bytes_out += len(data)
        FramedStream.total_out += len(data)

    async def close(self) -> None:
        with trio.move_on_after(1):
            with contextlib.suppress(Exception):
                await self.stream.close()


__all__ = ["DecodeError", "FrameTooLarge", "FramedStream", "StreamGone"]
