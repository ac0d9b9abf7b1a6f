"""protocol.connection.ForwardConnection: every state transition and refusal on both roles,
the oversize rule of the FrameDecoder under it, and properties (any byte split gives the same
events; any sequence of messages gives only ProtocolErrors; a valid conversation round-trips
through a client and a server connection). Last, FramedStream (the I/O half) over a fake
stream: partial reads, the oversize rule, raw frames next to the connection's rules."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    ConnectionState,
    DecodeError,
    ForwardConnection,
    FrameTooLarge,
    FramingLost,
    LocalProtocolError,
    OutOfOrder,
    ProtocolError,
    Role,
    UnexpectedShape,
)
from protocol.codec import pack
from protocol.forward import (
    FRAME_PREFIX_LEN,
    CloseSession,
    ErrorReply,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    encode_frame,
)
from protocol.frames import (
    DEFAULT_MAX_DISCARD,
    FrameDecoder,
)
from protocol.tensors import TensorFrame

S = ConnectionState
CLIENT, SERVER = Role.CLIENT, Role.SERVER

T = TensorFrame("float32", (1, 1, 2), bytes(range(8)))
T2 = TensorFrame("float32", (1, 2, 1), bytes(range(8)))
OPEN = OpenSession("tiny@ab12", 0, 4, 64, "float32", 1)
OPENED = SessionOpened("s-1", 64, 1000)
CLOSE = CloseSession()


def step(n: int, t: TensorFrame = T) -> Step:
    return Step(step=n, position=n, hidden=t)


def result(n: int, t: TensorFrame = T) -> StepResult:
    return StepResult(step=n, hidden=t, elapsed_ms=1.0)


def err(code: str = "position", n: int | None = None) -> ErrorReply:
    return ErrorReply(code=code, message="m", step=n)


def frames(*msgs: Message) -> bytes:
    return b"".join(encode_frame(m) for m in msgs)


def incoming(conn: ForwardConnection, msg: Message) -> Message | None:
    conn.receive_data(encode_frame(msg))
    return conn.next_event()


def refused(conn: ForwardConnection, msg: Message, **kw: Any) -> None:
    """A send the state forbids: LocalProtocolError, and the state is left as it was."""
    before = (conn.state, conn.step_in_flight, conn.awaiting_reply)
    with pytest.raises(LocalProtocolError):
        conn.send(msg, **kw)
    assert (conn.state, conn.step_in_flight, conn.awaiting_reply) == before


def out_of_order(conn: ForwardConnection, msg: Message) -> OutOfOrder:
    """A message the state forbids: OutOfOrder, the message dropped, the state kept."""
    before = (conn.state, conn.step_in_flight)
    conn.receive_data(encode_frame(msg))
    with pytest.raises(OutOfOrder) as info:
        conn.next_event()
    assert info.value.msg == msg
    assert (conn.state, conn.step_in_flight) == before
    assert conn.buffered == 0
    return info.value


# --- client ---------------------------------------------------------------------------------


def client_in(state: ConnectionState) -> ForwardConnection:
    c = ForwardConnection(CLIENT)
    if state is S.IDLE:
        return c
    c.send(OPEN)
    if state is S.OPENING:
        return c
    if state is S.REFUSED:
        assert incoming(c, err("kv_budget")) == err("kv_budget")
        return c
    assert incoming(c, OPENED) == OPENED
    if state is S.OPEN:
        return c
    c.send(step(1))
    assert state is S.STEPPING
    return c


def test_client_starts_idle() -> None:
    c = ForwardConnection(CLIENT)
    assert c.role is CLIENT and c.state is S.IDLE
    assert not c.awaiting_reply and c.step_in_flight is None and c.buffered == 0
    assert "client idle" in repr(c)


def test_client_open_first_and_once() -> None:
    c = ForwardConnection(CLIENT)
    assert c.send(OPEN) == encode_frame(OPEN)
    assert c.state is S.OPENING and c.awaiting_reply
    refused(c, OPEN)
    for state in (S.OPEN, S.STEPPING, S.REFUSED):
        refused(client_in(state), OPEN)


@pytest.mark.parametrize("state", [S.IDLE, S.OPENING, S.REFUSED])
def test_client_steps_only_in_an_open_session(state: ConnectionState) -> None:
    refused(client_in(state), step(1))


def test_client_opened() -> None:
    c = client_in(S.OPENING)
    assert incoming(c, OPENED) == OPENED
    assert c.state is S.OPEN and not c.awaiting_reply


def test_client_refused_session() -> None:
    c = client_in(S.OPENING)
    assert incoming(c, err("too_many_sessions")) == err("too_many_sessions")
    assert c.state is S.REFUSED and not c.awaiting_reply
    refused(c, step(1))
    refused(c, OPEN)
    out_of_order(c, OPENED)
    out_of_order(c, result(1))
    # A session-level error answers nothing and is still the server's to send.
    assert incoming(c, err("draining")) == err("draining")
    assert c.send(CLOSE) == encode_frame(CLOSE) and c.state is S.CLOSED


@pytest.mark.parametrize("msg", [result(1), err("position", 1), OPEN, step(1), CLOSE])
def test_client_opening_rejects_anything_but_an_answer(msg: Message) -> None:
    out_of_order(client_in(S.OPENING), msg)


def test_client_one_step_at_a_time() -> None:
    c = client_in(S.OPEN)
    assert c.send(step(5)) == encode_frame(step(5))
    assert c.state is S.STEPPING and c.step_in_flight == 5 and c.awaiting_reply
    refused(c, step(6))
    assert incoming(c, result(5)) == result(5)
    assert c.state is S.OPEN and c.step_in_flight is None
    # Numbers need not increase: only one Step is ever in flight, and its answer names it.
    c.send(step(2))
    assert incoming(c, result(2)) == result(2)


def test_client_wrong_step_number_is_out_of_order() -> None:
    c = client_in(S.STEPPING)
    e = out_of_order(c, result(2))
    assert "out of order" in str(e) and "step 2" in str(e) and "waiting for step 1" in str(e)
    out_of_order(c, err("position", 7))
    assert incoming(c, result(1)) == result(1) and c.state is S.OPEN


def test_client_error_answers_the_step() -> None:
    c = client_in(S.STEPPING)
    assert incoming(c, err("position", 1)) == err("position", 1)
    assert c.state is S.OPEN and c.step_in_flight is None
    # A session-level error (an oversized or undecodable Step) answers it too.
    c.send(step(2))
    assert incoming(c, err("too_large")) == err("too_large")
    assert c.state is S.OPEN and c.step_in_flight is None


def test_client_open_session_level_error_and_unsolicited_answers() -> None:
    c = client_in(S.OPEN)
    assert incoming(c, err("malformed")) == err("malformed")
    assert c.state is S.OPEN
    out_of_order(c, err("position", 3))
    out_of_order(c, result(1))
    out_of_order(c, OPENED)


@pytest.mark.parametrize("msg", [OPENED, result(1), err("x"), err("x", 1), OPEN, step(1), CLOSE])
def test_client_idle_accepts_nothing(msg: Message) -> None:
    out_of_order(client_in(S.IDLE), msg)


@pytest.mark.parametrize("msg", [OPEN, step(1), CLOSE])
def test_client_rejects_client_messages(msg: Message) -> None:
    out_of_order(client_in(S.STEPPING), msg)


@pytest.mark.parametrize("msg", [OPENED, result(1), err("x"), err("x", 1)])
def test_client_never_sends_server_messages(msg: Message) -> None:
    for state in (S.IDLE, S.OPENING, S.OPEN, S.STEPPING):
        refused(client_in(state), msg)


def test_client_expected_shape() -> None:
    c = client_in(S.OPEN)
    c.send(step(1), expect_shape=T.shape)
    assert incoming(c, result(1)) == result(1)
    c.send(step(2), expect_shape=T.shape)
    c.receive_data(encode_frame(result(2, T2)))
    with pytest.raises(UnexpectedShape, match=r"returned shape \[1, 2, 1\]") as info:
        c.next_event()
    assert info.value.msg == result(2, T2) and info.value.expected == T.shape
    assert c.state is S.OPEN  # answered, wrongly: the caller gives up on the peer
    # Without an expected shape any shape goes; the expectation is per step.
    c.send(step(3))
    assert incoming(c, result(3, T2)) == result(3, T2)
    c.send(step(4), expect_shape=T.shape)
    assert incoming(c, err("position", 4)) == err("position", 4)  # errors have no tensor


def test_expect_shape_goes_with_a_clients_step() -> None:
    refused(client_in(S.IDLE), OPEN, expect_shape=(1,))
    refused(client_in(S.OPEN), CLOSE, expect_shape=(1,))
    s = server_in(S.STEPPING)
    refused(s, result(1), expect_shape=(1,))


@pytest.mark.parametrize("state", [S.IDLE, S.OPENING, S.OPEN, S.STEPPING, S.REFUSED])
def test_client_close_from_any_state_then_nothing(state: ConnectionState) -> None:
    c = client_in(state)
    assert c.send(CLOSE) == encode_frame(CLOSE)
    assert c.state is S.CLOSED and c.step_in_flight is None and not c.awaiting_reply
    for msg in (CLOSE, OPEN, step(9)):
        refused(c, msg)
    # Whatever arrives after close is not read, nor kept.
    c.receive_data(frames(result(1), OPENED) + b"\xff" * 9)
    assert c.next_event() is None and c.buffered == 0 and c.state is S.CLOSED


def test_client_framing_lost() -> None:
    c = ForwardConnection(CLIENT, max_frame=100, max_discard=1000)
    c.send(OPEN)
    c.receive_data(encode_frame(OPENED) + struct.pack(">I", 1001) + b"x" * 50)
    assert c.next_event() == OPENED  # what came before the bad prefix is delivered
    with pytest.raises(FramingLost):
        c.next_event()
    assert c.state is S.FAILED and c.buffered == 0
    with pytest.raises(FramingLost):
        c.next_event()
    refused(c, step(1))
    # The stream may still be closed politely: our own framing is intact.
    assert c.send(CLOSE) == encode_frame(CLOSE) and c.state is S.CLOSED


# --- server ---------------------------------------------------------------------------------


def server_in(state: ConnectionState) -> ForwardConnection:
    s = ForwardConnection(SERVER)
    if state is S.IDLE:
        return s
    assert incoming(s, OPEN) == OPEN
    if state is S.OPENING:
        return s
    s.send(OPENED)
    if state is S.OPEN:
        return s
    assert incoming(s, step(1)) == step(1)
    assert state is S.STEPPING
    return s


def test_server_starts_idle() -> None:
    s = ForwardConnection(SERVER)
    assert s.role is SERVER and s.state is S.IDLE and not s.awaiting_reply


def test_server_open_then_opened() -> None:
    s = server_in(S.OPENING)
    assert s.awaiting_reply
    refused(s, result(1))
    refused(s, err("x", 1))  # an open's refusal is session-level: step None
    assert s.send(OPENED) == encode_frame(OPENED)
    assert s.state is S.OPEN and not s.awaiting_reply
    refused(s, OPENED)  # answered once


def test_server_refused_open_may_be_asked_again() -> None:
    s = server_in(S.OPENING)
    assert s.send(err("kv_budget")) == encode_frame(err("kv_budget"))
    assert s.state is S.IDLE and not s.awaiting_reply
    assert incoming(s, OPEN) == OPEN and s.state is S.OPENING


def test_server_reads_nothing_while_an_answer_is_owed() -> None:
    s = server_in(S.OPEN)
    s.receive_data(frames(step(1), step(2)))  # pipelined: taken one at a time
    assert s.next_event() == step(1)
    with pytest.raises(LocalProtocolError):
        s.next_event()
    s.send(result(1))
    assert s.next_event() == step(2) and s.step_in_flight == 2


def test_server_step_answers() -> None:
    s = server_in(S.STEPPING)
    assert s.step_in_flight == 1 and s.awaiting_reply
    refused(s, result(2))
    refused(s, err("position", 2))
    refused(s, err("position"))  # a Step's error carries its number
    refused(s, OPENED)
    assert s.send(result(1)) == encode_frame(result(1))
    assert s.state is S.OPEN and s.step_in_flight is None and not s.awaiting_reply
    refused(s, result(1))
    assert incoming(s, step(2)) == step(2)
    assert s.send(err("position", 2)) == encode_frame(err("position", 2))
    assert s.state is S.OPEN


def test_server_second_open_is_bad_request() -> None:
    s = server_in(S.OPEN)
    e = out_of_order(s, OPEN)
    assert (e.code, e.step, str(e)) == ("bad_request", None, "a session is already open")
    assert s.awaiting_reply
    refused(s, OPENED)
    refused(s, err("bad_request", 1))
    s.send(err(e.code))
    assert s.state is S.OPEN and not s.awaiting_reply


def test_server_step_before_a_session_is_no_session() -> None:
    s = server_in(S.IDLE)
    e = out_of_order(s, step(7))
    assert (e.code, e.step) == ("no_session", 7)
    refused(s, err("no_session"))  # the answer carries the Step's number
    refused(s, result(7))
    s.send(err("no_session", 7))
    assert s.state is S.IDLE and not s.awaiting_reply


@pytest.mark.parametrize("msg", [OPENED, result(1), err("x"), err("x", 3)])
def test_server_rejects_server_messages(msg: Message) -> None:
    for state in (S.IDLE, S.OPEN):
        s = server_in(state)
        e = out_of_order(s, msg)
        assert (e.code, e.step) == ("bad_request", None)
        assert str(e) == f"unexpected {type(msg).__name__}"
        s.send(err("bad_request"))
        assert s.state is state


@pytest.mark.parametrize("msg", [OPEN, step(1), CLOSE])
def test_server_never_sends_client_messages(msg: Message) -> None:
    for state in (S.OPENING, S.STEPPING):
        refused(server_in(state), msg)


def test_server_sends_nothing_unasked() -> None:
    for state in (S.IDLE, S.OPEN):
        s = server_in(state)
        for msg in (OPENED, result(1), err("x"), err("x", 1)):
            refused(s, msg)


def test_server_bad_frame_then_goes_on() -> None:
    s = server_in(S.OPEN)
    junk = pack({"t": "nope"})
    s.receive_data(struct.pack(">I", len(junk)) + junk + encode_frame(step(1)))
    with pytest.raises(DecodeError):
        s.next_event()
    assert s.awaiting_reply and s.state is S.OPEN
    refused(s, err("malformed", 1))
    s.send(err("malformed"))
    assert s.next_event() == step(1)


def test_server_oversized_frame_skipped_then_goes_on() -> None:
    s = ForwardConnection(SERVER, max_frame=100, max_discard=1000)
    s.receive_data(encode_frame(OPEN))
    s.next_event()
    s.send(OPENED)
    s.receive_data(struct.pack(">I", 500))
    for _ in range(10):
        assert s.next_event() is None
        s.receive_data(b"\x00" * 50)
        assert s.buffered == 0  # the body is dropped as it comes
    s.receive_data(encode_frame(step(1)))
    with pytest.raises(FrameTooLarge, match="500 bytes exceeds the limit of 100") as info:
        s.next_event()
    assert not isinstance(info.value, FramingLost) and s.state is S.OPEN
    s.send(err("too_large"))
    assert s.next_event() == step(1)


def test_server_framing_lost() -> None:
    s = ForwardConnection(SERVER, max_frame=100, max_discard=1000)
    s.receive_data(struct.pack(">I", 1001))
    with pytest.raises(FramingLost, match="discard limit of 1000"):
        s.next_event()
    assert s.state is S.FAILED and not s.awaiting_reply
    refused(s, err("too_large"))
    s.receive_data(encode_frame(OPEN))
    with pytest.raises(FramingLost):
        s.next_event()
    assert s.buffered == 0


@pytest.mark.parametrize("state", [S.IDLE, S.OPEN])
def test_server_close_then_nothing(state: ConnectionState) -> None:
    s = server_in(state)
    s.receive_data(frames(CLOSE, step(1)))
    assert s.next_event() == CLOSE and s.state is S.CLOSED
    assert s.next_event() is None and s.buffered <= len(encode_frame(step(1)))
    s.receive_data(frames(OPEN))
    assert s.next_event() is None
    for msg in (err("x"), OPENED, result(1)):
        refused(s, msg)


# --- the oversize rule and buffering (FrameDecoder) -----------------------------------------


def drain(dec: FrameDecoder) -> list[object]:
    out: list[object] = []
    while True:
        try:
            msg = dec.next_message()
        except FramingLost:
            out.append(FramingLost)
            return out
        except FrameTooLarge:
            out.append(FrameTooLarge)
            continue
        except DecodeError:
            out.append(DecodeError)
            continue
        if msg is None:
            return out
        out.append(msg)


def test_decoder_default_fails_on_any_oversized_frame() -> None:
    dec = FrameDecoder(max_frame=10)
    assert dec.max_discard == 0
    with pytest.raises(FramingLost):
        dec.feed(struct.pack(">I", 11))
    assert dec.failed and isinstance(FramingLost("x"), FrameTooLarge)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_decoder_skips_oversized_frames_in_order(chunk: int) -> None:
    stream = (
        encode_frame(OPEN)
        + struct.pack(">I", 300)
        + b"\xff" * 300  # an oversized body that looks like prefixes: it must be skipped
        + encode_frame(step(1))
        + struct.pack(">I", 2000)  # past the discard limit: the end
        + encode_frame(CLOSE)
    )
    dec = FrameDecoder(max_frame=100, max_discard=1000)
    got: list[object] = []
    for i in range(0, len(stream), chunk):
        try:
            dec.feed(stream[i : i + chunk])
        except FramingLost:
            got.append(FramingLost)
            break
        got += drain(dec)
        assert dec.buffered <= FRAME_PREFIX_LEN + 100
        if FramingLost in got:
            break
    assert got == [OPEN, FrameTooLarge, step(1), FramingLost]
    assert dec.failed and dec.buffered == 0


def test_decoder_skipping_allocates_nothing() -> None:
    body = b"\x00" * (1 << 16)
    dec = FrameDecoder(max_frame=1024, max_discard=1 << 24)
    tracemalloc.start()
    try:
        dec.feed(struct.pack(">I", 1 << 23))
        for _ in range(128):
            dec.feed(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64_000 and dec.buffered == 0
    with pytest.raises(FrameTooLarge):
        dec.next_message()


def test_decoder_keeps_no_view_of_mutable_input() -> None:
    buf = bytearray(encode_frame(step(1)))
    dec = FrameDecoder(max_frame=1 << 10)
    dec.feed(buf)
    buf[:] = b"\x00" * len(buf)
    assert dec.next_message() == step(1)
    view = memoryview(bytes(encode_frame(result(2))))  # read-only over bytes: kept as is
    dec.feed(view)
    assert dec.next_message() == result(2)


def test_decoder_wanted() -> None:
    dec = FrameDecoder(max_frame=1 << 20, max_discard=1 << 22)
    assert dec.wanted(1 << 16) == 1 << 16  # nothing in progress: a chunk
    dec.feed(b"\x00\x08")
    assert dec.wanted(1 << 16) == 1 << 16
    dec.feed(b"\x00\x00")  # a frame of 512 KiB: its rest, in one read
    assert dec.wanted(1 << 16) == 512 * 1024
    dec.feed(b"\x00" * 1000)
    assert dec.wanted(1 << 16) == 512 * 1024 - 1000
    assert dec.wanted(1 << 30) == (1 << 20) + 4 - dec.buffered  # capped at one max frame
    dec.feed(b"\x00" * (512 * 1024 - 1000))
    assert dec.pending == 1 and dec.wanted() == 0  # take the frame first
    drain(dec)
    dec.feed(struct.pack(">I", 3 << 20))  # skipping: no more than one max frame a read
    assert dec.wanted(1 << 16) == (1 << 20) + 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    st.lists(st.integers(1, 5000), min_size=1, max_size=12),
    st.integers(1, 4096),
)
def test_reader_asking_wanted_never_buffers_past_one_frame(
    sizes: list[int], arrivals: list[int], chunk: int
) -> None:
    # Frames of any size (some over the limit: skipped) arrive in any pieces; a reader that
    # asks for wanted() bytes (getting fewer when fewer have arrived) and drains in between
    # never holds more than one max frame plus its prefix, and sees every frame in order.
    max_frame = 2048
    stream = b"".join(struct.pack(">I", n) + bytes([n % 251]) * n for n in sizes)
    dec = FrameDecoder(max_frame=max_frame, max_discard=1 << 20)
    pos, got, i = 0, 0, 0
    while pos < len(stream):
        n = min(dec.wanted(chunk), arrivals[i % len(arrivals)], len(stream) - pos)
        i += 1
        assert n > 0
        dec.feed(stream[pos : pos + n])
        pos += n
        assert dec.buffered <= FRAME_PREFIX_LEN + max_frame
        while True:
            try:
                if dec.next_message() is None:
                    break
            except ProtocolError:
                pass
            got += 1
    assert got == len(sizes) and dec.buffered == 0


# --- properties -----------------------------------------------------------------------------

MAX_FRAME, MAX_DISCARD = 512, 2048
PROPS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_tensors = st.builds(
    lambda shape: TensorFrame("float32", shape, bytes(4 * shape[0] * shape[1] * shape[2])),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4)),
)
_small_ints = st.integers(0, 6)
_messages: st.SearchStrategy[Message] = st.one_of(
    st.just(OPEN),
    st.builds(Step, _small_ints, _small_ints, _tensors),
    st.just(CLOSE),
    st.just(OPENED),
    st.builds(StepResult, _small_ints, _tensors, st.just(0.5)),
    st.builds(
        ErrorReply, st.sampled_from(["position", "busy"]), st.just("m"), st.none() | _small_ints
    ),
    # What the well-behaved client below may be waiting for: its steps are numbered 1, 2...
    st.builds(result, st.integers(1, 3), st.sampled_from([T, T, T2])),
)
_segments = st.lists(
    st.one_of(
        _messages.map(encode_frame),
        _messages.map(encode_frame),
        st.binary(max_size=40).map(lambda b: struct.pack(">I", len(b)) + b),  # junk bodies
        st.integers(MAX_FRAME + 1, MAX_DISCARD).map(lambda n: struct.pack(">I", n) + b"\0" * n),
        st.integers(MAX_DISCARD + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),  # fatal
        st.binary(min_size=1, max_size=12),  # raw bytes: framing goes where it goes
    ),
    max_size=10,
)


def _answer(conn: ForwardConnection, event: Message | ProtocolError, next_step: int) -> int:
    """What a well-behaved peer on `conn` does after each event (deterministic)."""
    if conn.role is SERVER:
        if isinstance(event, ProtocolError):
            conn.send(ErrorReply(event.code, str(event), getattr(event, "step", None)))
        elif isinstance(event, OpenSession):
            conn.send(OPENED)
        elif isinstance(event, Step):
            conn.send(StepResult(event.step, event.hidden, 0.0))
        return next_step
    if conn.state is S.OPEN:
        conn.send(step(next_step), expect_shape=T.shape)
        return next_step + 1
    return next_step


def drive(role: Role, chunks: list[bytes]) -> list[object]:
    """Feed `chunks` to a connection that answers like a good peer; the events, in order."""
    conn = ForwardConnection(role, max_frame=MAX_FRAME, max_discard=MAX_DISCARD)
    log: list[object] = []
    next_step = 1
    if role is CLIENT:
        conn.send(OPEN)
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except FramingLost:
                assert conn.state is S.FAILED and conn.buffered == 0
                log.append(("lost", conn.state))
                return log
            except ProtocolError as exc:
                assert not isinstance(exc, LocalProtocolError), exc
                log.append((type(exc).__name__, str(exc), conn.state))
                next_step = _answer(conn, exc, next_step)
                continue
            if event is None:
                break
            log.append((event, conn.state))
            next_step = _answer(conn, event, next_step)
        if conn.state is not S.CLOSED:  # after close, frames that came with it stay unread
            assert conn.buffered <= FRAME_PREFIX_LEN + MAX_FRAME
    log.append(("end", conn.state))
    return log


# The start of a good conversation, as the peer of drive()'s connection sends it.
GOOD = {
    CLIENT: [OPENED, result(1), err("position", 2), result(3), result(4, T2)],
    SERVER: [OPEN, step(1), step(2), CLOSE],
}


@PROPS
@given(
    st.sampled_from([CLIENT, SERVER]),
    st.integers(0, 5),
    _segments,
    st.lists(st.integers(1, 64), max_size=12),
)
def test_any_byte_split_gives_the_same_events(
    role: Role, good: int, segments: list[bytes], cuts: list[int]
) -> None:
    stream = frames(*GOOD[role][:good]) + b"".join(segments)
    pieces, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)] if cuts else 1
        pieces.append(stream[pos : pos + n])
        pos += n
        i += 1
    whole = drive(role, [stream])
    assert drive(role, pieces) == whole
    assert drive(role, [stream[j : j + 1] for j in range(len(stream))]) == whole


_actions = st.lists(
    st.one_of(
        st.tuples(st.just("send"), _messages, st.none() | st.just(T.shape)),
        st.tuples(st.just("recv"), _messages.map(encode_frame), st.none()),
        st.tuples(st.just("recv"), _segments.map(b"".join), st.none()),
    ),
    max_size=25,
)


@PROPS
@given(st.sampled_from([CLIENT, SERVER]), _actions)
def test_any_message_sequence_gives_only_protocol_errors(role: Role, actions: list[Any]) -> None:
    conn = ForwardConnection(role, max_frame=MAX_FRAME, max_discard=MAX_DISCARD)
    for kind, what, shape in actions:
        if kind == "send":
            before = (conn.state, conn.step_in_flight, conn.awaiting_reply)
            try:
                data = conn.send(what, expect_shape=shape)
            except LocalProtocolError:
                assert (conn.state, conn.step_in_flight, conn.awaiting_reply) == before
            else:
                assert data == encode_frame(what)
            continue
        conn.receive_data(what)
        for _ in range(100):
            try:
                if conn.next_event() is None:
                    break
            except ProtocolError:
                if conn.state is S.FAILED or conn.awaiting_reply:
                    break
        assert isinstance(conn.state, ConnectionState)
        if conn.role is CLIENT:
            assert conn.awaiting_reply == (conn.state in (S.OPENING, S.STEPPING))
            assert (conn.step_in_flight is not None) == (conn.state is S.STEPPING)
        else:
            assert conn.state is not S.REFUSED
            assert conn.awaiting_reply or conn.state not in (S.OPENING, S.STEPPING)


_conversations = st.tuples(
    st.booleans(),  # the server refuses the session
    st.lists(st.tuples(_tensors, st.booleans(), st.integers(0, 2**63 - 1)), max_size=6),
)


def _carry(msg: Message, sender: ForwardConnection, to: ForwardConnection, cut: int) -> Message:
    data = sender.send(msg, expect_shape=msg.hidden.shape if isinstance(msg, Step) else None)
    events: list[Message] = []
    for i in range(0, len(data), cut):
        to.receive_data(data[i : i + cut])
        # One message at a time (a server reads nothing more until it has answered).
        e = to.next_event()
        if e is not None:
            events.append(e)
    assert events == [msg]
    if not to.awaiting_reply:
        assert to.next_event() is None
    return events[0]


@PROPS
@given(_conversations, st.lists(st.integers(1, 200), min_size=1, max_size=8))
def test_a_valid_conversation_round_trips(conv: tuple[bool, list[Any]], cuts: list[int]) -> None:
    refuse, steps = conv
    client = ForwardConnection(CLIENT)
    server = ForwardConnection(SERVER)
    cut = iter(cuts * 20).__next__
    _carry(OPEN, client, server, cut())
    if refuse:
        _carry(err("kv_budget"), server, client, cut())
        assert (client.state, server.state) == (S.REFUSED, S.IDLE)
    else:
        _carry(OPENED, server, client, cut())
        assert client.state is server.state is S.OPEN
        for t, ok, n in steps:
            _carry(Step(n, 0, t), client, server, cut())
            assert client.state is server.state is S.STEPPING
            assert client.step_in_flight == server.step_in_flight == n
            _carry(StepResult(n, t, 2.0) if ok else err("position", n), server, client, cut())
            assert client.state is server.state is S.OPEN
    _carry(CLOSE, client, server, cut())
    assert client.state is server.state is S.CLOSED
    assert client.buffered == server.buffered == 0


# --- FramedStream: the I/O half over a fake stream ------------------------------------------


class FakeStream:
    """What FramedStream needs of a libp2p stream: read(n) returns at most n bytes (here
    fewer, as libp2p may), raises StreamEOF at the end; write() collects."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece, self.pos = data, piece, 0
        self.written = bytearray()
        self.reads: list[int] = []

    async def read(self, n: int | None = None) -> bytes:
        from libp2p.network.stream.exceptions import StreamEOF

        assert n is not None and n > 0
        self.reads.append(n)
        if self.pos >= len(self.data):
            raise StreamEOF("end")
        out = self.data[self.pos : self.pos + min(n, self.piece)]
        self.pos += len(out)
        return out

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        pass


