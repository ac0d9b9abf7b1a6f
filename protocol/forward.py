"""The per-session forward stream protocol, sans-I/O.

One libp2p stream (FORWARD_PROTOCOL_ID) carries one inference session:

    client -> server: OpenSession, then Step* , then CloseSession (or the stream closes)
    server -> client: SessionOpened, then one StepResult (or ErrorReply) per Step

Every message is a frame: a 4-byte big-endian body length, then a msgpack map whose key "t"
names the type. Unknown keys are ignored so a minor version may add fields.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.codec import (
    get_float,
    get_int,
    get_map,
    get_str,
    pack,
    unpack_map,
)
from protocol.errors import DecodeError, FrameTooLarge
from protocol.tensors import WIRE_DTYPES, TensorFrame, tensor_from_wire

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# How large an oversized frame a live session skips (reporting it) rather than giving up on.
FRAME_PREFIX_LEN = 4
# A 4-byte prefix cannot describe more; larger limits would be meaningless.
_MAX_PREFIX_VALUE = (1 << 32) - 1

MAX_MODEL_ID_LEN = 256
MAX_SESSION_ID_LEN = 128
MAX_ERROR_CODE_LEN = 64
MAX_ERROR_MESSAGE_LEN = 4096
MAX_BLOCK_INDEX = 4096  # = protocol.ads.MAX_BLOCKS: no span reaches past the deepest model
MAX_SESSION_TOKENS = 1 << 24
MAX_BATCH = 1 << 16
MAX_STEP = (1 << 63) - 1
MAX_ELAPSED_MS = 1e9

ERROR_CODES = frozenset(
    {
        "bad_request",
        "wrong_model",
        "span_not_served",
        "too_many_sessions",
        "too_long",
        "kv_budget",
        "too_large",
        "wrong_shape",
        "wrong_dtype",
        "no_session",
        "position",
        "internal",
        "busy",
        "rate_limited",
        "draining",
    }
)


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Client asks to run blocks [start, end) of `model_id` for up to `max_length` tokens."""

    model_id: str
    start: int
    end: int
    max_length: int
    dtype: str
    batch: int


@dataclass(frozen=True, slots=True)
class Step:
    """q new tokens' hidden states [batch, q, hidden]; `position` = tokens already cached."""

    step: int
    position: int
    hidden: TensorFrame


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Client is done; the server frees the session's KV cache."""


@dataclass(frozen=True, slots=True)
class SessionOpened:
    session_id: str
    max_length: int
    kv_free_tokens: int


@dataclass(frozen=True, slots=True)
class StepResult:
    """Output hidden states of the span for the Step with the same `step` number."""

    step: int
    hidden: TensorFrame
    elapsed_ms: float


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """`code` is one of ERROR_CODES (a newer peer may send others); `step` None = session-level."""

    code: str
    message: str
    step: int | None


Message = OpenSession | Step | CloseSession | SessionOpened | StepResult | ErrorReply


# --- encoding -----------------------------------------------------------------------------------

_PREFIX = struct.Struct(">I")
# msgpack of an empty bin with use_bin_type=True; replaced by the real header when framing.
_EMPTY_BIN = b"\xc4\x00"


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n <= _MAX_PREFIX_VALUE:
        return b"\xc6" + n.to_bytes(4, "big")
    raise FrameTooLarge(f"tensor of {n} bytes cannot be framed")


def _frame_with_tensor(fields: dict[str, Any], t: TensorFrame) -> bytes:
    # Pack everything with an empty "data" placed last, then splice the real bin header and the
    # tensor bytes in: the payload is copied exactly once, into the returned frame.
    fields["hidden"] = {"dtype": t.dtype, "shape": list(t.shape), "data": b""}
    head = pack(fields)
    data = t.data
    bin_hdr = _bin_header(len(data))
    body_len = len(head) - len(_EMPTY_BIN) + len(bin_hdr) + len(data)
    if body_len > _MAX_PREFIX_VALUE:
        raise FrameTooLarge(f"frame body of {body_len} bytes cannot be framed")
    return b"".join((_PREFIX.pack(body_len), memoryview(head)[: -len(_EMPTY_BIN)], bin_hdr, data))


def _frame(fields: dict[str, Any]) -> bytes:
    body = pack(fields)
    if len(body) > _MAX_PREFIX_VALUE:
        raise FrameTooLarge(f"frame body of {len(body)} bytes cannot be framed")
    return _PREFIX.pack(len(body)) + body


