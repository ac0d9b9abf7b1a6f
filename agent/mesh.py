"""The libp2p side of the agent: host, gossipsub, capacity ads in and out, peer discovery.

Settings follow ../shared/notes/libp2p.md: Noise only (no plaintext or secio downgrade),
yamux, one connection per peer (avoids the ~250 ms happy-eyeballs stall on every dial),
meshsub 1.1 with a 1 s heartbeat and the per-topic spam limiter off (we validate and
rate-limit ads ourselves; its default silently drops a busy node's own publishes).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from agent.config import AgentConfig
from agent.multiaddrs import split_peer_addr
from protocol import AdRejected, AdValidator, CapacityAd
from protocol.ids import CAPACITY_TOPIC

log = logging.getLogger("shardmesh.mesh")

DIAL_TIMEOUT_S = 5.0


def make_host(key_pair: KeyPair, *, mdns: bool) -> IHost:
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        enable_mDNS=mdns,
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT_S),
    )


def make_router() -> GossipSub:
    return GossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        heartbeat_initial_delay=0.1,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )


@dataclass
class ReceivedAd:
    ad: CapacityAd
    size: int


class Mesh:
    """A running host joined to the capacity topic. Made by `open_mesh`."""

    def __init__(self, host: IHost, pubsub: Pubsub, validator: AdValidator) -> None:
        self.host = host
        self.pubsub = pubsub
        self.validator = validator
        self.peer_id = host.get_id().to_base58()
        # Ads accepted by the topic validator, waiting for the subscription loop (keyed by
        # gossip message id); bounded so a flood cannot grow it.
        self._accepted: OrderedDict[bytes, CapacityAd] = OrderedDict()
        self.bytes_in = 0
        self.bytes_out = 0

    # --- addresses -----------------------------------------------------------------------
    def listen_addrs(self) -> list[str]:
        """Dialable addresses ending in /p2p/<id>; wildcard listens expand to interfaces."""
        out: list[str] = []
        for addr in self.host.get_transport_addrs():
            out.extend(_expand_wildcard(str(addr)))
        return [f"{a}/p2p/{self.peer_id}" for a in dict.fromkeys(out)]

    # --- gossip ------------------------------------------------------------------------
    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        sender = ID(msg.from_id).to_base58()
        if sender == self.peer_id:
            return True
        try:
            ad = self.validator.check(bytes(msg.data), sender=sender, now=time.time())
        except AdRejected as exc:
            log.debug("rejected ad from %s via %s: %s", sender, forwarder, exc.reason)
            return False
        self._accepted[_msg_key(msg)] = ad
        while len(self._accepted) > 1024:
            self._accepted.popitem(last=False)
        return True

    async def publish(self, data: bytes) -> None:
        self.bytes_out += len(data)
        await self.pubsub.publish(CAPACITY_TOPIC, data)

    async def receive_ads(self, on_ad: Callable[[CapacityAd], None]) -> None:
        """Deliver every accepted ad from other peers to `on_ad`; runs until cancelled."""
        sub = await self.pubsub.subscribe(CAPACITY_TOPIC)
        while True:
            msg = await sub.get()
            self.bytes_in += len(msg.data)
            ad = self._accepted.pop(_msg_key(msg), None)
            if ad is not None:
                on_ad(ad)

    # --- connections -------------------------------------------------------------------
    def is_connected(self, peer_id: str) -> bool:
        try:
            return bool(self.host.get_network().get_connections(ID.from_base58(peer_id)))
        except Exception:
            return False

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def dial(self, addrs: list[str]) -> str:
        """Connect to a peer given its /p2p/ addresses; returns its peer id. Raises OSError-like
        errors wrapped as ConnectionError with one line."""
        if not addrs:
            raise ConnectionError("no address to dial")
        _, peer = split_peer_addr(addrs[0])
        pid = ID.from_base58(peer)
        maddrs = [multiaddr.Multiaddr(split_peer_addr(a)[0]) for a in addrs]
        network = self.host.get_network()
        # A failed dial blocks a peer for 60 s in py-libp2p (notes, item 7); we do our own
        # backoff, so clear that state before each attempt.
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(pid)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S + 1):
                await self.host.connect(PeerInfo(pid, maddrs))
        except trio.TooSlowError:
            raise ConnectionError(f"timed out dialling {addrs[0]}") from None
        except Exception as exc:
            raise ConnectionError(f"cannot dial {addrs[0]}: {exc}") from None
        return peer


def _msg_key(msg: rpc_pb2.Message) -> bytes:
    return bytes(msg.from_id) + b"/" + bytes(msg.seqno)


def _expand_wildcard(addr: str) -> list[str]:
    """Replace a 0.0.0.0 listen address by the machine's concrete IPv4 addresses."""
    if not addr.startswith("/ip4/0.0.0.0/"):
        return [addr]
    import psutil

    rest = addr[len("/ip4/0.0.0.0") :]
    ips = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name == "AF_INET" and entry.address:
                ips.append(entry.address)
    # Loopback last: peers on other machines should try a routable address first.
    ips.sort(key=lambda ip: ip.startswith("127."))
    return [f"/ip4/{ip}{rest}" for ip in ips] or [addr]


@asynccontextmanager
async def open_mesh(cfg: AgentConfig, key_pair: KeyPair) -> AsyncIterator[Mesh]:
    """Start the host listening on cfg.listen and join the capacity topic."""
    host = make_host(key_pair, mdns=cfg.mdns)
    router = make_router()
    pubsub = Pubsub(host, router, strict_signing=True, seen_ttl=120)
    mesh = Mesh(host, pubsub, AdValidator())
    pubsub.set_topic_validator(CAPACITY_TOPIC, mesh._validate, False)
    listen = [multiaddr.Multiaddr(a) for a in cfg.listen]
    async with (
        host.run(listen_addrs=listen),
        background_trio_service(pubsub),
        background_trio_service(router),
    ):
        await pubsub.wait_until_ready()
        yield mesh
