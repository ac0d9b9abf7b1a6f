"""Guards for py-libp2p 0.8.1 flaws fixed upstream but not yet on the registry.

multistream-select (GHSA-hmjq-g7pp-rw3x, fixed in 0.8.2): `read_delim` trusts the varint
length a peer sends and reads until it has that many bytes. It runs before Noise, before the
swarm gate, on every new connection and every new stream, so a stranger with a TCP socket
could make us buffer what it claimed: measured on 0.8.1, one raw connection claiming 100 MB
took an agent from 96 to 380 MiB RSS before py-libp2p gave up. Protocol names are short, so
we cap a message at 64 KiB, as 0.8.2 does, and refuse a larger claim after its prefix.
Remove once the pinned libp2p carries the fix.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("shardmesh.mesh")

MAX_MULTISELECT_MESSAGE = 64 * 1024


def bound_multiselect_reads() -> None:
    """Make multistream-select refuse messages over MAX_MULTISELECT_MESSAGE (idempotent)."""
    import libp2p.protocol_muxer.multiselect_communicator as communicator
    from libp2p.exceptions import ParseError
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited

    if getattr(communicator.read_delim, "_shardmesh_bounded", False):
        return

    async def bounded_read_delim(reader: Any) -> bytes:
        # Same checks as libp2p.utils.read_delim, with the length bounded before the read;
        # MessageTooLarge is an IOException, which the communicator already turns into
        # MultiselectCommunicatorError (the negotiation fails, the connection closes).
        msg = await read_varint_prefixed_bytes_limited(reader, MAX_MULTISELECT_MESSAGE)
        if not msg:
            raise ParseError("`len(msg_bytes)` should not be 0")
        if msg[-1:] != b"\n":
            raise ParseError("multistream message is not delimited by a newline")
        return msg[:-1]

    bounded_read_delim._shardmesh_bounded = True  # type: ignore[attr-defined]
    communicator.read_delim = bounded_read_delim  # type: ignore[assignment]


# yamux (0.8.1): a peer that ignores flow control has its DATA frames kept anyway ("peer
# exceeded receive window" is only logged), and the swarm gate holds a stranger's streams
# unread: measured, 499 MB in 5 s from a peer without the secret. A stream may buffer no more
# than the window it was given (plus slack for frames in flight when a window update went
# out), and one connection no more than its budget in all; past either, the connection is
# closed (yamux's own error path for an OSError in its read loop).
#
# The budget: a connection a stranger opened to us may hold STRANGER_BUFFER bytes unread
# (limits.stranger_buffer_bytes) until the peer does something useful: proves the swarm
# secret, gossips a valid ad of its own, or opens a forward session (`trust`). Handlers read
# what they are sent, so honest traffic keeps little buffered; what piles up is data on
# streams nobody reads (held by the gate, or a protocol that does not read). Connections we
# dialled, and trusted ones, may hold MAX_CONNECTION_BUFFER.
WINDOW_SLACK = 64 * 1024
MAX_CONNECTION_BUFFER = 64 * 1024 * 1024
STRANGER_BUFFER = 1024 * 1024

# Connections closed by the guard, by reason ("window", "budget"): for `shardmesh status`.
REFUSED_CONNECTIONS: dict[str, int] = {"window": 0, "budget": 0}
_stranger_budget = STRANGER_BUFFER


class WindowExceeded(ConnectionError):
    """A peer sent more than the receive window allowed: its connection is closed."""


def enforce_yamux_windows(stranger_bytes: int = STRANGER_BUFFER) -> None:
    """Make every yamux connection refuse data past a stream's window and past its budget
    (the patch is installed once; `stranger_bytes` is the budget of inbound connections
    made from now on)."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    global _stranger_budget
    _stranger_budget = max(WINDOW_SLACK, min(stranger_bytes, MAX_CONNECTION_BUFFER))
    if getattr(Yamux.__init__, "_shardmesh_windows", False):
        return
    original_init = Yamux.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        outbound = bool(getattr(self, "is_initiator_value", False))
        self.stream_buffers = _WindowedBuffers(
            self, MAX_CONNECTION_BUFFER if outbound else _stranger_budget
        )

    init._shardmesh_windows = True  # type: ignore[attr-defined]
    Yamux.__init__ = init  # type: ignore[method-assign]


def trust(muxed_conn: Any) -> None:
    """The peer on this connection did something useful: lift its budget to the full one."""
    buffers = getattr(muxed_conn, "stream_buffers", None)
    if isinstance(buffers, _WindowedBuffers):
        buffers.budget = MAX_CONNECTION_BUFFER


def trust_peer(network: Any, peer: Any) -> None:
    """`trust` every connection we have to `peer` (a libp2p ID)."""
    for conn in network.get_connections(peer):
        trust(getattr(conn, "muxed_conn", None))


def buffer_budget(muxed_conn: Any) -> int | None:
    """The connection's budget (None if the guard is not installed on it)."""
    buffers = getattr(muxed_conn, "stream_buffers", None)
    return buffers.budget if isinstance(buffers, _WindowedBuffers) else None


class _WindowedBuffers(dict[int, bytearray]):
    """Yamux's stream_id -> buffer map, whose buffers check every extend()."""

    def __init__(self, conn: Any, budget: int) -> None:
        super().__init__()
        self.conn = conn
        self.budget = budget
        self.closing = False

    def __setitem__(self, stream_id: int, buf: bytearray) -> None:
        if type(buf) is bytearray:
            buf = _StreamBuffer(self, stream_id, buf)
        super().__setitem__(stream_id, buf)

    def refuse(self, reason: str, why: str) -> WindowExceeded:
        """Close the connection (yamux's own clean-up, as a task of its nursery: we are
        inside its read loop) and the error that drops the frame meanwhile."""
        nursery = getattr(self.conn, "_nursery", None)
        if not self.closing and nursery is not None:
            self.closing = True
            REFUSED_CONNECTIONS[reason] = REFUSED_CONNECTIONS.get(reason, 0) + 1
            log.info("closing the connection of %s: %s", getattr(self.conn, "peer_id", "?"), why)
            nursery.start_soon(self.conn._cleanup_on_error)
        return WindowExceeded(why)


class _StreamBuffer(bytearray):
    def __init__(self, owner: _WindowedBuffers, stream_id: int, data: bytearray) -> None:
        super().__init__(data)
        self.owner = owner
        self.stream_id = stream_id
        self.over = 0  # bytes received past the window, over the stream's life

    def extend(self, data: Any) -> None:
        owner = self.owner
        stream = owner.conn.streams.get(self.stream_id)
        window = max(0, stream.recv_window) if stream is not None else 0
        self.over += max(0, len(data) - window)
        if self.over > WINDOW_SLACK:
            raise owner.refuse(
                "window",
                f"peer sent {self.over} bytes past the receive window of stream {self.stream_id}",
            )
        total = sum(len(b) for b in owner.values()) + len(data)
        if total > owner.budget:
            raise owner.refuse(
                "budget", f"{total} bytes unread on its streams (budget {owner.budget})"
            )
        super().extend(data)