def encode_frame(msg: Message) -> bytes:
    """The complete frame for `msg`: length prefix plus msgpack body."""
    # Ordered by frequency: Step/StepResult run once per token per hop.
    if type(msg) is Step:
        return _frame_with_tensor(
            {"t": "step", "step": msg.step, "position": msg.position}, msg.hidden
        )
    if type(msg) is StepResult:
        return _frame_with_tensor(
            {"t": "result", "step": msg.step, "elapsed_ms": float(msg.elapsed_ms)}, msg.hidden
        )
    if type(msg) is OpenSession:
        return _frame(
            {
                "t": "open",
                "model_id": msg.model_id,
                "start": msg.start,
                "end": msg.end,
                "max_length": msg.max_length,
                "dtype": msg.dtype,
                "batch": msg.batch,
            }
        )
    if type(msg) is SessionOpened:
        return _frame(
            {
                "t": "opened",
                "session_id": msg.session_id,
                "max_length": msg.max_length,
                "kv_free_tokens": msg.kv_free_tokens,
            }
        )
    if type(msg) is ErrorReply:
        # Truncate rather than fail: an error report must always be sendable.
        return _frame(
            {
                "t": "error",
                "code": msg.code[:MAX_ERROR_CODE_LEN],
                "message": msg.message[:MAX_ERROR_MESSAGE_LEN],
                "step": msg.step,
            }
        )
    if type(msg) is CloseSession:
        return _frame({"t": "close"})
    raise TypeError(f"not a forward protocol message: {type(msg).__name__}")


# --- decoding -----------------------------------------------------------------------------------


def _decode_open(m: dict[str, Any], max_frame: int) -> OpenSession:
    start = get_int(m, "start", min=0, max=MAX_BLOCK_INDEX - 1)
    end = get_int(m, "end", min=start + 1, max=MAX_BLOCK_INDEX)
    dtype = get_str(m, "dtype", max_len=16)
    if dtype not in WIRE_DTYPES:
        raise DecodeError(f"field 'dtype': unknown dtype {dtype!r}")
    return OpenSession(
        model_id=get_str(m, "model_id", min_len=1, max_len=MAX_MODEL_ID_LEN),
        start=start,
        end=end,
        max_length=get_int(m, "max_length", min=1, max=MAX_SESSION_TOKENS),
        dtype=dtype,
        batch=get_int(m, "batch", min=1, max=MAX_BATCH),
    )


def _decode_step(m: dict[str, Any], max_frame: int) -> Step:
    return Step(
        step=get_int(m, "step", min=0, max=MAX_STEP),
        position=get_int(m, "position", min=0, max=MAX_SESSION_TOKENS),
        hidden=tensor_from_wire(get_map(m, "hidden"), max_bytes=max_frame),
    )


def _decode_close(m: dict[str, Any], max_frame: int) -> CloseSession:
    return CloseSession()


def _decode_opened(m: dict[str, Any], max_frame: int) -> SessionOpened:
    return SessionOpened(
        session_id=get_str(m, "session_id", min_len=1, max_len=MAX_SESSION_ID_LEN),
        max_length=get_int(m, "max_length", min=1, max=MAX_SESSION_TOKENS),
        kv_free_tokens=get_int(m, "kv_free_tokens", min=0, max=MAX_STEP),
    )


def _decode_result(m: dict[str, Any], max_frame: int) -> StepResult:
    return StepResult(
        step=get_int(m, "step", min=0, max=MAX_STEP),
        hidden=tensor_from_wire(get_map(m, "hidden"), max_bytes=max_frame),
        elapsed_ms=get_float(m, "elapsed_ms", min=0.0, max=MAX_ELAPSED_MS),
    )


def _decode_error(m: dict[str, Any], max_frame: int) -> ErrorReply:
    step = m.get("step")
    return ErrorReply(
        code=get_str(m, "code", min_len=1, max_len=MAX_ERROR_CODE_LEN),
        message=get_str(m, "message", max_len=MAX_ERROR_MESSAGE_LEN),
        step=None if step is None else get_int(m, "step", min=0, max=MAX_STEP),
    )


_DECODERS: dict[str, Callable[[dict[str, Any], int], Message]] = {
    "step": _decode_step,
    "result": _decode_result,
    "open": _decode_open,
    "opened": _decode_opened,
    "error": _decode_error,
    "close": _decode_close,
}


def decode_message(body: bytes | bytearray | memoryview, *, max_frame: int) -> Message:
    """Decode one frame body (without its length prefix) into a message."""
    m = unpack_map(body, max_size=max_frame)
    tag = get_str(m, "t", max_len=16)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise DecodeError(f"unknown message type {tag!r}")
    return decoder(m, max_frame)


def read_frame_length(prefix4: bytes | bytearray | memoryview, max_frame: int) -> int:
    """Body length from a 4-byte prefix; FrameTooLarge if above `max_frame`."""
    if len(prefix4) != FRAME_PREFIX_LEN:
        raise DecodeError(f"frame prefix must be {FRAME_PREFIX_LEN} bytes, got {len(prefix4)}")
    n = int.from_bytes(prefix4, "big")
    if n > max_frame:
        raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {max_frame}")
    return n
