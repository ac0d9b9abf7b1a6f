"""What the swarm gate (agent.net.swarm) keeps per peer while the peer proves itself, and
pubsub's notifee behind the gate: pubsub hears of a peer only once the gate admits it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID


@dataclass
class PeerState:
    """One peer from its first connection to its last: pending, then verified or refused."""

    status: str = "pending"
    reason: str = ""
    decided: trio.Event = field(default_factory=trio.Event)
    initiated: bool = False
    holding: int = 0  # its streams the gate holds now
    # Pubsub "connected" notifications held until the peer is verified.
    held: list[tuple[HeldNotifee, INetwork, INetConn]] = field(default_factory=list)


def peer_of(conn: Any) -> ID:
    return conn.muxed_conn.peer_id if hasattr(conn, "muxed_conn") else conn.peer_id


# The gate's state for a peer, made on first sight: (peer, muxed connection) -> state.
StateFor = Callable[[ID, Any], PeerState]


class HeldNotifee(INotifee):
    """Pubsub's notifee behind the gate: pubsub hears of a peer only once it is admitted,
    and of its disconnections only if it heard of it (on a lost connection of a peer that is
    still connected, pubsub would otherwise open a stream to it)."""

    def __init__(self, inner: INotifee, state_for: StateFor) -> None:
        self.inner = inner
        self.state_for = state_for
        self._told: set[ID] = set()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = peer_of(conn)
        state = self.state_for(peer, conn.muxed_conn)
        if state.status == "verified":
            await self.release(network, conn)
        elif state.status == "pending":
            state.held.append((self, network, conn))

    async def release(self, network: INetwork, conn: INetConn) -> None:
        self._told.add(peer_of(conn))
        await self.inner.connected(network, conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = peer_of(conn)
        if peer not in self._told:
            return
        if not network.get_connections(peer):
            self._told.discard(peer)
        await self.inner.disconnected(network, conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await self.inner.opened_stream(network, stream)

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await self.inner.closed_stream(network, stream)

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        await self.inner.listen(network, multiaddr)

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        await self.inner.listen_close(network, multiaddr)
