"""Tensor framing: a tensor travels as {"dtype", "shape", "data"} with raw little-endian bytes.

No array library is imported here; the agent converts TensorFrame to and from torch. Decoding
checks the claimed shape against the bytes actually received and never allocates from a claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.codec import as_int, as_map, get_bytes, get_list, get_str
from protocol.errors import DecodeError, FrameTooLarge

# Wire dtype name -> itemsize in bytes. bfloat16 travels as its raw 2-byte pattern.
WIRE_DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}

# Far above any real dimension; keeps shape arithmetic on small ints.
MAX_DIM = 1 << 40


@dataclass(frozen=True, slots=True)
class TensorFrame:
    """A dense tensor as raw little-endian, C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def tensor_to_wire(t: TensorFrame) -> dict[str, Any]:
    """The msgpack-ready map for `t` (data is passed through, not copied)."""
    return {"dtype": t.dtype, "shape": list(t.shape), "data": t.data}


def tensor_from_wire(obj: Any, *, max_bytes: int, max_dims: int = 4) -> TensorFrame:
    """Validate a decoded tensor map; DecodeError or FrameTooLarge if it does not hold up."""
    m = as_map(obj, "tensor")
    dtype = get_str(m, "dtype", max_len=16)
    itemsize = WIRE_DTYPES.get(dtype)
    if itemsize is None:
        raise DecodeError(f"field 'dtype': unknown tensor dtype {dtype!r}")
    raw_shape = get_list(m, "shape", max_len=max_dims)
    expected = itemsize
    for d in raw_shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            as_int(d, "shape", min=0, max=MAX_DIM)  # raises with the precise message
        expected *= d
    shape = tuple(raw_shape)
    data = get_bytes(m, "data", max_len=1 << 62)
    if len(data) > max_bytes:
        raise FrameTooLarge(f"tensor of {len(data)} bytes exceeds the limit of {max_bytes}")
    if expected != len(data):
        raise DecodeError(
            f"tensor {dtype}{list(shape)} needs {expected} bytes, frame carries {len(data)}"
        )
    return TensorFrame(dtype, shape, data)
