"""The forward stream protocol: messages, framing and the incremental decoder."""

from __future__ import annotations

import contextlib
import random
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import pack
from protocol.errors import DecodeError, FrameTooLarge, ProtocolError
from protocol.forward import (
    DEFAULT_MAX_FRAME,
    ERROR_CODES,
    MAX_ERROR_MESSAGE_LEN,
    CloseSession,
    ErrorReply,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    decode_message,
    encode_frame,
    read_frame_length,
)
from protocol.frames import (
    FrameDecoder,
)
from protocol.tensors import TensorFrame


def hidden(n: int = 8, dtype: str = "float32") -> TensorFrame:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}[dtype]
    return TensorFrame(dtype, (1, 1, n), bytes(i % 256 for i in range(n * itemsize)))


MESSAGES: list[Message] = [
    OpenSession(
        model_id="tiny-llama@ab12cd", start=0, end=4, max_length=128, dtype="float32", batch=1
    ),
    Step(step=0, position=0, hidden=TensorFrame("float32", (1, 5, 8), b"\x07" * 160)),
    Step(step=1, position=5, hidden=hidden(8, "bfloat16")),
    CloseSession(),
    SessionOpened(session_id="s-1", max_length=128, kv_free_tokens=4096),
    StepResult(step=1, hidden=hidden(8, "float16"), elapsed_ms=0.25),
    ErrorReply(code="kv_budget", message="no room for 128 tokens", step=None),
    ErrorReply(code="position", message="expected position 6", step=7),
]


def body_of(frame: bytes) -> bytes:
    n = read_frame_length(frame[:4], DEFAULT_MAX_FRAME)
    assert len(frame) == 4 + n
    return frame[4:]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frame = encode_frame(msg)
    assert decode_message(body_of(frame), max_frame=DEFAULT_MAX_FRAME) == msg
    dec = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    dec.feed(frame)
    assert dec.next_message() == msg
    assert dec.next_message() is None and dec.buffered == 0


def test_error_codes() -> None:
    assert {"bad_request", "kv_budget", "no_session", "position", "internal"} <= ERROR_CODES
    assert len(ERROR_CODES) == 15


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 70000])
def test_tensor_frame_is_canonical_msgpack(n: int) -> None:
    # The spliced fast encoding must equal what plain msgpack produces, across bin8/16/32.
    t = TensorFrame("int32", (n // 4,), b"\x05" * (n - n % 4))
    for msg, fields in [
        (Step(3, 9, t), {"t": "step", "step": 3, "position": 9}),
        (StepResult(3, t, 1.0), {"t": "result", "step": 3, "elapsed_ms": 1.0}),
    ]:
        fields["hidden"] = {"dtype": "int32", "shape": [n // 4], "data": t.data}
        expected = pack(fields)
        frame = encode_frame(msg)
        assert frame == struct.pack(">I", len(expected)) + expected
        assert decode_message(frame[4:], max_frame=1 << 20) == msg


def test_error_reply_truncates_long_message() -> None:
    frame = encode_frame(ErrorReply("internal", "x" * (MAX_ERROR_MESSAGE_LEN + 50), 1))
    got = decode_message(body_of(frame), max_frame=1 << 20)
    assert isinstance(got, ErrorReply) and len(got.message) == MAX_ERROR_MESSAGE_LEN


def test_unknown_error_code_and_extra_keys_pass() -> None:
    # A newer minor version may add codes and fields; the client still sees the error.
    body = pack({"t": "error", "code": "new_thing", "message": "m", "step": None, "extra": [1]})
    assert decode_message(body, max_frame=1024) == ErrorReply("new_thing", "m", None)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        encode_frame("step")  # type: ignore[arg-type]


# --- FrameDecoder -----------------------------------------------------------------------------

STREAM = b"".join(encode_frame(m) for m in MESSAGES)


def drain(dec: FrameDecoder) -> list[Message]:
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    return out


def test_decoder_byte_by_byte() -> None:
    dec = FrameDecoder(max_frame=1 << 20)
    got: list[Message] = []
    for i in range(len(STREAM)):
        dec.feed(STREAM[i : i + 1])
        got += drain(dec)
    assert got == MESSAGES and dec.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_decoder_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    data = STREAM * 3
    dec = FrameDecoder(max_frame=1 << 20)
    got: list[Message] = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 300)
        dec.feed(memoryview(data)[pos : pos + n])
        pos += n
        got += drain(dec)
    assert got == MESSAGES * 3


def test_decoder_incomplete_returns_none() -> None:
    frame = encode_frame(MESSAGES[1])
    dec = FrameDecoder()
    assert dec.next_message() is None
    dec.feed(frame[:3])
    assert dec.next_message() is None
    dec.feed(frame[3:-1])
    assert dec.next_message() is None and dec.buffered == len(frame) - 1
    dec.feed(frame[-1:])
    assert dec.next_message() == MESSAGES[1]


def test_oversized_prefix_rejected_before_body() -> None:
    dec = FrameDecoder(max_frame=1000)
    dec.feed(b"\x00\x00")
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 1001)[2:])  # the prefix is complete: no body needed
    assert dec.buffered == 0
    # Framing is lost; the decoder stays failed.
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x00")
    with pytest.raises(FrameTooLarge):
        dec.next_message()


def test_oversized_second_frame_rejected_by_next_message() -> None:
    ok = encode_frame(CloseSession())
    dec = FrameDecoder(max_frame=100)
    dec.feed(ok + struct.pack(">I", 2**32 - 1))
    assert dec.next_message() == CloseSession()
    with pytest.raises(FrameTooLarge):
        dec.next_message()


def test_frame_at_exact_limit_accepted() -> None:
    frame = encode_frame(MESSAGES[1])
    limit = len(frame) - 4
    dec = FrameDecoder(max_frame=limit)
    dec.feed(frame)
    assert dec.next_message() == MESSAGES[1]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_frame=limit - 1).feed(frame)