def framed(data: bytes, piece: int = 1000, **kw: Any) -> tuple[Any, FakeStream]:
    from agent.net.framed import FramedStream

    fake = FakeStream(data, piece)
    return FramedStream(fake, **kw), fake  # type: ignore[arg-type]


async def test_framed_server_conversation() -> None:
    from agent.net.framed import FramedStream, StreamGone

    junk = pack({"t": "nope"})
    data = frames(OPEN, step(1)) + struct.pack(">I", len(junk)) + junk + frames(step(2), CLOSE)
    fs, fake = framed(data, piece=7, max_frame=1 << 20, role=SERVER)
    before = FramedStream.total_in
    assert await fs.next_event() == OPEN
    await fs.send_event(OPENED)
    assert await fs.next_event() == step(1)
    with pytest.raises(LocalProtocolError):
        await fs.next_event()  # step 1 is not answered
    await fs.send_event(result(1))
    with pytest.raises(DecodeError):
        await fs.next_event()
    await fs.send_event(err("malformed"))
    assert await fs.next_event() == step(2)
    await fs.send_event(err("position", 2))
    assert await fs.next_event() == CLOSE
    assert bytes(fake.written) == frames(OPENED, result(1), err("malformed"), err("position", 2))
    assert fs.bytes_in == len(data) == FramedStream.total_in - before
    assert fs.bytes_out == len(fake.written)
    with pytest.raises(StreamGone):  # nothing more is read after close: the stream ends
        await fs.next_event()


