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

from typing import Any

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
