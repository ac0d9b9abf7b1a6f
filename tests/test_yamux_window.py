"""py-libp2p 0.8.1's yamux keeps DATA a peer sends past its receive window; agent.net.upstream
closes such a connection instead. Two libp2p hosts in this process: a handler that never
reads (like a stream the swarm gate holds) and a sender that ignores flow control."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio

from agent.config import MeshConfig
from agent.net.mesh import open_mesh
from agent.net.upstream import (
    MAX_CONNECTION_BUFFER,
    REFUSED_CONNECTIONS,
    STRANGER_BUFFER,
    WINDOW_SLACK,
    buffer_budget,
    trust_peer,
)

HELD = "/shardmesh-test/held/1.0.0"


def _buffered(mesh: object) -> int:
    """Bytes the host's yamux connections hold for streams nobody read."""
    total = 0
    for conns in mesh.host.get_network().get_connections_map().values():  # type: ignore[attr-defined]
        for conn in conns:
            muxed = getattr(conn, "muxed_conn", None)
            total += sum(len(b) for b in getattr(muxed, "stream_buffers", {}).values())
    return total


async def test_data_past_the_window_closes_the_connection(tmp_path: Path) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE

    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))
        attacker = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))
        held = trio.Event()

        async def never_reads(stream: object) -> None:
            held.set()
            await trio.sleep(30)

        victim.host.set_stream_handler(HELD, never_reads)
        await attacker.dial(victim.listen_addrs())
        stream = await attacker.host.new_stream(ID.from_base58(victim.peer_id), [HELD])
        stream.muxed_stream.send_window = 1 << 40  # type: ignore[attr-defined]  # ignore flow control
        peak = sent = 0
        with trio.move_on_after(10):
            try:
                for _ in range(200):  # up to 200 MiB
                    await stream.write(b"x" * (1 << 20))
                    sent += 1 << 20
                    peak = max(peak, _buffered(victim))
                    await trio.sleep(0)
            except Exception:
                pass  # the victim closed the connection: what we want
        for _ in range(50):
            peak = max(peak, _buffered(victim))
            if not victim.is_connected(attacker.peer_id):
                break
            await trio.sleep(0.1)
        assert held.is_set()
        # Without the guard the victim held everything sent (~200 MiB) until disconnect.
        # With it: at most the window yamux granted the stream (auto-tuned, ~2 MiB here;
        # 16 MiB at most) plus the slack, then the connection is gone.
        assert peak <= MAX_WINDOW_SIZE + WINDOW_SLACK, peak
        assert peak < MAX_CONNECTION_BUFFER
        assert not victim.is_connected(attacker.peer_id), (sent, peak)


async def test_a_stranger_leaves_little_unread(tmp_path: Path) -> None:
    """A peer that dialled us and did nothing useful yet may leave only the stranger budget
    unread (flow control respected: many streams, a window's worth each); past it, its
    connection is closed. Without the budget each stream could hold its window, up to
    MAX_CONNECTION_BUFFER per connection."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))
        attacker = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))

        async def never_reads(stream: object) -> None:
            await trio.sleep(30)

        victim.host.set_stream_handler(HELD, never_reads)
        await attacker.dial(victim.listen_addrs())
        conns = victim.host.get_network().get_connections(ID.from_base58(attacker.peer_id))
        assert [buffer_budget(c.muxed_conn) for c in conns] == [STRANGER_BUFFER]
        before = REFUSED_CONNECTIONS["budget"]
        peak = 0
        with trio.move_on_after(15):
            try:
                for _ in range(32):  # 32 streams x 192 KiB = 6 MiB, within every window
                    stream = await attacker.host.new_stream(ID.from_base58(victim.peer_id), [HELD])
                    with trio.move_on_after(2):
                        await stream.write(b"x" * (192 * 1024))
                    for _ in range(5):
                        await trio.sleep(0.01)
                        peak = max(peak, _buffered(victim))
                    if not victim.is_connected(attacker.peer_id):
                        break
            except Exception:
                pass  # the victim closed the connection
        for _ in range(50):
            if not victim.is_connected(attacker.peer_id):
                break
            await trio.sleep(0.1)
        assert not victim.is_connected(attacker.peer_id), peak
        assert peak <= STRANGER_BUFFER, peak
        assert REFUSED_CONNECTIONS["budget"] == before + 1


async def test_useful_peers_get_the_full_budget(tmp_path: Path) -> None:
    """Connections we dialled, and those of a peer that did something useful (`trust`), may
    hold MAX_CONNECTION_BUFFER."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))
        b = await stack.enter_async_context(open_mesh(MeshConfig(), create_new_key_pair()))
        await b.dial(a.listen_addrs())
        a_net, b_net = a.host.get_network(), b.host.get_network()
        a_side = a_net.get_connections(ID.from_base58(b.peer_id))
        b_side = b_net.get_connections(ID.from_base58(a.peer_id))
        assert [buffer_budget(c.muxed_conn) for c in b_side] == [MAX_CONNECTION_BUFFER]
        assert [buffer_budget(c.muxed_conn) for c in a_side] == [STRANGER_BUFFER]
        trust_peer(a_net, ID.from_base58(b.peer_id))
        assert [buffer_budget(c.muxed_conn) for c in a_side] == [MAX_CONNECTION_BUFFER]
