"""Hostile input for every public decoder in protocol/.

Any bytes (and any structure msgpack can express) give either a valid message or a
ProtocolError: never another exception, never a hang, never memory out of proportion to the
input. Where a decoder accepts something, re-encoding it must give back an equal message.

Decoders covered: codec.unpack_map, tensors.tensor_from_wire, forward.read_frame_length,
forward.decode_message, frames.FrameDecoder, ads.decode_signed_ad, ads.AdValidator.check,
ids.parse_version (ValueError by contract; callers wrap it).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from factories import KEY, NOW, PEER, envelope
from factories import ad as make_ad  # `ad` names the ads under test here
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.ads import (
    AD_REJECT_REASONS,
    AD_STATES,
    MAX_AD_SIZE,
    AdValidator,
    CapacityAd,
    DeviceSummary,
    _ad_to_map,
    decode_signed_ad,
    encode_signed_ad,
)
from protocol.codec import MAX_DEPTH, MAX_ITEMS, pack, unpack_map
from protocol.errors import AdRejected, DecodeError, FrameTooLarge, ProtocolError
from protocol.forward import (
    DEFAULT_MAX_FRAME,
    FRAME_PREFIX_LEN,
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
from protocol.ids import parse_version
from protocol.tensors import WIRE_DTYPES, TensorFrame, tensor_from_wire, tensor_to_wire

# Generous per-example deadline: inputs are a few KB and decode in microseconds, so only a real
# hang (or quadratic blow-up) can reach it, even on a loaded 2-core machine.
PROPS = settings(
    max_examples=150,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_FRAME = 1 << 16

# --- strategies: valid messages -----------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, max_numel: int = 64) -> TensorFrame:
    dtype = draw(st.sampled_from(sorted(WIRE_DTYPES)))
    shape = draw(st.lists(st.integers(0, 8), min_size=0, max_size=4))
    numel = 1
    for d in shape:
        numel *= d
    if numel > max_numel:
        shape = [1] * len(shape)
        numel = 1
    data = draw(st.binary(min_size=numel * WIRE_DTYPES[dtype], max_size=numel * WIRE_DTYPES[dtype]))
    return TensorFrame(dtype, tuple(shape), data)


_ints = st.integers(0, 1 << 20)
_text = st.text(min_size=1, max_size=40)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        lambda mid, start, n, ml, dt, b: OpenSession(mid, start, start + n, ml, dt, b),
        _text,
        st.integers(0, 1000),
        st.integers(1, 1000),
        st.integers(1, 1 << 24),
        st.sampled_from(sorted(WIRE_DTYPES)),
        st.integers(1, 1 << 16),
    ),
    st.builds(Step, st.integers(0, (1 << 63) - 1), st.integers(0, 1 << 24), tensors()),
    st.just(CloseSession()),
    st.builds(SessionOpened, _text, st.integers(1, 1 << 24), st.integers(0, (1 << 63) - 1)),
    st.builds(
        StepResult,
        st.integers(0, (1 << 63) - 1),
        tensors(),
        st.floats(0.0, 1e9, allow_nan=False),
    ),
    st.builds(
        ErrorReply,
        st.text(min_size=1, max_size=64),
        st.text(max_size=200),
        st.none() | st.integers(0, (1 << 63) - 1),
    ),
)


ads: st.SearchStrategy[CapacityAd] = st.builds(
    lambda seq, ts, ttl, state, n, util: make_ad(
        seq=seq,
        timestamp=ts,
        ttl=ttl,
        state=state,
        devices=tuple(DeviceSummary("gpu", f"gpu{i}", 1 << 30, 1 << 29, util) for i in range(n)),
    ),
    st.integers(0, 20),
    st.floats(NOW - 120, NOW + 60),
    st.floats(0.5, 120.0),
    st.sampled_from(AD_STATES),
    st.integers(0, 3),
    st.none() | st.floats(0.0, 100.0),
)


# --- strategies: hostile structure --------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
    | st.floats()
    | st.floats(width=32)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def _header(kind: str, n: int) -> bytes:
    """A msgpack header announcing `n` items or bytes of `kind` (32-bit length form)."""
    code = {"array": 0xDD, "map": 0xDF, "str": 0xDB, "bin": 0xC6}[kind]
    return bytes([code]) + struct.pack(">I", n)


@st.composite
def bombs(draw: st.DrawFn) -> bytes:
    """Small inputs whose headers claim far more than they carry, or nest very deep."""
    kind = draw(st.sampled_from(["array", "map", "str", "bin", "ext", "deep", "wide"]))
    n = draw(st.sampled_from([2**32 - 1, 2**31, 2**24, 65536]) | st.integers(0, 2**32 - 1))
    tail = draw(st.binary(max_size=32))
    if kind == "ext":
        body = b"\xc9" + struct.pack(">I", n) + b"\x05" + tail
    elif kind == "deep":
        depth = draw(st.integers(MAX_DEPTH - 2, 3000))
        opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdd\x00\x00\x00\x01"]))
        body = opener * depth + b"\xc0"
    elif kind == "wide":
        # Many cheap objects: empty arrays/maps, short strings.
        item = draw(st.sampled_from([b"\x90", b"\x80", b"\xa2ab", b"\xc0", b"\xc4\x02xy"]))
        count = draw(st.integers(MAX_ITEMS - 2, MAX_ITEMS + 50))
        body = _header("array", count) + item * count
    else:
        body = _header(kind, n) + tail
    return b"\x81\xa1t" + body if draw(st.booleans()) else body


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes flipped, set, inserted, deleted or duplicated."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        i = draw(st.integers(0, len(data)))
        if op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[i:]
        elif not data or i == len(data):
            continue
        elif op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, 0xFF]))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j]
    return bytes(data)


def _edit_map(draw: st.DrawFn, m: dict[str, Any]) -> dict[str, Any]:
    """Delete some keys, give others arbitrary values, add unknown ones."""
    keys = sorted(m)
    out = dict(m)
    for k in draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else []:
        out.pop(k, None)
    for k in draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else []:
        out[k] = draw(values)
    out.update(draw(st.dictionaries(st.text(max_size=6), values, max_size=2)))
    return out


@st.composite
def wrong_bodies(draw: st.DrawFn) -> bytes:
    """A valid message's map with fields removed, retyped or added (also inside the tensor)."""
    msg = draw(messages)
    m = msgpack.unpackb(encode_frame(msg)[FRAME_PREFIX_LEN:], raw=False)
    if "hidden" in m and draw(st.booleans()):
        m["hidden"] = _edit_map(draw, m["hidden"])
    else:
        m = _edit_map(draw, m)
    return msgpack.packb(m, use_bin_type=True)


