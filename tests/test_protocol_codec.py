"""Codec, typed readers, tensor framing, ids and error types of the wire layer."""

from __future__ import annotations

import math
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import (
    MAX_DEPTH,
    as_int,
    get_bytes,
    get_float,
    get_int,
    get_list,
    get_map,
    get_opt_float,
    get_opt_int,
    get_opt_list,
    get_opt_str,
    get_str,
    pack,
    unpack_map,
)
from protocol.errors import (
    AdRejected,
    BadSignature,
    DecodeError,
    FrameTooLarge,
    ProtocolError,
    VersionMismatch,
)
from protocol.ids import (
    CAPACITY_TOPIC,
    FORWARD_PROTOCOL_ID,
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    parse_version,
    protocol_id,
)
from protocol.tensors import WIRE_DTYPES, TensorFrame, tensor_from_wire, tensor_to_wire

# --- errors and ids ---------------------------------------------------------------------------


def test_error_codes_and_hierarchy() -> None:
    assert ProtocolError.code == "protocol_error"
    codes = {
        DecodeError: "malformed",
        FrameTooLarge: "too_large",
        VersionMismatch: "version",
        BadSignature: "bad_signature",
    }
    for cls, code in codes.items():
        assert issubclass(cls, ProtocolError)
        assert cls.code == code
    e = AdRejected("replayed", "seq 3 <= 4")
    assert isinstance(e, ProtocolError)
    assert e.reason == "replayed"
    assert "replayed" in str(e) and "seq 3" in str(e)


def test_protocol_ids() -> None:
    assert PROTOCOL_VERSION == "1.0.0" and PROTOCOL_MAJOR == 1
    assert FORWARD_PROTOCOL_ID == "/shardmesh/forward/1.0.0"
    assert CAPACITY_TOPIC == "shardmesh/capacity/1"
    assert protocol_id("control", "2.3.4") == "/shardmesh/control/2.3.4"
    assert parse_version(PROTOCOL_VERSION)[0] == PROTOCOL_MAJOR
    for bad_version in ("1.0", "1.0.0.0", "v1.0.0", "01.0.0", "1.0.x", ""):
        with pytest.raises(ValueError):
            protocol_id("forward", bad_version)
    for bad_name in ("", "Forward", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            protocol_id(bad_name)


# --- unpack_map -------------------------------------------------------------------------------


def test_pack_unpack_round_trip() -> None:
    obj = {"s": "héllo", "b": b"\x00\xff", "i": -5, "f": 1.5, "n": None, "l": [1, [2]], "m": {}}
    assert unpack_map(pack(obj), max_size=1024) == obj
    # str stays str and bytes stays bin on the wire.
    assert pack("a")[0] == 0xA1 and pack(b"a")[0] == 0xC4


def test_unpack_map_size_limit_checked_first() -> None:
    data = pack({"x": "y" * 100})
    assert unpack_map(data, max_size=len(data)) == {"x": "y" * 100}
    with pytest.raises(FrameTooLarge):
        unpack_map(data, max_size=len(data) - 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # empty
        pack([1, 2]),  # array at top level
        pack(7),
        pack("map"),
        pack(None),
        pack({"a": 1}) + b"\x00",  # trailing garbage
        pack({"a": 1}) + pack({"b": 2}),  # two objects
        pack({"a": "abcdef"})[:-2],  # truncated
        b"\xc1",  # never-used type byte
        b"\x81\xa1a\xd4\x05\x00",  # fixext 1
        b"\x81\xa1a\xc7\x00\x05",  # ext 8 of length 0
        b"\x81\xa1a" + pack(msgpack.Timestamp(1)),  # timestamp ext
        b"\x81\x01\x02",  # int key
        b"\x81\xc4\x01k\x02",  # bin key
        pack({"a": {b"k": 1}}),  # bin key nested
        pack({"a": [{"ok": 1, 2: 3}]}),  # int key nested in a list
        b"\x81\xa1a\xa2\xff\xfe",  # invalid utf-8
        b"\x81\xa1a\xdd\xff\xff\xff\xff",  # array claiming 4G items
        b"\x81\xa1a\xdf\xff\xff\xff\xff",  # map claiming 4G pairs
        b"\x81\xa1a\xdb\xff\xff\xff\xff",  # str claiming 4 GiB
        b"\x81\xa1a\xc6\xff\xff\xff\xff",  # bin claiming 4 GiB
        b"\xdf\xff\xff\xff\xff",  # top-level map claiming 4G pairs
    ],
)
def test_unpack_map_rejects_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack_map(data, max_size=1 << 20)


