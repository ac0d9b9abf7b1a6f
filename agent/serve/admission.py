"""Serving admission, pure: may this session open, may this step run? No I/O, no torch.

Every forward request is checked here against the agent's limits and the session's state
before any work is done; a refusal is a `RequestRejected` that the stream handler turns into
an `ErrorReply`, and nothing changes. Tested without sockets (tests/test_admission.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import LimitsConfig
from protocol import OpenSession, Step

WIRE_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class RequestRejected(Exception):
    """A request that breaks a limit or does not fit: becomes an ErrorReply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServingState:
    """What admission needs to know about the serving part at the moment of a request."""

    loaded: bool
    draining: bool
    model_id: str
    span: tuple[int, int]
    open_sessions: int
    reserved_bytes: int
    kv_budget_bytes: int
    kv_free_tokens: int


def check_open(msg: OpenSession, state: ServingState, limits: LimitsConfig, need: int) -> None:
    """Refuse an OpenSession that the agent cannot or may not serve; `need` is the KV
    memory (bytes) the session would reserve."""
    if not state.loaded:
        raise RequestRejected("busy", "blocks are not loaded")
    if state.draining:
        raise RequestRejected("draining", "this peer is draining: its owner needs it")
    if msg.model_id != state.model_id:
        raise RequestRejected(
            "wrong_model", f"this peer serves {state.model_id}, not {msg.model_id}"
        )
    lo, hi = state.span
    if not lo <= msg.start < msg.end <= hi:
        raise RequestRejected(
            "span_not_served", f"blocks {msg.start}:{msg.end} are not within {lo}:{hi}"
        )
    if msg.dtype not in WIRE_FLOAT_DTYPES:
        # The wire dtype is the client's choice; blocks compute in the agent's --dtype.
        raise RequestRejected("wrong_dtype", f"hidden states must be one of {WIRE_FLOAT_DTYPES}")
    if msg.batch < 1 or msg.batch > limits.max_batch:
        raise RequestRejected("bad_request", f"batch must be 1..{limits.max_batch}")
    if msg.max_length < 1 or msg.max_length > limits.max_session_tokens:
        raise RequestRejected(
            "too_long", f"max_length must be 1..{limits.max_session_tokens} tokens"
        )
    if state.open_sessions >= limits.max_sessions:
        raise RequestRejected("too_many_sessions", f"{limits.max_sessions} sessions are open")
    if state.reserved_bytes + need > state.kv_budget_bytes:
        raise RequestRejected(
            "kv_budget",
            f"not enough KV-cache memory for {msg.batch}x{msg.max_length} tokens "
            f"({state.kv_free_tokens} tokens free)",
        )


@dataclass(frozen=True)
class SessionShape:
    """What a step must match: fixed when the session opened, plus its current length."""

    batch: int
    dtype: str
    max_length: int
    length: int  # tokens the session's cache holds


def check_step(msg: Step, shape: SessionShape, hidden_size: int) -> None:
    """Refuse a step whose tensor or position does not fit its session."""
    t = msg.hidden
    if t.dtype != shape.dtype:
        raise RequestRejected("wrong_dtype", f"hidden states must be {shape.dtype}")
    rows_ok = len(t.shape) == 3 and t.shape[0] == shape.batch and t.shape[1] >= 1
    if not rows_ok or t.shape[2] != hidden_size:
        raise RequestRejected(
            "wrong_shape",
            f"hidden states must be [{shape.batch}, tokens, {hidden_size}], got {list(t.shape)}",
        )
    if msg.position != shape.length:
        raise RequestRejected(
            "position",
            f"step at position {msg.position}, but the session holds {shape.length} tokens",
        )
    if msg.position + t.shape[1] > shape.max_length:
        raise RequestRejected(
            "too_long", f"positions beyond the session's max length {shape.max_length}"
        )