valid_bodies = messages.map(lambda msg: encode_frame(msg)[FRAME_PREFIX_LEN:])
hostile_bodies = st.one_of(
    st.binary(max_size=600),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    bombs(),
    wrong_bodies(),
    mutated(valid_bodies),
)
byteslike = st.sampled_from([bytes, bytearray, memoryview])


# --- helpers ------------------------------------------------------------------------------------


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a one-item list that holds the traced peak (bytes) once the block ends."""
    out = [0]
    tracemalloc.start()
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def only_protocol_errors(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or None if it raised a ProtocolError; anything else propagates."""
    try:
        return fn()
    except ProtocolError:
        return None


# --- unpack_map ---------------------------------------------------------------------------------


@PROPS
@given(hostile_bodies, byteslike)
def test_unpack_map_any_input(data: bytes, kind: type) -> None:
    out = only_protocol_errors(lambda: unpack_map(kind(data), max_size=4096))
    if out is None:
        return
    assert isinstance(out, dict) and all(type(k) is str for k in out)
    # Re-encoding what was accepted is accepted again and is stable.
    again = pack(out)
    assert pack(unpack_map(again, max_size=1 << 20)) == again


@PROPS
@given(bombs())
def test_unpack_map_bombs_bounded(data: bytes) -> None:
    with peak_memory() as peak:
        only_protocol_errors(lambda: unpack_map(data, max_size=1 << 20))
    # MAX_ITEMS small objects plus a copy of the input, never what the headers claim.
    assert peak[0] < 1_000_000 + 2 * len(data), peak[0]