def test_unpack_map_nesting_limit() -> None:
    def nested(depth: int) -> dict:
        obj: dict = {}
        for _ in range(depth - 1):
            obj = {"x": obj}
        return obj

    assert unpack_map(pack(nested(MAX_DEPTH)), max_size=1 << 20)
    with pytest.raises(DecodeError, match="nesting"):
        unpack_map(pack(nested(MAX_DEPTH + 1)), max_size=1 << 20)
    lists = b"\x81\xa1a" + b"\x91" * (MAX_DEPTH + 5) + b"\x00"
    with pytest.raises(DecodeError, match="nesting"):
        unpack_map(lists, max_size=1 << 20)
    # Deeper than msgpack's own stack: still our error, not a crash.
    with pytest.raises(DecodeError):
        unpack_map(b"\x81\xa1a" + b"\x91" * 5000 + b"\x00", max_size=1 << 20)


def test_hostile_length_prefix_does_not_allocate() -> None:
    # 100 arrays each claiming 2**32-1 items in a few hundred bytes of input.
    data = b"\x81\xa1a" + b"\x9f" + b"\xdd\xff\xff\xff\xff" * 15
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            unpack_map(data, max_size=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_unpack_map_arbitrary_bytes(data: bytes) -> None:
    try:
        out = unpack_map(data, max_size=150)
    except ProtocolError:
        return
    assert isinstance(out, dict) and all(type(k) is str for k in out)


# --- field readers ----------------------------------------------------------------------------

M = {
    "s": "abc",
    "i": 5,
    "t": True,
    "f": 2.5,
    "fi": 3,
    "nan": math.nan,
    "inf": math.inf,
    "b": b"xy",
    "l": [1, 2, 3],
    "m": {"k": 1},
    "n": None,
}


def test_readers_accept_valid_values() -> None:
    assert get_str(M, "s", max_len=3) == "abc"
    assert get_int(M, "i", min=5, max=5) == 5
    assert get_float(M, "f", min=0, max=10) == 2.5
    fi = get_float(M, "fi", min=0, max=10)
    assert fi == 3.0 and type(fi) is float
    assert get_bytes(M, "b", min_len=2, max_len=2) == b"xy"
    assert get_list(M, "l", max_len=3) == [1, 2, 3]
    assert get_map(M, "m") == {"k": 1}
    assert get_opt_str(M, "n", max_len=1) is None and get_opt_str(M, "absent", max_len=1) is None
    assert get_opt_int(M, "n", min=0, max=1) is None and get_opt_int(M, "i", min=0, max=9) == 5
    assert get_opt_float(M, "absent", min=0, max=1) is None
    assert get_opt_list(M, "n", max_len=1) is None and get_opt_list(M, "l", max_len=3) == [1, 2, 3]
    assert get_float(M, "f", min=2.0, max=3.0, min_exclusive=True) == 2.5


@pytest.mark.parametrize(
    ("read", "field"),
    [
        (lambda: get_str(M, "missing", max_len=9), "missing"),
        (lambda: get_str(M, "i", max_len=9), "i"),
        (lambda: get_str(M, "s", max_len=2), "s"),
        (lambda: get_str(M, "s", min_len=4, max_len=9), "s"),
        (lambda: get_int(M, "s", min=0, max=9), "s"),
        (lambda: get_int(M, "t", min=0, max=9), "t"),  # bool is not an int on the wire
        (lambda: get_int(M, "f", min=0, max=9), "f"),
        (lambda: get_int(M, "i", min=6, max=9), "i"),
        (lambda: get_int(M, "i", min=0, max=4), "i"),
        (lambda: get_int(M, "n", min=0, max=4), "n"),
        (lambda: get_float(M, "s", min=0, max=9), "s"),
        (lambda: get_float(M, "t", min=0, max=9), "t"),
        (lambda: get_float(M, "nan", min=-9, max=9), "nan"),
        (lambda: get_float(M, "inf", min=0, max=math.inf), "inf"),
        (lambda: get_float(M, "f", min=3, max=9), "f"),
        (lambda: get_float(M, "f", min=2.5, max=9, min_exclusive=True), "f"),
        (lambda: get_bytes(M, "s", max_len=9), "s"),
        (lambda: get_bytes(M, "b", max_len=1), "b"),
        (lambda: get_bytes(M, "b", min_len=3, max_len=9), "b"),
        (lambda: get_list(M, "m", max_len=9), "m"),
        (lambda: get_list(M, "l", max_len=2), "l"),
        (lambda: get_map(M, "l"), "l"),
        (lambda: get_opt_str(M, "i", max_len=9), "i"),
        (lambda: get_opt_int(M, "f", min=0, max=9), "f"),
        (lambda: get_opt_float(M, "s", min=0, max=9), "s"),
        (lambda: get_opt_list(M, "s", max_len=9), "s"),
        (lambda: as_int("7", "shape", min=0, max=9), "shape"),
    ],
)
def test_readers_reject_and_name_the_field(read, field: str) -> None:
    with pytest.raises(DecodeError) as info:
        read()
    assert repr(field) in str(info.value)
    assert "\n" not in str(info.value)


# --- tensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_tensor_round_trip(dtype: str) -> None:
    shape = (2, 3, 4)
    data = bytes(i % 251 for i in range(24 * WIRE_DTYPES[dtype]))
    t = TensorFrame(dtype, shape, data)
    wire = unpack_map(pack({"t": tensor_to_wire(t)}), max_size=1 << 20)["t"]
    back = tensor_from_wire(wire, max_bytes=1 << 20)
    assert back == t and back.numel == 24
    assert isinstance(back.shape, tuple)


def test_tensor_float32_bytes_are_little_endian() -> None:
    data = struct.pack("<3f", 1.0, -2.0, 0.5)
    t = tensor_from_wire({"dtype": "float32", "shape": [3], "data": data}, max_bytes=12)
    assert struct.unpack("<3f", t.data) == (1.0, -2.0, 0.5)


def test_tensor_empty_and_scalar() -> None:
    empty = tensor_from_wire({"dtype": "int64", "shape": [0, 5], "data": b""}, max_bytes=0)
    assert empty.numel == 0
    scalar = tensor_from_wire({"dtype": "int32", "shape": [], "data": b"\0" * 4}, max_bytes=4)
    assert scalar.shape == ()


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"dtype": "float64", "shape": [1], "data": b"\0" * 8},
        {"dtype": "float32", "shape": (1,), "data": 4},
        {"dtype": 4, "shape": [1], "data": b"\0" * 4},
        {"shape": [1], "data": b"\0" * 4},
        {"dtype": "float32", "data": b"\0" * 4},
        {"dtype": "float32", "shape": [1]},
        {"dtype": "float32", "shape": "1", "data": b"\0" * 4},
        {"dtype": "float32", "shape": [-1], "data": b""},
        {"dtype": "float32", "shape": [True], "data": b"\0" * 4},
        {"dtype": "float32", "shape": [1.0], "data": b"\0" * 4},
        {"dtype": "float32", "shape": [1, 1, 1, 1, 1], "data": b"\0" * 4},
        {"dtype": "float32", "shape": [2], "data": b"\0" * 4},
        {"dtype": "float32", "shape": [1], "data": b"\0" * 5},
        {"dtype": "float32", "shape": [1], "data": "text"},
        # A claimed shape of 2**160 elements against 4 real bytes: rejected, not allocated.
        {"dtype": "float32", "shape": [2**40, 2**40, 2**40, 2**40], "data": b"\0" * 4},
        {"dtype": "float32", "shape": [2**41], "data": b"\0" * 4},
    ],
)
def test_tensor_from_wire_rejects(obj) -> None:
    with pytest.raises(DecodeError):
        tensor_from_wire(obj, max_bytes=1 << 20)


def test_tensor_over_max_bytes() -> None:
    obj = {"dtype": "float16", "shape": [8], "data": b"\0" * 16}
    assert tensor_from_wire(obj, max_bytes=16).shape == (8,)
    with pytest.raises(FrameTooLarge):
        tensor_from_wire(obj, max_bytes=15)


def test_tensor_max_dims_is_configurable() -> None:
    obj = {"dtype": "int32", "shape": [1, 1, 1, 1, 1, 1], "data": b"\0" * 4}
    assert tensor_from_wire(obj, max_bytes=4, max_dims=6).shape == (1,) * 6
