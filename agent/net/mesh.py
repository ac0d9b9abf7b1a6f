"""The libp2p side of the agent: host, gossipsub, capacity ads in and out, peer discovery.

Settings follow ../shared/notes/libp2p.md: Noise only (no plaintext or secio downgrade),
yamux, one connection per peer (avoids the ~250 ms happy-eyeballs stall on every dial),
meshsub 1.1 with a 1 s heartbeat and the per-topic spam limiter off (we validate and
rate-limit ads ourselves; its default silently drops a busy node's own publishes).

The topic validator (`Mesh._validate`) knows which peer relayed each gossip message; with an
`intake` set (agent.policy.peertable.AdIntake: new peer ids charged to the relaying peer, the
table's room, block counts of models we know) an ad it refuses is dropped, not forwarded, and
counted under its reason in the validator's `rejected` counts (status `rejected_ads`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

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

from agent.config import MeshConfig
from agent.errors import ShardmeshError
from agent.multiaddrs import split_peer_addr
from agent.net.swarm import SwarmGate
from agent.net.upstream import bound_multiselect_reads, enforce_yamux_windows, trust_peer
from protocol import AdRejected, AdValidator, CapacityAd
from protocol.ids import CAPACITY_TOPIC

log = logging.getLogger("shardmesh.mesh")

DIAL_TIMEOUT_S = 5.0
# A failing on_ad is logged as a warning this many times, then at debug level.
_ON_AD_WARNINGS = 16
# Mesh degree: every extra mesh link delivers each ad once more, and in py-libp2p each
# delivery costs milliseconds of CPU (measured in the note); 4/3/6 still heals a lost link.
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 4, 3, 6
_SIGNED_RECORD_CACHE_SIZE = 4096


def _install_signed_record_cache() -> None:
    """Verify each peer's signed peer record once, not on every gossip RPC.

    py-libp2p attaches the sender's signed peer record to every pubsub RPC and verifies it
    (an Ed25519 check plus protobuf parsing) on every one received; the bytes repeat until
    the sender's addresses change. The result for the same (sender, bytes) cannot change,
    so remember it. The modules imported the function by name, so rebind it there.
    """
    import libp2p.pubsub.floodsub as floodsub_mod
    import libp2p.pubsub.gossipsub as gossipsub_mod
    import libp2p.pubsub.pubsub as pubsub_mod
    import libp2p.pubsub.utils as utils_mod

    original = utils_mod.maybe_consume_signed_record
    if getattr(original, "_shardmesh_cached", False):
        return
    seen: OrderedDict[tuple[bytes, bytes], bool] = OrderedDict()

    def cached(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (peer_id.to_bytes(), bytes(msg.senderRecord))
        hit = seen.get(key)
        if hit is not None:
            seen.move_to_end(key)
            return hit
        ok = original(msg, host, peer_id)
        seen[key] = ok
        if len(seen) > _SIGNED_RECORD_CACHE_SIZE:
            seen.popitem(last=False)
        return ok

    cached._shardmesh_cached = True  # type: ignore[attr-defined]
    for mod in (utils_mod, pubsub_mod, gossipsub_mod, floodsub_mod):
        if hasattr(mod, "maybe_consume_signed_record"):
            setattr(mod, "maybe_consume_signed_record", cached)  # noqa: B010 - not all declare it


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
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=1,
        heartbeat_initial_delay=0.1,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )


class AdIntake(Protocol):
    """What the validator asks about an ad besides its own checks (agent.policy.peertable's
    AdIntake): a reason to drop it, or None. `screen` runs before the ad is decoded."""

    def screen(self, relay: str, sender: str, now: float) -> str | None: ...

    def admit(self, relay: str, ad: CapacityAd, now: float) -> str | None: ...


class Mesh:
    """A running host joined to the capacity topic. Made by `open_mesh`."""

    def __init__(self, host: IHost, pubsub: Pubsub, validator: AdValidator) -> None:
        self.host = host
        self.pubsub = pubsub
        self.validator = validator
        self.gate: SwarmGate | None = None  # set by open_mesh: who may talk to us
        self.intake: AdIntake | None = None  # set by the agent: relay budgets, table room
        self.peer_id = host.get_id().to_base58()
        # Ads accepted by the topic validator, waiting for the subscription loop (keyed by
        # gossip message id); bounded so a flood cannot grow it.
        self._accepted: OrderedDict[bytes, CapacityAd] = OrderedDict()
        self.bytes_in = 0
        self.bytes_out = 0
        # Publish-to-validate delay of recent ads (gossip latency, clocks permitting).
        self.ad_delays_ms: deque[float] = deque(maxlen=256)
        # Ads the receive loop's handler failed on (logged, counted, the loop goes on), and
        # validator calls that raised (the message is dropped).
        self.ad_handler_errors = 0
        self.validate_errors = 0

    # --- addresses -----------------------------------------------------------------------
    def listen_addrs(self) -> list[str]:
        """Dialable addresses ending in /p2p/<id>; wildcard listens expand to interfaces."""
        out: list[str] = []
        for addr in self.host.get_transport_addrs():
            out.extend(_expand_wildcard(str(addr)))
        return [f"{a}/p2p/{self.peer_id}" for a in dict.fromkeys(out)]

    # --- gossip ------------------------------------------------------------------------
    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        try:
            return self._check_ad(forwarder, msg)
        except Exception as exc:  # one bad message must not break pubsub's receive path
            self.validate_errors += 1
            log.debug("validating a gossip message via %s raised: %r", forwarder, exc)
            return False

    def _refuse(self, reason: str) -> None:
        rejected = self.validator.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def _check_ad(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        sender = ID(msg.from_id).to_base58()
        if sender == self.peer_id:
            return True
        if self.gate is not None and not self.gate.accepts_ad(forwarder, sender):
            return False  # an unproven forwarder, or a listed-out sender (counted by the gate)
        intake = self.intake
        relay = forwarder.to_base58()
        if intake is not None:
            reason = intake.screen(relay, sender, time.monotonic())
            if reason is not None:
                self._refuse(reason)
                return False
        try:
            ad = self.validator.check(bytes(msg.data), sender=sender, now=time.time())
        except AdRejected as exc:
            log.debug("rejected ad from %s via %s: %s (%s)", sender, forwarder, exc.reason, exc)
            return False
        if intake is not None:
            reason = intake.admit(relay, ad, time.monotonic())
            if reason is not None:
                self._refuse(reason)
                log.debug("refused ad from %s via %s: %s", sender, relay, reason)
                return False
        if sender == relay:
            # A valid ad of its own: an agent, not a stranger (agent.net.upstream budgets).
            trust_peer(self.host.get_network(), forwarder)
        self.ad_delays_ms.append((time.time() - ad.timestamp) * 1000)
        self._accepted[_msg_key(msg)] = ad
        while len(self._accepted) > 1024:
            self._accepted.popitem(last=False)
        return True

    async def publish(self, data: bytes) -> None:
        self.bytes_out += len(data)
        await self.pubsub.publish(CAPACITY_TOPIC, data)

    async def receive_ads(self, on_ad: Callable[[CapacityAd], None]) -> None:
        """Deliver every accepted ad from other peers to `on_ad`; runs until cancelled. An
        ad that `on_ad` (or reading the message) fails on is counted and skipped."""
        sub = await self.pubsub.subscribe(CAPACITY_TOPIC)
        own = ID.from_base58(self.peer_id).to_bytes()
        while True:
            msg = await sub.get()
            try:
                if bytes(msg.from_id) == own:
                    continue  # pubsub hands a publisher its own messages back
                self.bytes_in += len(msg.data)
                ad = self._accepted.pop(_msg_key(msg), None)
                if ad is not None:
                    on_ad(ad)
            except Exception as exc:
                self.ad_handler_errors += 1
                quiet = self.ad_handler_errors > _ON_AD_WARNINGS
                level = logging.DEBUG if quiet else logging.WARNING
                log.log(level, "handling a capacity ad failed (skipped): %r", exc)

    def trim_router_state(self) -> None:
        """Bound py-libp2p state that would otherwise grow forever.

        GossipSub.publish appends a timestamp per routed message to
        `recent_message_deliveries`, pruned only by adaptive gossip, which we turn off:
        ~32 bytes a message, without limit (measured: 2000 entries after 2000 ads). Nothing
        reads it while adaptive gossip is off, so drop it.
        """
        deliveries = getattr(self.pubsub.router, "recent_message_deliveries", None)
        if deliveries is not None:
            deliveries.clear()

    def gossip_mesh_size(self) -> int:
        """Peers this node forwards capacity ads to directly (its gossipsub mesh)."""
        router = self.pubsub.router
        return len(getattr(router, "mesh", {}).get(CAPACITY_TOPIC, ()))

    # --- connections -------------------------------------------------------------------
    def is_connected(self, peer_id: str) -> bool:
        try:
            return bool(self.host.get_network().get_connections(ID.from_base58(peer_id)))
        except Exception:
            return False

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def dial(self, addrs: list[str], *, timeout: float = DIAL_TIMEOUT_S + 1) -> str:
        """Connect to a peer given its /p2p/ addresses within `timeout` seconds; returns its
        peer id. Every failure (an address that does not parse included) is a
        ConnectionError with one line."""
        if not addrs:
            raise ConnectionError("no address to dial")
        try:
            _, peer = split_peer_addr(addrs[0])
            pid = ID.from_base58(peer)
            maddrs = [multiaddr.Multiaddr(split_peer_addr(a)[0]) for a in addrs]
        except Exception as exc:  # the multiaddr package raises several unrelated types
            raise ConnectionError(f"cannot dial {addrs[0][:120]!r}: {exc}") from None
        network = self.host.get_network()
        # A failed dial blocks a peer for 60 s in py-libp2p (notes, item 7); we do our own
        # backoff, so clear that state before each attempt.
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(pid)
        refusal = self.gate.dial_refusal(peer) if self.gate is not None else None
        if refusal is not None:
            raise ConnectionError(refusal)
        try:
            with trio.fail_after(timeout):
                await self.host.connect(PeerInfo(pid, maddrs))
        except trio.TooSlowError:
            raise ConnectionError(f"timed out dialling {addrs[0]}") from None
        except Exception as exc:
            raise ConnectionError(f"cannot dial {addrs[0]}: {exc}") from None
        if self.gate is not None:
            refused = await self.gate.wait_admitted(pid)
            if refused is not None:
                raise ConnectionError(f"{addrs[0]} was refused by the swarm gate: {refused}")
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


# --- before listening: is the port free? -------------------------------------------------------
def port_holder(port: int) -> str | None:
    """Who listens on TCP `port` on this machine, for an error line ("a shardmesh agent, pid
    42", "nginx, pid 7", "a process of another user"), or None if psutil cannot tell."""
    try:
        import psutil

        conns = psutil.net_connections(kind="tcp")
    except Exception:  # no permission to list sockets, or no psutil support here
        return None
    listening = [
        c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]
    for conn in listening:
        if not conn.pid:
            continue
        try:
            proc = psutil.Process(conn.pid)
            name, cmdline = proc.name(), proc.cmdline()
        except psutil.Error:
            return f"pid {conn.pid}"
        if any(arg == "agent.cli" or os.path.basename(arg) == "shardmesh" for arg in cmdline):
            name = "a shardmesh agent"
        return f"{name}, pid {conn.pid}"
    return "a process of another user" if listening else None


def in_use_by(port: int) -> str:
    """ " (by <who>)" for an error line about TCP `port` being in use, or "" if unknown."""
    holder = port_holder(port)
    return f" (by {holder})" if holder else ""


def bind_error(host: str, port: int) -> OSError | None:
    """What binding TCP `port` on `host` raises now (errno EADDRINUSE: in use), or None.
    Probes with a plain socket without SO_REUSEPORT: py-libp2p listens with it, so its own
    bind would share a port another agent listens on. With SO_REUSEADDR, as a listener
    has, so that a restart does not trip over its old connections in TIME_WAIT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None


def check_listen_addrs(listen: Iterable[str]) -> None:
    """ShardmeshError with one line if a listen address's TCP port cannot be listened on
    (in use, an address not on this machine), before py-libp2p listens: it would share a
    port in use (SO_REUSEPORT). Port 0 (any free one) is not checked."""
    for addr in listen:
        try:
            maddr = multiaddr.Multiaddr(addr)
            protos = [p.name for p in maddr.protocols()]
            ip_proto = next((p for p in ("ip4", "ip6") if p in protos), None)
            if ip_proto is None or "tcp" not in protos:
                continue  # a name (dns): py-libp2p resolves it itself
            host, port = maddr.value_for_protocol(ip_proto), int(maddr.value_for_protocol("tcp"))
        except Exception:  # config validation has checked the addresses already
            continue
        if port == 0:
            continue
        exc = bind_error(host, port)
        if exc is None:
            continue
        if exc.errno == errno.EADDRINUSE:
            raise ShardmeshError(
                f"cannot listen on {addr}: TCP port {port} is in use{in_use_by(port)}; "
                "stop it or choose another --listen port"
            )
        raise ShardmeshError(f"cannot listen on {addr}: {exc.strerror or exc}")


@asynccontextmanager
async def open_mesh(cfg: MeshConfig, key_pair: KeyPair) -> AsyncIterator[Mesh]:
    """Start the host listening on cfg.listen and join the capacity topic. A port in use
    raises ShardmeshError (check_listen_addrs)."""
    check_listen_addrs(cfg.listen)
    _install_signed_record_cache()
    bound_multiselect_reads()  # a stranger's claimed lengths, before Noise and the gate
    # Data past a stream's receive window, or a stranger's connection over its budget,
    # closes the connection.
    enforce_yamux_windows(cfg.limits.stranger_buffer_bytes)
    host = make_host(key_pair, mdns=cfg.mdns)
    router = make_router()
    pubsub = Pubsub(host, router, strict_signing=True, seen_ttl=120)
    mesh = Mesh(host, pubsub, AdValidator())
    pubsub.set_topic_validator(CAPACITY_TOPIC, mesh._validate, False)
    mesh.gate = SwarmGate(host, cfg.swarm, cfg.limits)  # reads the secret file: may raise
    mesh.gate.install()
    listen = [multiaddr.Multiaddr(a) for a in cfg.listen]
    async with (
        mesh.gate.running(),
        host.run(listen_addrs=listen),
        background_trio_service(pubsub),
        background_trio_service(router),
    ):
        await pubsub.wait_until_ready()
        yield mesh