# --- tensor_from_wire ---------------------------------------------------------------------------


@PROPS
@given(tensors())
def test_tensor_round_trip(t: TensorFrame) -> None:
    assert tensor_from_wire(tensor_to_wire(t), max_bytes=1 << 16) == t


@st.composite
def wrong_tensors(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(values)
    return _edit_map(draw, tensor_to_wire(draw(tensors())))


@PROPS
@given(wrong_tensors(), st.integers(0, 1 << 12), st.integers(0, 6))
def test_tensor_from_wire_any_structure(obj: Any, max_bytes: int, max_dims: int) -> None:
    t = only_protocol_errors(lambda: tensor_from_wire(obj, max_bytes=max_bytes, max_dims=max_dims))
    if t is None:
        return
    assert len(t.data) == t.numel * WIRE_DTYPES[t.dtype] <= max_bytes
    assert len(t.shape) <= max_dims and all(d >= 0 for d in t.shape)
    assert tensor_from_wire(tensor_to_wire(t), max_bytes=max_bytes, max_dims=max_dims) == t


def test_tensor_huge_claimed_shape_does_not_allocate() -> None:
    obj = {"dtype": "float32", "shape": [1 << 40] * 4, "data": b"\x00" * 16}
    with peak_memory() as peak, pytest.raises(DecodeError, match="needs"):
        tensor_from_wire(obj, max_bytes=1 << 30)
    assert peak[0] < 64_000


# --- read_frame_length --------------------------------------------------------------------------


@PROPS
@given(st.binary(max_size=8), st.integers(0, 2**32 + 5))
def test_read_frame_length_any_prefix(prefix: bytes, max_frame: int) -> None:
    n = only_protocol_errors(lambda: read_frame_length(prefix, max_frame))
    if n is None:
        return
    assert len(prefix) == FRAME_PREFIX_LEN
    assert n == int.from_bytes(prefix, "big") <= max_frame


# --- decode_message -----------------------------------------------------------------------------

MESSAGE_TYPES = (OpenSession, Step, CloseSession, SessionOpened, StepResult, ErrorReply)


def check_body(body: bytes | bytearray | memoryview, max_frame: int = MAX_FRAME) -> None:
    msg = only_protocol_errors(lambda: decode_message(body, max_frame=max_frame))
    if msg is None:
        return
    assert isinstance(msg, MESSAGE_TYPES)
    assert decode_message(encode_frame(msg)[FRAME_PREFIX_LEN:], max_frame=1 << 20) == msg


@PROPS
@given(messages, byteslike)
def test_valid_messages_round_trip(msg: Message, kind: type) -> None:
    frame = encode_frame(msg)
    assert read_frame_length(frame[:4], MAX_FRAME) == len(frame) - 4
    assert decode_message(kind(frame[4:]), max_frame=MAX_FRAME) == msg


@PROPS
@given(hostile_bodies, byteslike)
def test_decode_message_any_input(body: bytes, kind: type) -> None:
    check_body(kind(body))


@PROPS
@given(wrong_bodies())
def test_decode_message_wrong_fields(body: bytes) -> None:
    check_body(body)


@PROPS
@given(mutated(valid_bodies), st.integers(0, 700))
def test_decode_message_mutated_with_small_limit(body: bytes, max_frame: int) -> None:
    check_body(body, max_frame=max_frame)


# --- FrameDecoder -------------------------------------------------------------------------------

_framed_segments = st.lists(
    messages.map(encode_frame)
    | hostile_bodies.map(lambda b: struct.pack(">I", len(b)) + b)
    | mutated(messages.map(encode_frame)),
    max_size=8,
)


@PROPS
@given(_framed_segments, st.lists(st.integers(1, 97), min_size=1, max_size=16))
def test_frame_decoder_any_stream_any_chunking(segments: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(segments)
    dec = FrameDecoder(max_frame=2048)
    pos, i = 0, 0
    failed: ProtocolError | None = None
    while pos < len(stream) and failed is None:
        chunk = stream[pos : pos + cuts[i % len(cuts)]]
        pos += len(chunk)
        i += 1
        try:
            dec.feed(chunk)
            while True:
                try:
                    msg = dec.next_message()
                except DecodeError:
                    continue  # the bad body was dropped; framing goes on
                if msg is None:
                    break
                assert isinstance(msg, MESSAGE_TYPES)
        except FrameTooLarge as e:
            failed = e
        # Drained after every feed: never more than one frame (plus its prefix) buffered.
        assert dec.buffered <= FRAME_PREFIX_LEN + 2048
    if failed is not None:
        # Framing is lost for good: both entry points keep raising, nothing is buffered.
        assert dec.buffered == 0
        with pytest.raises(FrameTooLarge):
            dec.feed(b"\x00")
        with pytest.raises(FrameTooLarge):
            dec.next_message()


@PROPS
@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_frame_decoder_chunking_preserves_messages(msgs: list[Message], data: Any) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20)))
    dec = FrameDecoder(max_frame=MAX_FRAME)
    got: list[Message] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        dec.feed(memoryview(stream)[a:b])
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs and dec.buffered == 0


