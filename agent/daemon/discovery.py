"""Finding and keeping peers: bootstrap peers (retried with capped exponential backoff), peer
exchange (every accepted ad names its peer's addresses; we dial the ones we are not connected
to, up to TARGET_CONNECTIONS), mDNS on a LAN, and expiry of peers whose ads stopped.

`joined` is set once a bootstrap peer answered (at once without bootstrap peers): systemd's
READY=1 waits for it, up to `bootstrap_wait`.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

import trio

from agent.config import DiscoveryConfig
from agent.multiaddrs import split_peer_addr
from agent.net.mesh import Mesh
from agent.policy.peertable import PeerTable
from protocol import CapacityAd

log = logging.getLogger("shardmesh.agent")

# How many peers we dial on our own after learning them from ads; beyond this, gossip
# still reaches us through the peers we have.
TARGET_CONNECTIONS = 24
EXPIRE_EVERY_S = 0.25
TRIM_EVERY_S = 60.0  # py-libp2p gossip state that would otherwise grow without bound
DIAL_EVERY_S = 0.2
DIAL_BACKOFF_S = 10.0
BOOTSTRAP_CHECK_S = 2.0


class Discovery:
    def __init__(self, cfg: DiscoveryConfig, mesh: Mesh, table: PeerTable) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.table = table
        self.joined = trio.Event()
        self._dial_backoff: dict[str, float] = {}
        self._want_dial: list[CapacityAd] = []
        # Peers mDNS found on the LAN, pushed from zeroconf's thread: (peer id, addrs).
        self.discovered: queue.SimpleQueue[tuple[str, list[str]]] = queue.SimpleQueue()

    def watch_mdns(self) -> None:
        """With mDNS on, queue the peers it finds for a dial."""
        if self.cfg.mdns:
            from libp2p.discovery.events.peerDiscovery import peerDiscovery

            peerDiscovery.register_peer_discovered_handler(self.on_mdns_peer)

    def start(self, nursery: trio.Nursery) -> None:
        """The ad receiver, expiry, peer exchange and one loop per bootstrap peer."""
        nursery.start_soon(self.peer_exchange_loop)
        nursery.start_soon(self.mesh.receive_ads, self.on_ad)
        nursery.start_soon(self.expire_loop)
        for addr in self.cfg.bootstrap:
            nursery.start_soon(self.bootstrap_loop, addr)
        if not self.cfg.bootstrap:
            self.joined.set()

    def on_ad(self, ad: CapacityAd) -> None:
        change = self.table.update(ad, time.monotonic())
        if change == "joined":
            log.info("peer joined: %s (%s)", ad.peer_id, ad.state)
        elif change == "left":
            log.info("peer left: %s", ad.peer_id)
        if ad.state != "leaving" and not self.mesh.is_connected(ad.peer_id):
            self._want_dial.append(ad)

    async def expire_loop(self) -> None:
        last_trim = time.monotonic()
        while True:
            if time.monotonic() - last_trim > TRIM_EVERY_S:
                self.mesh.trim_router_state()
                last_trim = time.monotonic()
            for pid in self.table.expire(time.monotonic(), self.mesh.is_connected):
                log.info("peer expired: %s", pid)
                self.mesh.validator.forget(pid)
            await trio.sleep(EXPIRE_EVERY_S)

    def on_mdns_peer(self, info: Any) -> None:
        """libp2p's mDNS listener only fills the peerstore; queue the peer for a dial.
        Called from zeroconf's thread, hence the thread-safe queue."""
        pid = info.peer_id.to_base58()
        if pid != self.mesh.peer_id:
            self.discovered.put((pid, [f"{a}/p2p/{pid}" for a in info.addrs]))

    async def peer_exchange_loop(self) -> None:
        """Dial peers learned from ads (peer exchange through the mesh) or mDNS, with backoff."""
        while True:
            await trio.sleep(DIAL_EVERY_S)
            pending: dict[str, list[str]] = {}
            while not self.discovered.empty():
                pid, addrs = self.discovered.get_nowait()
                pending[pid] = addrs
            wanted, self._want_dial = self._want_dial, []
            pending.update({ad.peer_id: list(ad.addrs) for ad in wanted})
            now = time.monotonic()
            for pid, addrs in pending.items():
                if len(self.mesh.connected_peers()) >= TARGET_CONNECTIONS:
                    break
                if self._dial_backoff.get(pid, 0) > now or not addrs:
                    continue
                if self.mesh.is_connected(pid):
                    continue
                try:
                    await self.mesh.dial(addrs)
                    self._dial_backoff.pop(pid, None)
                except ConnectionError as exc:
                    log.debug("dial of discovered peer failed: %s", exc)
                    self._dial_backoff[pid] = now + DIAL_BACKOFF_S

    async def bootstrap_loop(self, addr: str) -> None:
        """Keep a connection to one bootstrap peer, retrying with capped exponential backoff."""
        delay = 0.5
        _, peer = split_peer_addr(addr)
        while True:
            if not self.mesh.is_connected(peer):
                try:
                    await self.mesh.dial([addr])
                    log.info("connected to bootstrap peer %s", addr)
                    delay = 0.5
                except ConnectionError as exc:
                    log.warning("bootstrap peer unreachable, retrying in %.1f s: %s", delay, exc)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.cfg.bootstrap_retry_max)
                    continue
            self.joined.set()
            await trio.sleep(BOOTSTRAP_CHECK_S)
