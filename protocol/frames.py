"""The forward stream's frames, incrementally: the one frame parser (FrameDecoder) and its
oversize rule. Messages and their encoding are protocol.forward's; the session's rules are
protocol.connection's."""

from __future__ import annotations

from collections import deque

from protocol.errors import FrameTooLarge
from protocol.forward import (
    DEFAULT_MAX_FRAME,
    FRAME_PREFIX_LEN,
    Message,
    decode_message,
)

DEFAULT_MAX_DISCARD = 256 * 1024 * 1024


class FramingLost(FrameTooLarge):
    """A frame over the size limit and over the discard limit too: skipping its body is not
    worth the bandwidth, so framing is lost for good and the stream should be closed."""


# A frame body ready to decode: a zero-copy slice of immutable input, or an assembled buffer.
_Body = bytes | bytearray | memoryview


def _immutable(data: bytes | bytearray | memoryview) -> bool:
    """True when slices of `data` may be kept without copying: nobody can change it later."""
    if isinstance(data, bytes):
        return True
    return isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes)


class FrameDecoder:
    """Incremental frame parser, the only one: feed() received bytes, then drain next_message().

    Oversized frames, one rule: a length prefix over `max_frame` is never buffered. When the
    claimed length is at most `max_discard`, its body is skipped as it arrives (counted, not
    kept) and next_message() raises FrameTooLarge in its place, in stream order; the frames
    after it are read as usual. Above `max_discard` (0, the default: every oversized frame) the
    decoder fails for good with FramingLost (a FrameTooLarge): raised by feed() when the frame
    is at the head of the stream, else by next_message() once the frames before it are taken;
    everything is dropped and both entry points keep raising it. Close the stream.

    A bad body raises DecodeError from next_message() and is dropped; the frames after it can
    still be read.

    Bounded: bytes are kept only for frames not yet taken, the one in progress at most its
    prefix plus `max_frame` (never allocated from a claimed length: it grows as bytes come).
    A reader that asks for `wanted()` bytes at a time and drains in between never has more
    than one max frame plus a prefix buffered. Copies: a frame that arrives inside one `bytes`
    chunk is decoded straight out of it (zero copies here); one split across chunks is copied
    once, into its own buffer, which is then decoded in place.
    """

    __slots__ = (
        "_body",
        "_error",
        "_head",
        "_max_discard",
        "_max_frame",
        "_need",
        "_ready",
        "_ready_bytes",
        "_skip",
        "_skip_report",
        "_stopped",
    )

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, max_discard: int = 0) -> None:
        if max_frame < 0 or max_discard < 0:
            raise ValueError("max_frame and max_discard must not be negative")
        self._max_frame = max_frame
        self._max_discard = max_discard
        # Complete frames not yet taken, in stream order: bodies, or the FrameTooLarge that
        # stands for a skipped one (a FramingLost is always last: nothing is read past it).
        self._ready: deque[_Body | FrameTooLarge] = deque()
        self._ready_bytes = 0  # their bytes, prefixes included
        self._head = bytearray()  # a length prefix still incomplete (0..3 bytes)
        self._need = -1  # body length of the frame in progress; -1: reading a prefix
        self._body = bytearray()  # what has arrived of that body
        self._skip = 0  # bytes of an oversized body still to drop
        self._skip_report: FrameTooLarge | None = None  # queued once the skip is done
        self._stopped = False  # a FramingLost is queued: drop whatever comes
        self._error: FramingLost | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def max_discard(self) -> int:
        return self._max_discard

    @property
    def failed(self) -> bool:
        """Framing is lost (FramingLost was raised): nothing more will be decoded."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (skipped bodies are not kept)."""
        partial = FRAME_PREFIX_LEN + len(self._body) if self._need >= 0 else len(self._head)
        return self._ready_bytes + partial

    @property
    def pending(self) -> int:
        """Complete frames (or skipped-frame reports) waiting for next_message()."""
        return len(self._ready)

    def wanted(self, chunk: int = 1 << 16) -> int:
        """How many bytes a reader should ask for next: the rest of the frame in progress (or
        of the oversized body being skipped), or `chunk` when that is less, capped so that
        what is buffered stays within one max frame plus a prefix. 0: drain next_message()
        first (or the decoder failed)."""
        if self._error is not None or self._ready or self._stopped:
            return 0
        if self._need >= 0:
            rest = self._need - len(self._body)
        elif self._skip:
            rest = self._skip
        else:
            rest = FRAME_PREFIX_LEN - len(self._head)
        room = FRAME_PREFIX_LEN + self._max_frame - self.buffered
        return max(1, min(max(chunk, rest), room))

    def _fail(self, err: FramingLost) -> FramingLost:
        self._error = err
        self._ready.clear()
        self._ready_bytes = 0
        self._head = bytearray()
        self._body = bytearray()
        self._need = -1
        self._skip = 0
        self._skip_report = None
        return err

    def _queue(self, item: _Body | FrameTooLarge, nbytes: int) -> None:
        self._ready.append(item)
        self._ready_bytes += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped:
            return
        view = memoryview(data).cast("B")
        keep = _immutable(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                pos += k
                self._skip -= k
                if not self._skip:
                    assert self._skip_report is not None
                    self._queue(self._skip_report, 0)
                    self._skip_report = None
                continue
            if self._need >= 0:  # the rest of a body split across chunks
                k = min(self._need - len(self._body), end - pos)
                self._body += view[pos : pos + k]
                pos += k
                if len(self._body) == self._need:
                    self._queue(self._body, FRAME_PREFIX_LEN + self._need)
                    self._body = bytearray()
                    self._need = -1
                continue
            if not self._head and end - pos >= FRAME_PREFIX_LEN:
                n = int.from_bytes(view[pos : pos + FRAME_PREFIX_LEN], "big")
                pos += FRAME_PREFIX_LEN
            else:
                k = min(FRAME_PREFIX_LEN - len(self._head), end - pos)
                self._head += view[pos : pos + k]
                pos += k
                if len(self._head) < FRAME_PREFIX_LEN:
                    break
                n = int.from_bytes(self._head, "big")
                self._head = bytearray()
            if n > self._max_frame:
                msg = f"frame of {n} bytes exceeds the limit of {self._max_frame}"
                if n > self._max_discard:
                    lost = FramingLost(f"{msg} and the discard limit of {self._max_discard}")
                    if not self._ready:
                        raise self._fail(lost)
                    self._queue(lost, 0)
                    self._stopped = True
                    return
                self._skip, self._skip_report = n, FrameTooLarge(msg)
                continue
            if end - pos >= n:  # the whole body is here
                body = view[pos : pos + n]
                self._queue(body if keep else bytes(body), FRAME_PREFIX_LEN + n)
                pos += n
            else:
                self._need = n
                self._body = bytearray(view[pos:end])
                pos = end

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        if not self._ready:
            return None
        item = self._ready.popleft()
        if isinstance(item, FramingLost):
            raise self._fail(item)
        if isinstance(item, FrameTooLarge):
            raise item
        self._ready_bytes -= FRAME_PREFIX_LEN + len(item)
        return decode_message(item, max_frame=self._max_frame)