async def test_framed_oversized_frames() -> None:
    from agent.net.framed import StreamGone

    data = struct.pack(">I", 5000) + b"\x00" * 5000 + frames(step(1))
    data += struct.pack(">I", 1 << 20)
    fs, fake = framed(data, max_frame=1000, role=SERVER, max_discard=10_000)
    with pytest.raises(FrameTooLarge):
        await fs.next_event()
    await fs.send_event(err("too_large"))
    assert fs.bytes_in >= 5004  # the whole body was read (and dropped) before the report
    with pytest.raises(OutOfOrder):  # a Step with no session
        await fs.next_event()
    await fs.send_event(err("no_session", 1))
    with pytest.raises(StreamGone, match="discard limit"):
        await fs.next_event()
    # Reads never asked for more than one max frame plus a prefix.
    assert max(fake.reads) <= 1004


async def test_framed_raw_frames_leave_the_connection_alone() -> None:
    # A client speaking out of turn on purpose (the serving-limits tests do): raw frames
    # share the decoder, and the conversation's state goes on where it was.
    fs, fake = framed(frames(OPENED, err("bad_request"), result(1)), max_frame=1 << 20, role=CLIENT)
    await fs.send_event(OPEN)
    assert await fs.next_event() == OPENED
    await fs.send(OPEN)  # a second open: refused by the connection, sent raw
    assert await fs.receive() == err("bad_request")
    assert fs.conn.state is S.OPEN
    await fs.send_event(step(1), expect_shape=T.shape)
    assert await fs.next_event() == result(1)
    assert bytes(fake.written) == frames(OPEN, OPEN, step(1))
    with pytest.raises(LocalProtocolError):
        await fs.send_event(OPEN)


async def test_framed_without_a_role_is_raw() -> None:
    from agent.net.framed import StreamGone

    fs, _ = framed(frames(result(3), step(1)), piece=3, max_frame=1 << 20)
    assert fs.conn is None
    await fs.send_event(step(9))  # no rules without a role
    assert await fs.next_event() == result(3)
    assert await fs.receive() == step(1)
    with pytest.raises(StreamGone):
        await fs.receive()


def test_framed_default_discard_limit() -> None:
    from agent.net.framed import MAX_DISCARD

    assert MAX_DISCARD == DEFAULT_MAX_DISCARD == 256 * 1024 * 1024


async def test_framed_write_failure_is_stream_gone() -> None:
    from agent.net.framed import StreamGone

    fs, fake = framed(b"", max_frame=100, role=CLIENT)

    async def broken(data: bytes) -> None:
        raise OSError("reset")

    fake.write = broken  # type: ignore[method-assign]
    with pytest.raises(StreamGone, match="write failed"):
        await fs.send_event(OPEN)
