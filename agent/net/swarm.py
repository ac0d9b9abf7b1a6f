"""Who may talk to this agent: the private-swarm gate on every connection, allow/deny lists,
and the connection caps (the trio/libp2p half of protocol.swarm).

Every new connection is checked before anything else it carries is served: while a peer is
unproven, its inbound streams (gossip, forward sessions, identify, everything but the
swarm-auth handshake) are held, and pubsub is not told it exists, so it neither receives
our ads nor gets its own accepted. Once it proves the secret the held streams go on as
usual; if it fails (or is on the deny list, or off a non-empty allow list) every connection
to it is closed, the reason is counted (status: "swarm_refused") and our own redials of it
back off. With no secret and no lists nothing is held: an open swarm stays as it was.

Verification is per peer id while the peer stays connected: Noise authenticated that id,
so a second simultaneous connection under it is the same key holder. When its last
connection closes the state is dropped and the next connection proves the secret again.

The secret file and the handshake on a stream are in agent.net.swarmauth (`load_secret` and
`SwarmError` are importable from here too), the per-peer state and pubsub's held notifee in
agent.net.held.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub_notifee import PubsubNotifee

from agent.config import LimitsConfig, SwarmConfig
from agent.net.held import HeldNotifee, PeerState, peer_of
from agent.net.swarmauth import (
    SwarmError,
    load_secret,
    reply_refused,
    run_handshake,
    send_refusal,
)
from agent.net.upstream import REFUSED_CONNECTIONS, trust_peer
from agent.policy.peerlimits import connection_verdict
from protocol.swarm import (
    REFUSE_REASONS,
    SWARM_AUTH_PROTOCOL_ID,
    Handshake,
    derive_key,
    fingerprint,
)

__all__ = ["SwarmError", "SwarmGate", "load_secret"]

log = logging.getLogger("shardmesh.swarm")

# Our own redials of a peer that refused us (or that we refused) wait this long, doubling.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 2.0, 60.0
MAX_BACKOFF_ENTRIES = 4096

StreamHandler = Callable[[INetStream], Awaitable[None]]


def _is_outbound(muxed_conn: Any) -> bool:
    value = getattr(muxed_conn, "is_initiator", False)
    return bool(value() if callable(value) else value)


class SwarmGate(INotifee):
    """Installed on a host before it runs (`install`), running inside `running()`."""

    def __init__(self, host: Any, swarm: SwarmConfig, limits: LimitsConfig) -> None:
        self.host = host
        self.limits = limits
        self.allow = frozenset(swarm.allow)
        self.deny = frozenset(swarm.deny)
        self.auth_timeout = swarm.auth_timeout
        secret = load_secret(swarm.secret_file) if swarm.secret_file is not None else None
        # Only the derived key and a fingerprint are kept; the secret is not stored.
        self._key = derive_key(secret) if secret is not None else None
        self.fingerprint = fingerprint(secret) if secret is not None else None
        del secret
        self.refused: dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)
        self.dropped_ads = 0
        self.refused_streams = 0  # streams of unproven peers over held_streams_per_peer
        self._states: dict[ID, PeerState] = {}
        self._backoff: dict[str, tuple[int, float]] = {}  # peer -> (failures, until)
        self._nursery: trio.Nursery | None = None
        self._local_id = host.get_id()

    @property
    def private(self) -> bool:
        return self._key is not None

    @property
    def gating(self) -> bool:
        """Whether peers must be admitted before their streams are served."""
        return self.private or bool(self.allow) or bool(self.deny)

    # --- set-up -------------------------------------------------------------------------
    def install(self) -> None:
        """Hook into the host: call after Pubsub is made (its notifee and handlers exist),
        before the host runs."""
        network = self.host.get_network()
        network.register_notifee(self)
        # Every agent answers the handshake, so an open agent can tell a private one it is
        # not in its swarm (both sides then count why they parted).
        self.host.set_stream_handler(SWARM_AUTH_PROTOCOL_ID, self._handle_auth_stream)
        if not self.gating:
            return
        mux = self.host.get_mux()
        for proto, handler in list(mux.handlers.items()):
            if proto != SWARM_AUTH_PROTOCOL_ID and handler is not None:
                mux.handlers[proto] = self._gated(handler)
        add_handler = mux.add_handler

        def gated_add_handler(protocol: Any, handler: StreamHandler) -> None:
            if protocol != SWARM_AUTH_PROTOCOL_ID:
                handler = self._gated(handler)
            add_handler(protocol, handler)

        # Handlers registered later (the forward protocol, once blocks load) are gated too.
        mux.add_handler = gated_add_handler
        notifees = network.notifees
        for i, notifee in enumerate(notifees):
            if isinstance(notifee, PubsubNotifee):
                notifees[i] = HeldNotifee(notifee, self._state_for)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SwarmGate]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # --- decisions ----------------------------------------------------------------------
    def list_verdict(self, peer: str) -> str | None:
        """The reason ("denied", "not_allowed") the lists keep `peer` out, or None."""
        if peer in self.deny:
            return "denied"
        if self.allow and peer not in self.allow:
            return "not_allowed"
        return None

    def admitted(self, peer: ID) -> bool:
        if not self.gating:
            return True
        state = self._states.get(peer)
        return state is not None and state.status == "verified"

    def accepts_ad(self, forwarder: ID, sender: str) -> bool:
        """Gossip: only from admitted peers, and never about a peer the lists keep out."""
        if not self.gating:
            return True
        if self.admitted(forwarder) and self.list_verdict(sender) is None:
            return True
        self.dropped_ads += 1
        return False

    async def wait_admitted(self, peer: ID) -> str | None:
        """Wait (at most auth_timeout and a little) for the peer's verdict: None if admitted,
        else the reason it was refused."""
        if not self.gating:
            return None
        with trio.move_on_after(self.auth_timeout + 1.0):
            while True:
                state = self._states.get(peer)
                if state is None:
                    await trio.sleep(0.01)  # its connection is still being registered
                    continue
                await state.decided.wait()
                break
        state = self._states.get(peer)
        if state is None:
            return "no_proof"
        if state.status == "verified":
            return None
        return state.reason or "no_proof"

    def dial_refusal(self, peer: str) -> str | None:
        """Why we should not dial `peer` now (lists, or backing off after a refusal)."""
        verdict = self.list_verdict(peer)
        if verdict is not None:
            return f"peer {peer} is {'on the deny list' if verdict == 'denied' else 'not allowed'}"
        entry = self._backoff.get(peer)
        if entry is not None and entry[1] > time.monotonic():
            return f"peer {peer} was refused {entry[0]} times; next try in " + (
                f"{entry[1] - time.monotonic():.0f} s"
            )
        return None

    def _state_for(self, peer: ID, muxed_conn: Any) -> PeerState:
        """The peer's state, made on first sight: lists are checked at once, and the
        handshake starts (we dialled) or its deadline does (it dialled)."""
        state = self._states.get(peer)
        if state is not None:
            return state
        state = PeerState()
        self._states[peer] = state
        verdict = self.list_verdict(peer.to_base58())
        if verdict is not None:
            self._spawn(self._refuse, peer, state, verdict, "by the peer lists", None)
        elif self._key is None:
            self._verify(peer, state)
        else:
            self._maybe_initiate(peer, state, muxed_conn)
            self._spawn(self._deadline, peer, state)
        return state

    def _maybe_initiate(self, peer: ID, state: PeerState, muxed_conn: Any) -> None:
        if self._key is not None and not state.initiated and _is_outbound(muxed_conn):
            state.initiated = True
            self._spawn(self._initiate, peer, state)

    def _verify(self, peer: ID, state: PeerState) -> None:
        if state.status != "pending":
            return
        state.status = "verified"
        state.decided.set()
        self._backoff.pop(peer.to_base58(), None)
        if self._key is not None:
            log.info("peer %s proved the swarm secret", peer)
        trust_peer(self.host.get_network(), peer)
        for notifee, network, conn in state.held:
            self._spawn(notifee.release, network, conn)
        state.held.clear()

    async def _refuse(
        self, peer: ID, state: PeerState, reason: str, detail: str, reply: str | None
    ) -> None:
        if self._mark_refused(peer, state, reason, detail):
            await self._disconnect(peer, reply)

    def _mark_refused(self, peer: ID, state: PeerState, reason: str, detail: str) -> bool:
        """Decide and count at once (before any await); False if already decided."""
        if self._states.get(peer) is not state or state.status == "refused":
            return False  # the peer already left, or another path refused it first
        state.status, state.reason = "refused", reason
        state.decided.set()
        state.held.clear()
        self.refused[reason] = self.refused.get(reason, 0) + 1
        pid = peer.to_base58()
        failures = self._backoff.get(pid, (0, 0.0))[0] + 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
        self._backoff[pid] = (failures, time.monotonic() + delay)
        while len(self._backoff) > MAX_BACKOFF_ENTRIES:
            self._backoff.pop(next(iter(self._backoff)))
        log.info("refused peer %s (%s): %s", pid, reason, detail)
        self._forget_addrs(peer)
        return True

    async def _disconnect(self, peer: ID, reply: str | None) -> None:
        with trio.CancelScope(shield=True):
            if reply is not None:
                await send_refusal(self.host, peer, reply)
            with trio.move_on_after(2.0), contextlib.suppress(Exception):
                await self.host.get_network().close_peer(peer)

    def _forget_addrs(self, peer: ID) -> None:
        """py-libp2p's auto-connector redials every peer in the peerstore that has an
        address; a refused peer must not be redialled behind our backoff's back."""
        with contextlib.suppress(Exception):
            self.host.get_peerstore().clear_addrs(peer)

    # --- the handshake ------------------------------------------------------------------
    async def _deadline(self, peer: ID, state: PeerState) -> None:
        await trio.sleep(self.auth_timeout)
        if state.status == "pending":
            await self._refuse(
                peer, state, "no_proof", f"no proof within {self.auth_timeout:g} s", "no_proof"
            )

    def _handshake(self, peer: ID, *, initiator: bool) -> Handshake:
        return Handshake(
            key=self._key,
            initiator=initiator,
            local_id=self._local_id.to_bytes(),
            remote_id=peer.to_bytes(),
        )

    async def _initiate(self, peer: ID, state: PeerState) -> None:
        hs = self._handshake(peer, initiator=True)
        try:
            with trio.fail_after(self.auth_timeout):
                stream = await self.host.new_stream(peer, [SWARM_AUTH_PROTOCOL_ID])
        except Exception as exc:  # no such protocol, or the connection went away
            await self._refuse(peer, state, "no_proof", f"cannot open the handshake: {exc}", None)
            return
        await self._drive(peer, state, stream, hs)

    async def _handle_auth_stream(self, stream: INetStream) -> None:
        """The responder side (or a refusal the peer sends us on a stream of its own)."""
        peer = stream.muxed_conn.peer_id
        if not self.gating:
            # An open agent: there is no state to decide, only an answer and a count.
            hs = self._handshake(peer, initiator=False)
            await self._drive(peer, None, stream, hs)
            return
        state = self._state_for(peer, stream.muxed_conn)
        if state.status == "refused":
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        hs = self._handshake(peer, initiator=False)
        await self._drive(peer, state, stream, hs)

    async def _drive(
        self,
        peer: ID,
        state: PeerState | None,
        stream: INetStream,
        hs: Handshake,
    ) -> None:
        outcome = await run_handshake(stream, hs, self.auth_timeout)
        reason, detail, reply = outcome.reason, outcome.detail, outcome.reply
        if outcome.verified:
            if state is not None:
                self._verify(peer, state)
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()
            return
        # Count first, then talk: the peer may hang up as soon as it reads our reply.
        if state is None:
            # An open agent: count it, but leave closing to the private peer.
            self.refused[reason] = self.refused.get(reason, 0) + 1
            self._forget_addrs(peer)
            log.info("peer %s: %s", peer, detail)
            refused_here = False
        else:
            refused_here = self._mark_refused(peer, state, reason, detail)
        if reply is not None:
            await reply_refused(stream, reply)
        with contextlib.suppress(Exception):
            await stream.reset()
        if refused_here:
            await self._disconnect(peer, None)

    # --- holding streams ----------------------------------------------------------------
    def _gated(self, handler: StreamHandler) -> StreamHandler:
        async def gated(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            state = self._state_for(peer, stream.muxed_conn)
            if state.status == "pending":
                if state.holding >= self.limits.held_streams_per_peer:
                    # An unproven peer opening stream after stream: each could hold data.
                    self.refused_streams += 1
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    return
                state.holding += 1
                try:
                    with trio.move_on_after(self.auth_timeout + 1.0):
                        await state.decided.wait()
                finally:
                    state.holding -= 1
            if state.status == "verified" and self._states.get(peer) is state:
                await handler(stream)
                return
            with contextlib.suppress(Exception):
                await stream.reset()

        gated.__wrapped__ = handler  # type: ignore[attr-defined]
        return gated

    # --- network events (INotifee) --------------------------------------------------------
    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = peer_of(conn)
        verdict = connection_verdict(
            len(network.get_connections()), len(network.get_connections(peer)), self.limits
        )
        if verdict is not None:
            self.refused[verdict] = self.refused.get(verdict, 0) + 1
            log.info("closing a connection from %s: over %s", peer, verdict)
            # Not inline: the swarm is still registering this connection while we run.
            self._spawn(_close_quietly, conn)
            return
        if not self.gating:
            return
        state = self._state_for(peer, conn.muxed_conn)
        if state.status == "pending":
            self._maybe_initiate(peer, state, conn.muxed_conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = peer_of(conn)
        if not network.get_connections(peer):
            state = self._states.pop(peer, None)
            if state is not None and state.status == "pending":
                state.status, state.reason = "refused", "no_proof"
                state.decided.set()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        return None

    # --- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For `shardmesh status`: never the secret or the key, only a fingerprint."""
        return {
            "swarm": {
                "private": self.private,
                "fingerprint": self.fingerprint,
                "allow": len(self.allow),
                "deny": len(self.deny),
                "verified_peers": sum(1 for s in self._states.values() if s.status == "verified")
                if self.gating
                else None,
                "dropped_ads": self.dropped_ads,
                "held_streams_refused": self.refused_streams,
            },
            # Connections agent.net.upstream closed: data past a window, or over the budget.
            "buffer_refused": {k: v for k, v in REFUSED_CONNECTIONS.items() if v},
            "swarm_refused": {k: v for k, v in self.refused.items() if v},
        }


async def _close_quietly(conn: INetConn) -> None:
    with trio.move_on_after(2.0), contextlib.suppress(Exception):
        await conn.close()