def test_bad_body_is_dropped_and_stream_continues() -> None:
    bad = pack({"t": "nope"})
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", len(bad)) + bad + encode_frame(CloseSession()))
    with pytest.raises(DecodeError, match="unknown message type"):
        dec.next_message()
    assert dec.next_message() == CloseSession()


def test_read_frame_length() -> None:
    assert read_frame_length(b"\x00\x00\x01\x00", 256) == 256
    with pytest.raises(FrameTooLarge):
        read_frame_length(b"\x00\x00\x01\x01", 256)
    for bad in (b"", b"\x00\x00\x01", b"\x00" * 5):
        with pytest.raises(DecodeError):
            read_frame_length(bad, 256)


# --- malformed bodies -------------------------------------------------------------------------

GOOD_STEP = {
    "t": "step",
    "step": 1,
    "position": 3,
    "hidden": {"dtype": "float32", "shape": [1, 1, 2], "data": b"\0" * 8},
}
GOOD_OPEN = {
    "t": "open",
    "model_id": "m",
    "start": 0,
    "end": 2,
    "max_length": 16,
    "dtype": "float16",
    "batch": 1,
}


def with_(base: dict, **changes) -> bytes:
    m = dict(base)
    for k, v in changes.items():
        if v is ...:
            del m[k]
        else:
            m[k] = v
    return pack(m)


def test_good_bases_decode() -> None:
    assert isinstance(decode_message(pack(GOOD_STEP), max_frame=1024), Step)
    assert isinstance(decode_message(pack(GOOD_OPEN), max_frame=1024), OpenSession)


