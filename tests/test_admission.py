"""agent.serve.admission without sockets, torch or an agent: every refusal, in the order the
server checks them, and the requests that pass."""

from __future__ import annotations

import dataclasses

import pytest

from agent.config import LimitsConfig
from agent.serve.admission import (
    RequestRejected,
    ServingState,
    SessionShape,
    check_open,
    check_step,
)
from protocol import OpenSession, Step, TensorFrame

HIDDEN = 8
LIMITS = LimitsConfig(max_sessions=2, max_session_tokens=64, max_batch=4)
READY = ServingState(
    loaded=True,
    draining=False,
    model_id="tiny@abc",
    span=(2, 6),
    open_sessions=0,
    reserved_bytes=0,
    kv_budget_bytes=10_000,
    kv_free_tokens=100,
)
OPEN = OpenSession(model_id="tiny@abc", start=2, end=6, max_length=16, dtype="float32", batch=1)


def _code(fn: object, *args: object) -> str:
    with pytest.raises(RequestRejected) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


def test_a_request_that_fits_opens() -> None:
    check_open(OPEN, READY, LIMITS, need=10_000)  # exactly the budget still fits
    check_open(dataclasses.replace(OPEN, start=3, end=5, batch=4), READY, LIMITS, need=0)


@pytest.mark.parametrize(
    ("state", "msg", "need", "code"),
    [
        (dataclasses.replace(READY, loaded=False), OPEN, 0, "busy"),
        (dataclasses.replace(READY, draining=True), OPEN, 0, "draining"),
        (READY, dataclasses.replace(OPEN, model_id="other@1"), 0, "wrong_model"),
        (READY, dataclasses.replace(OPEN, start=1), 0, "span_not_served"),
        (READY, dataclasses.replace(OPEN, end=7), 0, "span_not_served"),
        (READY, dataclasses.replace(OPEN, dtype="int64"), 0, "wrong_dtype"),
        (READY, dataclasses.replace(OPEN, batch=5), 0, "bad_request"),
        (READY, dataclasses.replace(OPEN, max_length=65), 0, "too_long"),
        (dataclasses.replace(READY, open_sessions=2), OPEN, 0, "too_many_sessions"),
        (dataclasses.replace(READY, reserved_bytes=9_000), OPEN, 1_001, "kv_budget"),
    ],
)
def test_each_refusal_has_its_code(
    state: ServingState, msg: OpenSession, need: int, code: str
) -> None:
    assert _code(check_open, msg, state, LIMITS, need) == code


def test_not_loaded_wins_over_every_other_problem() -> None:
    # A peer still loading answers "busy" whatever else is wrong: clients retry elsewhere.
    bad = dataclasses.replace(OPEN, model_id="other@1", batch=99, max_length=10**6)
    assert _code(check_open, bad, dataclasses.replace(READY, loaded=False), LIMITS, 0) == "busy"


def _step(shape: tuple[int, ...], position: int = 0, dtype: str = "float32") -> Step:
    n = 1
    for d in shape:
        n *= d
    data = bytes(n * (4 if dtype == "float32" else 2))
    return Step(step=1, position=position, hidden=TensorFrame(dtype, shape, data))


SHAPE = SessionShape(batch=1, dtype="float32", max_length=16, length=3)


def test_a_step_that_fits_passes() -> None:
    check_step(_step((1, 1, HIDDEN), position=3), SHAPE, HIDDEN)
    check_step(_step((1, 13, HIDDEN), position=3), SHAPE, HIDDEN)  # up to max_length exactly


@pytest.mark.parametrize(
    ("step", "code"),
    [
        (_step((1, 1, HIDDEN), position=3, dtype="bfloat16"), "wrong_dtype"),
        (_step((2, 1, HIDDEN), position=3), "wrong_shape"),
        (_step((1, 0, HIDDEN), position=3), "wrong_shape"),
        (_step((1, 1, HIDDEN + 1), position=3), "wrong_shape"),
        (_step((1, HIDDEN), position=3), "wrong_shape"),
        (_step((1, 1, HIDDEN), position=2), "position"),
        (_step((1, 1, HIDDEN), position=4), "position"),
        (_step((1, 14, HIDDEN), position=3), "too_long"),
    ],
)
def test_each_bad_step_has_its_code(step: Step, code: str) -> None:
    assert _code(check_step, step, SHAPE, HIDDEN) == code
