"""msgpack encoding with hard limits, and typed field readers for the message decoders.

`unpack_map` is the single entry point from untrusted bytes: it bounds every length msgpack may
allocate, refuses ext types and deep nesting, and turns every failure into `DecodeError`.
The `get_*` readers then check one field each and name it in the error.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import msgpack

from protocol.errors import DecodeError, FrameTooLarge, ProtocolError

# Deepest structure any message needs is 3 (ad -> devices -> device); leave room for growth.
MAX_DEPTH = 16
# Objects (keys and values, containers included) in one message. The largest valid ad holds ~800;
# bulk data travels as one bin. Bounds memory: an empty list costs ~70 bytes per byte of input.
MAX_ITEMS = 4096

_MISSING: Any = object()


def pack(obj: Any) -> bytes:
    """msgpack-encode `obj` (str as str, bytes as bin)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _check_tree(obj: dict[str, Any] | list[Any], depth: int) -> None:
    """Reject nesting deeper than MAX_DEPTH and maps whose keys are not str."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
    if type(obj) is dict:
        for k in obj:
            if type(k) is not str:
                raise DecodeError(f"map key of type {type(k).__name__}, expected str")
        values: Any = obj.values()
    else:
        values = obj
    for v in values:
        t = type(v)
        if t is dict or t is list:
            _check_tree(v, depth + 1)


# For _scan, by msgpack type byte (fix* types are decoded from the byte itself): scalars ->
# bytes that follow; str/bin/ext -> (size of the length field, ext type byte); arrays/maps ->
# (size of the count field, objects per counted entry).
_SCALAR_SKIP: dict[int, int] = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8}
_SCALAR_SKIP.update({0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_SCALAR_SKIP.update({0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})  # fixext: type + data
_PAYLOAD_LEN: dict[int, tuple[int, int]] = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
}  # fmt: skip
_CONTAINER_LEN: dict[int, tuple[int, int]] = {
    0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2),
}  # fmt: skip


def _scan(data: bytes | bytearray | memoryview) -> None:
    """Walk msgpack headers only, before msgpack allocates anything.

    msgpack bounds each length by the input, but not the sum: a 64 MiB frame of empty arrays
    would become 4+ GiB of list objects. This walk touches at most MAX_ITEMS headers and
    rejects more objects than that, or nesting deeper than MAX_DEPTH.
    """
    n = len(data)
    pos = 0
    items = 0
    pending = [1]  # objects still to read in each open container; [0] is the top level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        items += 1
        if items > MAX_ITEMS:
            raise DecodeError(f"more than {MAX_ITEMS} objects")
        if pos >= n:
            raise DecodeError("bad msgpack: truncated")
        b = data[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0:
            continue
        count = -1
        if b <= 0x8F:
            count = (b & 0x0F) * 2
        elif b <= 0x9F:
            count = b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b in _SCALAR_SKIP:
            pos += _SCALAR_SKIP[b]
        elif b in _PAYLOAD_LEN:
            size, extra = _PAYLOAD_LEN[b]
            pos += size + extra + int.from_bytes(data[pos : pos + size], "big")
        elif b in _CONTAINER_LEN:
            size, per = _CONTAINER_LEN[b]
            count = int.from_bytes(data[pos : pos + size], "big") * per
            pos += size
        else:
            raise DecodeError(f"bad msgpack: reserved type byte 0x{b:02x}")
        if count >= 0:
            if len(pending) > MAX_DEPTH:
                raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
            pending.append(count)


def unpack_map(data: bytes | bytearray | memoryview, *, max_size: int) -> dict[str, Any]:
    """Decode one msgpack map from exactly `data`.

    Raises FrameTooLarge if `data` is longer than `max_size`, DecodeError for anything else
    that is not a single str-keyed map within the nesting limit.
    """
    n = len(data)
    if n > max_size:
        raise FrameTooLarge(f"{n} bytes exceeds the limit of {max_size}")
    _scan(data)
    try:
        # Every length inside is bounded by the input, so a hostile prefix cannot allocate
        # more than a small multiple of what was actually received.
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise DecodeError(f"bad msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"top level is {type(obj).__name__}, expected a map")
    _check_tree(obj, 1)
    return obj


# --- value checks (for list items and nested values) -------------------------------------------


def _fail(field: str, what: str, value: Any) -> NoReturn:
    raise DecodeError(f"field {field!r}: expected {what}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (str, bytes, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def as_str(value: Any, field: str, *, max_len: int, min_len: int = 0) -> str:
    if type(value) is not str:
        _fail(field, "str", value)
    if not min_len <= len(value) <= max_len:
        _fail(field, f"str of length {min_len}..{max_len}", value)
    return value


def as_int(value: Any, field: str, *, min: int, max: int) -> int:
    # bool is an int subclass; msgpack true/false must not pass as 1/0.
    if type(value) is not int:
        _fail(field, "int", value)
    if not min <= value <= max:
        _fail(field, f"int in [{min}, {max}]", value)
    return value


def as_float(
    value: Any, field: str, *, min: float, max: float, min_exclusive: bool = False
) -> float:
    """A finite float (ints accepted) in [min, max], or (min, max] with min_exclusive."""
    if type(value) is int:
        value = float(value)
    elif type(value) is not float:
        _fail(field, "float", value)
    number: float = value
    too_low = number <= min if min_exclusive else number < min
    if not math.isfinite(number) or too_low or number > max:
        lo = "(" if min_exclusive else "["
        _fail(field, f"finite float in {lo}{min}, {max}]", number)
    return number


def as_bytes(value: Any, field: str, *, max_len: int, min_len: int = 0) -> bytes:
    if type(value) is not bytes:
        _fail(field, "bytes", value)
    if not min_len <= len(value) <= max_len:
        _fail(field, f"bytes of length {min_len}..{max_len}", value)
    return value


def as_list(value: Any, field: str, *, max_len: int) -> list[Any]:
    if type(value) is not list:
        _fail(field, "list", value)
    if len(value) > max_len:
        _fail(field, f"list of at most {max_len} items", value)
    return value


def as_map(value: Any, field: str) -> dict[str, Any]:
    # Keys were already checked to be str by unpack_map's tree walk.
    if type(value) is not dict:
        _fail(field, "map", value)
    return value


# --- field readers ------------------------------------------------------------------------------


def _get(m: dict[str, Any], key: str) -> Any:
    value = m.get(key, _MISSING)
    if value is _MISSING:
        raise DecodeError(f"missing field {key!r}")
    return value


def get_str(m: dict[str, Any], key: str, *, max_len: int, min_len: int = 0) -> str:
    value = m.get(key)
    if type(value) is str and min_len <= len(value) <= max_len:
        return value
    return as_str(_get(m, key), key, max_len=max_len, min_len=min_len)


def get_int(m: dict[str, Any], key: str, *, min: int, max: int) -> int:
    value = m.get(key)
    if type(value) is int and min <= value <= max:
        return value
    return as_int(_get(m, key), key, min=min, max=max)


def get_float(
    m: dict[str, Any], key: str, *, min: float, max: float, min_exclusive: bool = False
) -> float:
    return as_float(_get(m, key), key, min=min, max=max, min_exclusive=min_exclusive)


def get_bytes(m: dict[str, Any], key: str, *, max_len: int, min_len: int = 0) -> bytes:
    value = m.get(key)
    if type(value) is bytes and min_len <= len(value) <= max_len:
        return value
    return as_bytes(_get(m, key), key, max_len=max_len, min_len=min_len)


def get_list(m: dict[str, Any], key: str, *, max_len: int) -> list[Any]:
    return as_list(_get(m, key), key, max_len=max_len)


def get_map(m: dict[str, Any], key: str) -> dict[str, Any]:
    return as_map(_get(m, key), key)


# Optional fields: absent or nil both read as None.


def get_opt_str(m: dict[str, Any], key: str, *, max_len: int, min_len: int = 0) -> str | None:
    value = m.get(key)
    return None if value is None else as_str(value, key, max_len=max_len, min_len=min_len)


def get_opt_int(m: dict[str, Any], key: str, *, min: int, max: int) -> int | None:
    value = m.get(key)
    return None if value is None else as_int(value, key, min=min, max=max)


def get_opt_float(
    m: dict[str, Any], key: str, *, min: float, max: float, min_exclusive: bool = False
) -> float | None:
    value = m.get(key)
    if value is None:
        return None
    return as_float(value, key, min=min, max=max, min_exclusive=min_exclusive)


def get_opt_list(m: dict[str, Any], key: str, *, max_len: int) -> list[Any] | None:
    value = m.get(key)
    return None if value is None else as_list(value, key, max_len=max_len)