def test_frame_decoder_rejects_4gib_prefix_before_allocating() -> None:
    dec = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)
    with peak_memory() as peak:
        with pytest.raises(FrameTooLarge):
            dec.feed(b"\xff\xff\xff\xff")
        with pytest.raises(FrameTooLarge):
            dec.feed(b"\x00" * 1024)
    assert dec.buffered == 0 and peak[0] < 64_000


# --- decode_signed_ad and AdValidator -----------------------------------------------------------

valid_envelopes = ads.map(lambda ad: encode_signed_ad(ad, KEY))


@st.composite
def signed_wrong_ads(draw: st.DrawFn) -> bytes:
    """Validly signed envelopes whose ad body is hostile: only the ad parser stands in the way."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return envelope(_edit_map(draw, _ad_to_map(draw(ads))))
    if choice == 1:
        m = _ad_to_map(draw(ads))
        m["devices"] = [_edit_map(draw, d) for d in m["devices"]] or [draw(values)]
        return envelope(m)
    if choice == 2:
        return envelope(draw(bombs()))
    return envelope(draw(mutated(ads.map(lambda ad: pack(_ad_to_map(ad))))))


hostile_envelopes = st.one_of(
    st.binary(max_size=600),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    bombs(),
    mutated(valid_envelopes),
    signed_wrong_ads(),
)


@PROPS
@given(hostile_envelopes)
def test_decode_signed_ad_any_input(data: bytes) -> None:
    ad = only_protocol_errors(lambda: decode_signed_ad(data))
    if ad is None:
        return
    assert isinstance(ad, CapacityAd) and ad.peer_id == PEER
    assert decode_signed_ad(encode_signed_ad(ad, KEY)) == ad


@PROPS
@given(ads)
def test_valid_ads_round_trip(ad: CapacityAd) -> None:
    assert decode_signed_ad(encode_signed_ad(ad, KEY)) == ad


@PROPS
@given(
    st.lists(
        st.tuples(
            hostile_envelopes | valid_envelopes,
            st.sampled_from([None, PEER, "12D3KooWother"]),
            st.floats(NOW - 200, NOW + 200),
        ),
        max_size=12,
    ),
    st.integers(1, 4),
)
def test_validator_any_sequence(inputs: list[tuple[bytes, str | None, float]], cap: int) -> None:
    v = AdValidator(max_peers=cap)
    for data, sender, now in inputs:
        try:
            ad = v.check(data, sender=sender, now=now)
        except AdRejected as e:
            assert e.reason in AD_REJECT_REASONS
            continue
        assert ad.expires_at >= now and v.last_seq(ad.peer_id) == ad.seq
    assert v.accepted + sum(v.rejected.values()) == len(inputs)
    assert len(v) <= cap


def test_ad_larger_than_limit_rejected_before_parsing() -> None:
    data = envelope(_header("array", 2**32 - 1) + b"\x90" * (MAX_AD_SIZE + 10))
    with peak_memory() as peak, pytest.raises(FrameTooLarge):
        decode_signed_ad(data)
    assert peak[0] < 64_000


# --- parse_version ------------------------------------------------------------------------------


@PROPS
@given(st.text(max_size=40) | st.from_regex(r"[0-9]{1,12}\.[0-9]{1,12}\.[0-9]{1,12}"))
def test_parse_version_any_text(text: str) -> None:
    try:
        v = parse_version(text)
    except ValueError:
        return
    assert ".".join(map(str, v)) == text


# --- regressions: amplification by many small objects -------------------------------------------
# Before the header scan in unpack_map, a 64 MiB frame of empty arrays decoded into ~4.6 GiB of
# list objects and took tens of seconds: msgpack bounds each length by the input, not the sum.

AMPLIFIERS = {
    "empty_arrays": b"\x90",
    "empty_maps": b"\x80",
    "short_strings": b"\xa2ab",
    "short_bins": b"\xc4\x02xy",
    "nils": b"\xc0",
}


@pytest.mark.parametrize("item", AMPLIFIERS.values(), ids=AMPLIFIERS.keys())
def test_many_small_objects_rejected_cheaply(item: bytes) -> None:
    n = (16 << 20) // len(item)
    body = b"\x82\xa1t\xa4step\xa1x" + _header("array", n) + item * n
    t0 = time.perf_counter()
    with peak_memory() as peak, pytest.raises(DecodeError, match="objects"):
        decode_message(body, max_frame=DEFAULT_MAX_FRAME)
    assert peak[0] < 1_000_000, peak[0]
    assert time.perf_counter() - t0 < 2.0


def test_deep_and_wide_rejected_cheaply() -> None:
    # Each level a big array of short strings, then the next level: objects held by unfinished
    # containers, which hooks run after completion could not have counted.
    level = b"\xdc\x0f\xff" + b"\xa2ab" * 4094
    body = b"\x81\xa1t" + level * 300 + b"\x90"
    with peak_memory() as peak, pytest.raises(DecodeError):
        unpack_map(body, max_size=DEFAULT_MAX_FRAME)
    assert peak[0] < 1_000_000, peak[0]


def test_nesting_limit_enforced_before_msgpack() -> None:
    ok = b"\x81\xa1k" * (MAX_DEPTH - 1) + b"\x91\xc0"
    assert unpack_map(ok, max_size=1024)
    with pytest.raises(DecodeError, match="nesting"):
        unpack_map(b"\x81\xa1k" * MAX_DEPTH + b"\x91\xc0", max_size=1024)


def test_item_limit_admits_the_largest_valid_ad() -> None:
    devices = tuple(DeviceSummary("gpu", "g" * 40, 1 << 40, 1 << 39, 50.0) for _ in range(64))
    addrs = tuple(f"/ip4/10.0.0.{i}/tcp/4001/p2p/{PEER}" for i in range(32))
    ad = make_ad(devices=devices, addrs=addrs)
    assert decode_signed_ad(encode_signed_ad(ad, KEY)) == ad
    m = {"t": "close", "x": list(range(MAX_ITEMS - 5))}  # exactly MAX_ITEMS objects
    assert decode_message(pack(m), max_frame=1 << 20) == CloseSession()
    m["x"].append(0)
    with pytest.raises(DecodeError, match="objects"):
        decode_message(pack(m), max_frame=1 << 20)


# --- protocol.swarm: the private-swarm handshake codec ------------------------------------------

try:
    from protocol import swarm
except ImportError:  # a checkout without private swarms
    swarm = None  # type: ignore[assignment]

needs_swarm = pytest.mark.skipif(swarm is None, reason="protocol.swarm is not in this checkout")

if swarm is not None:
    auth_messages = st.one_of(
        st.builds(swarm.Hello, st.binary(min_size=swarm.NONCE_LEN, max_size=swarm.NONCE_LEN)),
        st.builds(swarm.Challenge, st.binary(min_size=swarm.NONCE_LEN, max_size=swarm.NONCE_LEN)),
        st.builds(swarm.Proof, st.binary(min_size=swarm.MAC_LEN, max_size=swarm.MAC_LEN)),
        st.builds(swarm.Refused, st.text(min_size=1, max_size=swarm.MAX_REASON_LEN)),
    )
    auth_bodies = auth_messages.map(lambda m: swarm.encode_auth(m)[swarm.FRAME_PREFIX_LEN :])

    @st.composite
    def wrong_auth_bodies(draw: st.DrawFn) -> bytes:
        m = msgpack.unpackb(draw(auth_bodies), raw=False)
        return msgpack.packb(_edit_map(draw, m), use_bin_type=True)

    hostile_auth_bodies = st.one_of(
        st.binary(max_size=300),
        values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        bombs(),
        mutated(auth_bodies),
        wrong_auth_bodies(),
    )
    hostile_auth_streams = st.lists(
        auth_messages.map(swarm.encode_auth)
        | hostile_auth_bodies.map(lambda b: struct.pack(">H", len(b) & 0xFFFF) + b)
        | mutated(auth_messages.map(swarm.encode_auth)),
        max_size=6,
    )
else:  # keep the decorators below importable
    auth_messages = auth_bodies = hostile_auth_bodies = hostile_auth_streams = st.nothing()
AUTH_TYPES = () if swarm is None else (swarm.Hello, swarm.Challenge, swarm.Proof, swarm.Refused)


@needs_swarm
@PROPS
@given(auth_messages)
def test_swarm_auth_round_trip(msg: Any) -> None:
    frame = swarm.encode_auth(msg)
    assert int.from_bytes(frame[: swarm.FRAME_PREFIX_LEN], "big") == len(frame) - 2
    assert swarm.decode_auth(frame[swarm.FRAME_PREFIX_LEN :]) == msg


@needs_swarm
@PROPS
@given(hostile_auth_bodies, byteslike)
def test_swarm_decode_auth_any_input(body: bytes, kind: type) -> None:
    msg = only_protocol_errors(lambda: swarm.decode_auth(kind(body)))
    if msg is None:
        return
    assert isinstance(msg, AUTH_TYPES)
    assert swarm.decode_auth(swarm.encode_auth(msg)[swarm.FRAME_PREFIX_LEN :]) == msg


@needs_swarm
@PROPS
@given(hostile_auth_streams, st.integers(1, 64), st.booleans())
def test_swarm_auth_decoder_and_handshake_any_stream(
    segments: list[bytes], chunk: int, initiator: bool
) -> None:
    # Whatever arrives drives a handshake: it answers, or fails with AuthFailed (a
    # ProtocolError); nothing else escapes, and a random stream never proves the secret.
    stream = b"".join(segments)
    dec = swarm.AuthDecoder()
    hs = swarm.Handshake(key=b"k" * 32, initiator=initiator, local_id=b"a", remote_id=b"b")
    hs.start()
    try:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i : i + chunk])
            while True:
                try:
                    msg = dec.next_message()
                except DecodeError:
                    continue
                if msg is None:
                    break
                assert isinstance(msg, AUTH_TYPES)
                for reply in hs.receive(msg):
                    assert isinstance(reply, AUTH_TYPES)
    except ProtocolError:
        pass
    assert not hs.verified


@needs_swarm
def test_swarm_auth_decoder_refuses_floods_without_buffering() -> None:
    dec = swarm.AuthDecoder()
    with peak_memory() as peak, pytest.raises(FrameTooLarge):
        dec.feed(b"\xff\xff" + b"\x00" * 10_000)
    assert peak[0] < 64_000
    dec = swarm.AuthDecoder()
    small = swarm.encode_auth(swarm.Refused("x"))
    with pytest.raises(FrameTooLarge):
        for _ in range(100):  # many small frames fed and never drained
            dec.feed(small)
