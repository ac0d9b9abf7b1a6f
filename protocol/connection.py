"""One forward stream's conversation, sans-I/O: the frame decoder plus the session's rules.

Like h11's Connection: the I/O layer hands what it reads to `receive_data()`, takes what
arrived from `next_event()` (a message, or None until more bytes come), and writes the bytes
`send()` returns. No sockets, no clocks: deadlines are the caller's.

The conversation (see protocol.forward):

    client -> server: OpenSession, then Step*, then CloseSession (or the stream closes)
    server -> client: SessionOpened or ErrorReply answering the OpenSession, then one
                      StepResult or ErrorReply per Step, carrying that Step's number

States (`ConnectionState`), the same names on both sides:

    IDLE      no session: nothing sent yet (client); waiting for an OpenSession (server, and
              again after refusing one: the client may ask again)
    OPENING   an OpenSession awaits its answer
    OPEN      the session is open and no Step is in flight
    STEPPING  a Step awaits its answer (one at a time)
    REFUSED   client only: the server refused the session; only CloseSession is left to send
    CLOSED    CloseSession sent (client) or received (server): nothing more, either way
    FAILED    framing is lost (FramingLost, an oversized frame past the discard limit):
              close the stream

What each side may send (anything else raises LocalProtocolError and changes nothing):

    client  OpenSession first and once (IDLE); a Step only in OPEN, so only after
            SessionOpened and with the previous Step answered; CloseSession in any state
            but CLOSED, and nothing after it
    server  only answers, in order, each one once: SessionOpened or ErrorReply(step=None)
            to an OpenSession, StepResult or ErrorReply with the Step's number to a Step,
            ErrorReply to a bad frame (step None) or to a message out of order (the Step's
            number when it was a Step); nothing after CloseSession; next_event() refuses to
            read the next request while an answer is owed

What each side accepts is reported by next_event():

    a message that fits the state             returned; the state moves on
    a frame that does not decode              DecodeError, the frame dropped, the stream goes on
    a frame over max_frame (<= max_discard)   FrameTooLarge once its body has been skipped
    a frame over max_discard too              FramingLost (state FAILED), for good
    a well-formed message out of order        OutOfOrder, the message dropped, the state kept

A server answers the errors with an ErrorReply (DecodeError "malformed", FrameTooLarge
"too_large", OutOfOrder its `code`: "bad_request", or "no_session" for a Step before any
session) and goes on. A client treats any of them as the peer failing; an ErrorReply with
step None is the server's session-level answer (it answers the request in flight, if any).
With `expect_shape`, a StepResult whose tensor has another shape raises UnexpectedShape.
"""

from __future__ import annotations

import contextlib
import enum