MALFORMED = {
    "empty": b"",
    "not a map": pack([1, 2]),
    "string": pack("step"),
    "trailing garbage": pack(GOOD_STEP) + b"\x00",
    "truncated": pack(GOOD_STEP)[:-3],
    "no tag": with_(GOOD_STEP, t=...),
    "tag not str": with_(GOOD_STEP, t=1),
    "unknown tag": with_(GOOD_STEP, t="rewind"),
    "step missing": with_(GOOD_STEP, step=...),
    "step negative": with_(GOOD_STEP, step=-1),
    "step float": with_(GOOD_STEP, step=1.0),
    "step bool": with_(GOOD_STEP, step=True),
    "position str": with_(GOOD_STEP, position="3"),
    "hidden missing": with_(GOOD_STEP, hidden=...),
    "hidden not map": with_(GOOD_STEP, hidden=b"\0" * 8),
    "bad dtype": with_(GOOD_STEP, hidden={"dtype": "float64", "shape": [1], "data": b"\0" * 8}),
    "shape mismatch": with_(
        GOOD_STEP, hidden={"dtype": "float32", "shape": [3], "data": b"\0" * 8}
    ),
    "huge shape": with_(
        GOOD_STEP, hidden={"dtype": "float32", "shape": [2**40, 2**40], "data": b"\0" * 8}
    ),
    "open end <= start": with_(GOOD_OPEN, start=2, end=2),
    "open negative start": with_(GOOD_OPEN, start=-1),
    "open zero batch": with_(GOOD_OPEN, batch=0),
    "open zero max_length": with_(GOOD_OPEN, max_length=0),
    "open empty model": with_(GOOD_OPEN, model_id=""),
    "open long model": with_(GOOD_OPEN, model_id="m" * 1000),
    "open bad dtype": with_(GOOD_OPEN, dtype="fp8"),
    "open missing batch": with_(GOOD_OPEN, batch=...),
    "opened no id": pack({"t": "opened", "max_length": 1, "kv_free_tokens": 0}),
    "opened negative free": pack(
        {"t": "opened", "session_id": "s", "max_length": 1, "kv_free_tokens": -1}
    ),
    "result nan elapsed": pack({**GOOD_STEP, "t": "result", "elapsed_ms": float("nan")}),
    "result negative elapsed": pack({**GOOD_STEP, "t": "result", "elapsed_ms": -1.0}),
    "result missing elapsed": pack({**GOOD_STEP, "t": "result"}),
    "error no code": pack({"t": "error", "message": "m", "step": None}),
    "error empty code": pack({"t": "error", "code": "", "message": "m", "step": None}),
    "error message bytes": pack({"t": "error", "code": "c", "message": b"m", "step": None}),
    "error step str": pack({"t": "error", "code": "c", "message": "m", "step": "1"}),
    "huge claimed str": b"\x81\xa1t\xdb\xff\xff\xff\xff",
    "huge claimed map": b"\xdf\xff\xff\xff\xff",
    "ext type": b"\x82\xa1t\xa5close\xa1x\xd4\x01\x00",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body_raises_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_message(body, max_frame=1 << 20)
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(DecodeError):
        dec.next_message()


def test_body_over_max_frame() -> None:
    body = pack(GOOD_STEP)
    with pytest.raises(FrameTooLarge):
        decode_message(body, max_frame=len(body) - 1)


# --- property tests ---------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_tags = st.sampled_from(["open", "step", "close", "opened", "result", "error", "x"])
_fields = st.sampled_from(
    [
        "step",
        "position",
        "hidden",
        "model_id",
        "start",
        "end",
        "max_length",
        "dtype",
        "batch",
        "session_id",
        "kv_free_tokens",
        "elapsed_ms",
        "code",
        "message",
        "shape",
        "data",
    ]
)


def check_decodes_or_protocol_error(body: bytes) -> None:
    try:
        msg = decode_message(body, max_frame=4096)
    except ProtocolError:
        return
    assert isinstance(msg, (OpenSession, Step, CloseSession, SessionOpened, StepResult, ErrorReply))
    # Whatever decodes must re-encode to something that decodes to the same message.
    assert decode_message(encode_frame(msg)[4:], max_frame=4096) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_message(data: bytes) -> None:
    check_decodes_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(_tags, st.dictionaries(_fields, _values, max_size=8))
def test_arbitrary_maps_decode_message(tag: str, fields: dict) -> None:
    check_decodes_or_protocol_error(msgpack.packb({"t": tag, **fields}, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_mutated_frames(msg: Message, data: st.DataObject) -> None:
    body = bytearray(encode_frame(msg)[4:])
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    check_decodes_or_protocol_error(bytes(body[:cut]))
    check_decodes_or_protocol_error(bytes(body))


_junk_bodies = st.binary(max_size=200) | st.builds(
    lambda tag, fields: msgpack.packb({"t": tag, **fields}, use_bin_type=True),
    _tags,
    st.dictionaries(_fields, _values, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(MESSAGES) | _junk_bodies, max_size=8),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
)
def test_frame_decoder_on_mixed_stream(segments: list, cuts: list[int]) -> None:
    # Valid frames and junk bodies with honest prefixes, fed in arbitrary chunks: the decoder
    # must yield exactly what decode_message yields frame by frame, skipping the bad ones.
    stream = b""
    expected: list[Message] = []
    for seg in segments:
        if isinstance(seg, bytes):
            stream += struct.pack(">I", len(seg)) + seg
            with contextlib.suppress(ProtocolError):
                expected.append(decode_message(seg, max_frame=4096))
        else:
            stream += encode_frame(seg)
            expected.append(seg)
    dec = FrameDecoder(max_frame=4096)
    got: list[Message] = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        i += 1
        dec.feed(stream[pos : pos + n])
        pos += n
        while True:
            try:
                msg = dec.next_message()
            except DecodeError:
                continue
            if msg is None:
                break
            got.append(msg)
    assert got == expected and dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.binary(min_size=1, max_size=64)
        | st.integers(0, 300).map(lambda n: struct.pack(">I", n))  # a plausible prefix
        | st.sampled_from(MESSAGES).map(encode_frame),
        max_size=12,
    )
)
def test_arbitrary_chunks_frame_decoder(chunks: list[bytes]) -> None:
    # Any bytes, cut anywhere: the decoder yields what reading the whole stream frame by frame
    # yields (each message, a DecodeError per bad body, then FrameTooLarge for good at the first
    # prefix over the limit), and keeps exactly the unfinished tail buffered.
    max_frame = 256
    stream = b"".join(chunks)
    want: list[object] = []
    pos = 0
    while len(stream) - pos >= 4:
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > max_frame:
            want.append(FrameTooLarge)
            break
        if len(stream) - pos - 4 < n:
            break
        body = stream[pos + 4 : pos + 4 + n]
        pos += 4 + n
        try:
            want.append(decode_message(body, max_frame=max_frame))
        except DecodeError:
            want.append(DecodeError)
    dec = FrameDecoder(max_frame=max_frame)
    got: list[object] = []

    def drain() -> None:
        while True:
            try:
                msg = dec.next_message()
            except DecodeError:
                got.append(DecodeError)
                continue
            if msg is None:
                return
            got.append(msg)

    try:
        for chunk in chunks:
            dec.feed(chunk)
            drain()
    except FrameTooLarge:
        got.append(FrameTooLarge)
    assert got == want
    if want[-1:] == [FrameTooLarge]:
        # Framing is lost: nothing stays buffered and the decoder stays failed.
        assert dec.buffered == 0
        with pytest.raises(FrameTooLarge):
            dec.feed(b"\x00")
        with pytest.raises(FrameTooLarge):
            dec.next_message()
    else:
        assert dec.buffered == len(stream) - pos
