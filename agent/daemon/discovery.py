"""Finding and keeping peers: bootstrap peers (retried with capped exponential backoff), peer
exchange (every accepted ad names its peer's addresses; we dial the ones we are not connected
to, up to TARGET_CONNECTIONS), mDNS on a LAN, and expiry of peers whose ads stopped.

`joined` is set once a bootstrap peer answered (at once without bootstrap peers): systemd's
READY=1 waits for it, up to `bootstrap_wait`.

Every loop here isolates a failing item (issue "Valid signatures, hostile values"): one
peer's ad, address or dial that fails in any way is counted in `errors` (status
`loop_errors`), logged once for that peer, and the loop goes on with the others. Peer
exchange dials run concurrently (PEX_CONCURRENT_DIALS at a time), each within
PEX_DIAL_TIMEOUT_S, so ads naming addresses that never answer cannot stall discovery.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
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
# Peer exchange: dials at once; the deadline of each connect (a loopback or LAN peer
# answers in tens of ms) and of the whole dial (the swarm handshake included); dials per
# round (the rest wait for the next); how many learned peers wait at most (the newest win).
PEX_CONCURRENT_DIALS = 8
PEX_DIAL_TIMEOUT_S = 2.0
PEX_DIAL_DEADLINE_S = 5.0
PEX_DIALS_PER_ROUND = 2 * PEX_CONCURRENT_DIALS
PEX_MAX_PENDING = 64
# Remembered per-peer backoffs and "already logged" marks (oldest forgotten first).
MAX_REMEMBERED = 4096
LOOPS = ("ads", "peer_exchange", "expiry", "bootstrap")


class LoopErrors:
    """Failures of the background loops' items, counted per loop; each (loop, peer) is logged
    once at `level` (then at debug level), a bounded memory of what was logged."""

    def __init__(self, loops: tuple[str, ...] = LOOPS) -> None:
        self.counts: dict[str, int] = dict.fromkeys(loops, 0)
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()

    def record(
        self, loop: str, key: str, what: str, exc: BaseException, level: int = logging.WARNING
    ) -> None:
        self.counts[loop] = self.counts.get(loop, 0) + 1
        mark = (loop, key)
        if mark in self._logged:
            log.debug("%s (again): %r", what, exc)
            return
        self._logged[mark] = None
        while len(self._logged) > MAX_REMEMBERED:
            self._logged.popitem(last=False)
        log.log(level, "%s: %s", what, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class Discovery:
    def __init__(
        self,
        cfg: DiscoveryConfig,
        mesh: Mesh,
        table: PeerTable,
        errors: LoopErrors | None = None,
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.table = table
        self.errors = errors or LoopErrors()
        self.joined = trio.Event()
        self._dial_backoff: OrderedDict[str, float] = OrderedDict()
        # Peers learned from ads, waiting for a dial: peer id -> addresses (newest last).
        self._want_dial: OrderedDict[str, list[str]] = OrderedDict()
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
        """One accepted ad into the table (and the dial queue). Never raises: a failure is
        counted and logged once for the ad's peer."""
        try:
            self._on_ad(ad)
        except Exception as exc:
            self.errors.record("ads", ad.peer_id, f"ad from {ad.peer_id} not recorded", exc)

    def _on_ad(self, ad: CapacityAd) -> None:
        change = self.table.update(ad, time.monotonic())
        if change == "joined":
            log.info("peer joined: %s (%s)", ad.peer_id, ad.state)
        elif change == "left":
            log.info("peer left: %s", ad.peer_id)
        elif change == "refused":
            return  # the table is full of protected peers (counted there)
        if ad.state != "leaving" and ad.addrs and not self.mesh.is_connected(ad.peer_id):
            self._queue_dial(ad.peer_id, list(ad.addrs))

    async def expire_loop(self) -> None:
        last_trim = time.monotonic()
        while True:
            if time.monotonic() - last_trim > TRIM_EVERY_S:
                last_trim = time.monotonic()
                try:
                    self.mesh.trim_router_state()
                except Exception as exc:
                    self.errors.record("expiry", "trim", "trimming gossip state failed", exc)
            try:
                gone = self.table.expire(time.monotonic(), self.mesh.is_connected)
            except Exception as exc:
                self.errors.record("expiry", "", "peer expiry failed", exc)
                gone = []
            for pid in gone:
                try:
                    log.info("peer expired: %s", pid)
                    self.mesh.validator.forget(pid)
                    self._want_dial.pop(pid, None)
                except Exception as exc:
                    self.errors.record("expiry", pid, f"expiring {pid} failed", exc)
            await trio.sleep(EXPIRE_EVERY_S)

    def on_mdns_peer(self, info: Any) -> None:
        """libp2p's mDNS listener only fills the peerstore; queue the peer for a dial.
        Called from zeroconf's thread, hence the thread-safe queue."""
        try:
            pid = info.peer_id.to_base58()
            if pid != self.mesh.peer_id:
                self.discovered.put((pid, [f"{a}/p2p/{pid}" for a in info.addrs]))
        except Exception as exc:  # zeroconf's thread must not see our errors
            log.debug("mDNS peer ignored: %r", exc)

    def _queue_dial(self, pid: str, addrs: list[str]) -> None:
        self._want_dial.pop(pid, None)
        self._want_dial[pid] = addrs
        while len(self._want_dial) > PEX_MAX_PENDING:
            self._want_dial.popitem(last=False)

    async def peer_exchange_loop(self) -> None:
        """Dial peers learned from ads (peer exchange through the mesh) or mDNS, with backoff:
        a few at a time, each within PEX_DIAL_TIMEOUT_S; any failure of one peer is counted,
        logged once for it and backs it off."""
        limiter = trio.CapacityLimiter(PEX_CONCURRENT_DIALS)
        while True:
            await trio.sleep(DIAL_EVERY_S)
            try:
                while not self.discovered.empty():
                    self._queue_dial(*self.discovered.get_nowait())
                batch = self._dial_batch()
            except Exception as exc:
                self.errors.record("peer_exchange", "", "peer exchange failed", exc)
                continue
            if not batch:
                continue
            async with trio.open_nursery() as nursery:
                for pid, addrs in batch:
                    nursery.start_soon(self._dial_one, limiter, pid, addrs)

    def _dial_batch(self) -> list[tuple[str, list[str]]]:
        """Take this round's dials off the queue (newest first): peers not backed off, not
        connected, within the free connection slots and PEX_DIALS_PER_ROUND. Peers past the
        round stay queued; at TARGET_CONNECTIONS the queue is dropped (a peer's next ad
        queues it again)."""
        now = time.monotonic()
        room = min(TARGET_CONNECTIONS - len(self.mesh.connected_peers()), PEX_DIALS_PER_ROUND)
        if room <= 0:
            self._want_dial.clear()
            return []
        batch: list[tuple[str, list[str]]] = []
        while self._want_dial and len(batch) < room:
            pid, addrs = self._want_dial.popitem(last=True)
            if self._dial_backoff.get(pid, 0) > now or not addrs or pid == self.mesh.peer_id:
                continue
            if self.mesh.is_connected(pid):
                continue
            batch.append((pid, addrs))
        return batch

    async def _dial_one(self, limiter: trio.CapacityLimiter, pid: str, addrs: list[str]) -> None:
        async with limiter:
            try:
                with trio.fail_after(PEX_DIAL_DEADLINE_S):
                    await self.mesh.dial(addrs, timeout=PEX_DIAL_TIMEOUT_S)
                self._dial_backoff.pop(pid, None)
            except Exception as exc:  # any type: a peer's bad address, a dial that hangs, ...
                self._back_off(pid)
                level = logging.DEBUG if isinstance(exc, ConnectionError) else logging.INFO
                self.errors.record("peer_exchange", pid, f"dial of {pid} failed", exc, level)

    def _back_off(self, pid: str) -> None:
        self._dial_backoff.pop(pid, None)
        self._dial_backoff[pid] = time.monotonic() + DIAL_BACKOFF_S
        while len(self._dial_backoff) > MAX_REMEMBERED:
            self._dial_backoff.popitem(last=False)

    async def bootstrap_loop(self, addr: str) -> None:
        """Keep a connection to one bootstrap peer, retrying with capped exponential backoff
        (any failure, not only a refused connection)."""
        delay = 0.5
        try:
            _, peer = split_peer_addr(addr)
        except ValueError as exc:  # config validation checks this; never spin on it
            self.errors.record("bootstrap", addr, f"bootstrap address {addr!r} unusable", exc)
            return
        while True:
            try:
                connected = self.mesh.is_connected(peer)
                if not connected:
                    await self.mesh.dial([addr])
                    log.info("connected to bootstrap peer %s", addr)
                    delay = 0.5
            except Exception as exc:
                self.errors.counts["bootstrap"] += 1
                log.warning("bootstrap peer unreachable, retrying in %.1f s: %s", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, self.cfg.bootstrap_retry_max)
                continue
            self.joined.set()
            await trio.sleep(BOOTSTRAP_CHECK_S)
