"""torch tensors to and from protocol TensorFrames: raw little-endian C-order bytes.

On the per-token path, so one copy each way and no serialisation library: bfloat16 travels as
its 2-byte pattern (numpy has no bfloat16, hence the int16 view on the way out).
"""

from __future__ import annotations

import torch

from protocol.tensors import WIRE_DTYPES, TensorFrame


class WireError(ValueError):
    """A tensor cannot be framed, or a frame does not describe a tensor."""


_TO_WIRE: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
}
_FROM_WIRE: dict[str, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}

# The wire is little-endian and torch's bytes are native: every host torch ships for (x86-64,
# aarch64) is little-endian, so no byte swapping is done.


def to_frame(t: torch.Tensor) -> TensorFrame:
    """The frame of `t` (copied to CPU and made contiguous if needed)."""
    name = _TO_WIRE.get(t.dtype)
    if name is None:
        raise WireError(
            f"tensor dtype {t.dtype} cannot travel; use one of {', '.join(WIRE_DTYPES)}"
        )
    c = t.detach()
    if c.device.type != "cpu":
        c = c.cpu()
    c = c.contiguous()
    if c.dtype == torch.bfloat16:
        c = c.view(torch.int16)
    return TensorFrame(name, tuple(t.shape), c.numpy().tobytes())


def from_frame(f: TensorFrame, *, device: torch.device | str) -> torch.Tensor:
    """A writable tensor on `device` holding the frame's values; WireError if inconsistent."""
    dtype = _FROM_WIRE.get(f.dtype)
    if dtype is None:
        raise WireError(f"unknown tensor dtype {f.dtype!r}")
    numel = 1
    for d in f.shape:
        if d < 0:
            raise WireError(f"negative dimension in shape {list(f.shape)}")
        numel *= d
    expected = numel * WIRE_DTYPES[f.dtype]
    if len(f.data) != expected:
        raise WireError(
            f"tensor {f.dtype}{list(f.shape)} needs {expected} bytes, frame carries {len(f.data)}"
        )
    if numel == 0:
        return torch.empty(f.shape, dtype=dtype, device=device)
    # bytearray: one copy that the tensor owns and may write (frombuffer on bytes is read-only).
    t = torch.frombuffer(bytearray(f.data), dtype=dtype).view(f.shape)
    return t.to(device)