from protocol.errors import ProtocolError
from protocol.forward import (
    DEFAULT_MAX_FRAME,
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
    FramingLost,
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    OPEN = "open"
    STEPPING = "stepping"
    REFUSED = "refused"
    CLOSED = "closed"
    FAILED = "failed"


class OutOfOrder(ProtocolError):
    """The peer sent a well-formed message that the conversation's state forbids; it was
    dropped and the state is unchanged. `code` is what a server answers; `step` the number
    its ErrorReply carries (the Step's own, when the message was a Step)."""

    code = "bad_request"

    def __init__(
        self, message: str, msg: Message, *, code: str = "bad_request", step: int | None = None
    ) -> None:
        super().__init__(message)
        self.msg = msg
        self.code = code
        self.step = step


class UnexpectedShape(ProtocolError):
    """A StepResult answered the Step in flight, but its tensor is not the shape expected."""

    code = "wrong_shape"

    def __init__(self, msg: StepResult, expected: tuple[int, ...]) -> None:
        super().__init__(f"returned shape {list(msg.hidden.shape)}, expected {list(expected)}")
        self.msg = msg
        self.expected = expected


class LocalProtocolError(ProtocolError):
    """Our side tried something the conversation's state forbids (a bug in the caller);
    nothing was encoded and the state is unchanged."""

    code = "local"


_S = ConnectionState

# What a server owes: the answer to an OpenSession, to Step n, or an ErrorReply (step n or
# None) to a bad frame or a message out of order.
_OPEN, _STEP, _ERROR = "open", "step", "error"


def _describe(msg: Message) -> str:
    name = type(msg).__name__
    if isinstance(msg, Step | StepResult):
        return f"{name} for step {msg.step}"
    if isinstance(msg, ErrorReply):
        return f"{name} {msg.code!r}" + ("" if msg.step is None else f" for step {msg.step}")
    return name


class ForwardConnection:
    """One side (`role`) of one forward-protocol stream. Frames as in protocol.forward, with
    one oversize rule (FrameDecoder): over `max_frame` is skipped and reported, over
    `max_discard` too fails for good."""

    __slots__ = ("_expect", "_in_flight", "_owed", "_state", "frames", "role")

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_discard: int = DEFAULT_MAX_DISCARD,
    ) -> None:
        self.role = role
        # The framing layer under the rules. Reading it directly skips them (and leaves the
        # state where it was): only for tools and tests that break the rules on purpose.
        self.frames = FrameDecoder(max_frame, max_discard=max_discard)
        self._state = ConnectionState.IDLE
        self._owed: tuple[str, int | None] | None = None  # server: the answer owed
        self._in_flight: int | None = None  # the Step awaiting its answer
        self._expect: tuple[int, ...] | None = None  # client: the shape its result must have

    def __repr__(self) -> str:
        return f"<ForwardConnection {self.role.value} {self._state.value}>"

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def step_in_flight(self) -> int | None:
        """The number of the Step awaiting its answer (sent by a client, received by a
        server), or None."""
        return self._in_flight

    @property
    def awaiting_reply(self) -> bool:
        """Client: a request awaits the server's answer. Server: an answer is owed."""
        if self.role is Role.SERVER:
            return self._owed is not None
        return self._state in (ConnectionState.OPENING, ConnectionState.STEPPING)

    @property
    def buffered(self) -> int:
        return self.frames.buffered

    def wanted(self, chunk: int = 1 << 16) -> int:
        """How many bytes to read next (FrameDecoder.wanted); 0: call next_event() first."""
        if self._state is ConnectionState.CLOSED:
            return chunk  # read only to be dropped
        return self.frames.wanted(chunk)

    # --- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer. Never raises: problems are reported by next_event(), in order."""
        if self._state is ConnectionState.CLOSED:
            return  # the conversation is over; whatever follows is not read
        with contextlib.suppress(FramingLost):  # the decoder keeps it; next_event() raises it
            self.frames.feed(data)

    def next_event(self) -> Message | None:
        """The next message the peer sent, or None until more bytes are received (always
        None once CLOSED). Raises the ProtocolErrors listed in the module docstring."""
        if self._state is ConnectionState.CLOSED:
            return None
        server = self.role is Role.SERVER
        if server and self._owed is not None:
            raise LocalProtocolError(
                f"answer the {self._owed[0]} request before reading the next message"
            )
        try:
            msg = self.frames.next_message()
        except FramingLost:
            self._state = ConnectionState.FAILED
            self._owed = self._in_flight = self._expect = None
            raise
        except ProtocolError:  # DecodeError, or FrameTooLarge for a skipped frame
            if server:
                self._owed = (_ERROR, None)
            raise
        if msg is None:
            return None
        return self._server_receive(msg) if server else self._client_receive(msg)

    def _server_receive(self, msg: Message) -> Message:
        state = self._state  # IDLE or OPEN: any other state owes an answer, or returned above
        kind = type(msg)
        if kind is CloseSession:
            self._state = ConnectionState.CLOSED
            return msg
        if kind is OpenSession:
            if state is ConnectionState.IDLE:
                self._state, self._owed = ConnectionState.OPENING, (_OPEN, None)
                return msg
            self._owed = (_ERROR, None)
            raise OutOfOrder("a session is already open", msg)
        if isinstance(msg, Step):
            if state is ConnectionState.OPEN:
                self._state, self._owed = ConnectionState.STEPPING, (_STEP, msg.step)
                self._in_flight = msg.step
                return msg
            self._owed = (_ERROR, msg.step)
            raise OutOfOrder(
                "open a session before sending steps", msg, code="no_session", step=msg.step
            )
        self._owed = (_ERROR, None)
        raise OutOfOrder(f"unexpected {kind.__name__}", msg)

    def _client_receive(self, msg: Message) -> Message:
        state = self._state
        if isinstance(msg, SessionOpened) and state is ConnectionState.OPENING:
            self._state = ConnectionState.OPEN
            return msg
        if isinstance(msg, StepResult | ErrorReply) and (
            state is ConnectionState.STEPPING and msg.step == self._in_flight
        ):
            expected = self._expect
            self._state, self._in_flight, self._expect = ConnectionState.OPEN, None, None
            if isinstance(msg, StepResult) and expected is not None:  # noqa: SIM102
                if msg.hidden.shape != expected:
                    raise UnexpectedShape(msg, expected)
            return msg
        if isinstance(msg, ErrorReply) and msg.step is None and state is not ConnectionState.IDLE:
            # Session-level: it answers the request in flight, if there is one.
            if state is ConnectionState.OPENING:
                self._state = ConnectionState.REFUSED
            elif state is ConnectionState.STEPPING:
                self._state, self._in_flight, self._expect = ConnectionState.OPEN, None, None
            return msg
        waiting = {
            ConnectionState.IDLE: "no session was asked for",
            ConnectionState.OPENING: "waiting for SessionOpened",
            ConnectionState.OPEN: "no step in flight",
            ConnectionState.STEPPING: f"waiting for step {self._in_flight}",
            ConnectionState.REFUSED: "the session was refused",
        }.get(state, state.value)
        raise OutOfOrder(f"answered out of order: {_describe(msg)} while {waiting}", msg)

    # --- sending --------------------------------------------------------------------------

    def send(self, msg: Message, *, expect_shape: tuple[int, ...] | None = None) -> bytes:
        """The frame to write for `msg`, once the state allows it; LocalProtocolError if not.
        `expect_shape` (client, with a Step): the shape its StepResult's tensor must have."""
        if expect_shape is not None and not (self.role is Role.CLIENT and isinstance(msg, Step)):
            raise LocalProtocolError("expect_shape goes with a client's Step")
        if self._state is ConnectionState.CLOSED:
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: the session is closed")
        if self.role is Role.CLIENT:
            return self._client_send(msg, expect_shape)
        return self._server_send(msg)

    def _refuse(self, msg: Message, why: str) -> LocalProtocolError:
        return LocalProtocolError(
            f"{self.role.value} cannot send {_describe(msg)} in state {self._state.value}: {why}"
        )

    def _client_send(self, msg: Message, expect_shape: tuple[int, ...] | None) -> bytes:
        state = self._state
        if isinstance(msg, OpenSession):
            if state is not ConnectionState.IDLE:
                raise self._refuse(msg, "OpenSession comes first, and once")
            data = encode_frame(msg)
            self._state = ConnectionState.OPENING
            return data
        if isinstance(msg, Step):
            if state is ConnectionState.STEPPING:
                raise self._refuse(msg, f"step {self._in_flight} is not answered yet")
            if state is not ConnectionState.OPEN:
                raise self._refuse(msg, "steps go only in an open session")
            data = encode_frame(msg)
            self._state, self._in_flight = ConnectionState.STEPPING, msg.step
            self._expect = None if expect_shape is None else tuple(expect_shape)
            return data
        if isinstance(msg, CloseSession):
            data = encode_frame(msg)
            self._state, self._in_flight, self._expect = ConnectionState.CLOSED, None, None
            return data
        raise self._refuse(msg, "a client sends OpenSession, Step and CloseSession only")

    def _server_send(self, msg: Message) -> bytes:
        owed = self._owed
        if self._state is ConnectionState.FAILED:
            raise self._refuse(msg, "framing is lost")
        if not isinstance(msg, SessionOpened | StepResult | ErrorReply):
            raise self._refuse(msg, "a server sends SessionOpened, StepResult and ErrorReply only")
        if owed is None:
            raise self._refuse(msg, "a server only answers, and nothing awaits an answer")
        kind, step = owed
        if isinstance(msg, SessionOpened):
            if kind != _OPEN:
                raise self._refuse(msg, f"it owes the answer to a {kind} request")
            new = ConnectionState.OPEN
        elif isinstance(msg, StepResult):
            if kind != _STEP or msg.step != step:
                raise self._refuse(msg, self._owes(kind, step))
            new = ConnectionState.OPEN
        else:
            if msg.step != step:
                raise self._refuse(msg, self._owes(kind, step))
            new = {_OPEN: ConnectionState.IDLE, _STEP: ConnectionState.OPEN}.get(kind, self._state)
        data = encode_frame(msg)
        self._state, self._owed = new, None
        if kind == _STEP:
            self._in_flight = None
        return data

    @staticmethod
    def _owes(kind: str, step: int | None) -> str:
        if kind == _STEP:
            return f"it owes the answer to step {step}"
        if kind == _OPEN:
            return "it owes the answer to the OpenSession (an ErrorReply has step None)"
        return f"it owes an ErrorReply with step {step}"


__all__ = [
    "ConnectionState",
    "ForwardConnection",
    "LocalProtocolError",
    "OutOfOrder",
    "Role",
    "UnexpectedShape",
]
