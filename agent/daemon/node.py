"""The running agent: mesh membership, ads, peer table, discovery loops, control API.

`run_agent(cfg)` is what `shardmesh up` (and systemd) runs. Everything lives in one trio
nursery; SIGTERM/SIGINT publish a leaving ad and cancel it. Serving model blocks is an
optional part (agent.serve), imported only when a model is configured, so an agent that
serves nothing never imports torch.
"""

from __future__ import annotations

import logging
import queue
import random
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.api import control
from agent.config import AgentConfig
from agent.daemon import service
from agent.errors import ShardmeshError
from agent.hw.devices import DeviceReport, discover
from agent.net.identity import load_or_create_identity, private_seed
from agent.net.mesh import Mesh, open_mesh
from agent.policy.peertable import PeerTable
from agent.policy.snapshot import PeerSpan
from protocol import CapacityAd, DeviceSummary, encode_signed_ad
from protocol.ids import CAPACITY_TOPIC, PROTOCOL_VERSION

if TYPE_CHECKING:
    from agent.daemon.idlewatch import IdleWatch
    from agent.route.generation import ClientParts
    from agent.route.health import PeerHealth
    from agent.serve.serving import Serving

log = logging.getLogger("shardmesh.agent")

# How many peers we dial on our own after learning them from ads; beyond this, gossip
# still reaches us through the peers we have.
TARGET_CONNECTIONS = 24
LEAVE_GRACE_S = 1.5
DEVICE_REFRESH_S = 5.0  # NVML/psutil readings in ads: fresh enough, and cheap
# Mesh-wide capacity ads per second we aim to stay under. py-libp2p's gossipsub delivered
# ads in ~25-80 ms at up to ~6 ads/s mesh-wide on a 2-core box, but at 17 ads/s (17 agents
# announcing every second) delivery fell to seconds and tables flapped (see the note).
# So each agent stretches its interval as the mesh grows, and its TTL with it.
MESH_AD_RATE = 5.0
TTL_PER_INTERVAL = 4.0


@dataclass
class NodeState:
    """What the agent says about itself; read by ads, status and the idle policy."""

    state: str = "joining"
    reason: str = "starting"
    devices: DeviceReport | None = None
    started: float = field(default_factory=time.monotonic)


class Node:
    def __init__(self, cfg: AgentConfig, mesh: Mesh, key: Ed25519PrivateKey) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.key = key
        self.table = PeerTable(mesh.peer_id)
        self.info = NodeState()
        self.serving: Serving | None = None
        self._local: Any = None  # set with serving
        # Ad sequence numbers start from the wall clock in ms, so a restarted agent (same
        # peer id) continues above the numbers its previous run used.
        self._seq = int(time.time() * 1000)
        self._dial_backoff: dict[str, float] = {}
        self._want_dial: list[CapacityAd] = []
        # Peers mDNS found on the LAN, pushed from zeroconf's thread: (peer id, addrs).
        self.discovered: queue.SimpleQueue[tuple[str, list[str]]] = queue.SimpleQueue()
        self.joined = trio.Event()
        self._client_parts: ClientParts | None = None
        self._health: PeerHealth | None = None
        self.idle: IdleWatch | None = None  # set when [idle] is enabled and a model is served

    # --- what the generation client needs (agent.route.view.MeshView) ---------------------
    @property
    def host(self) -> Any:
        return self.mesh.host

    @property
    def self_id(self) -> str:
        return self.mesh.peer_id

    @property
    def local(self) -> Any:
        """The agent's own blocks as a hop (agent.serve.local.LocalEndpoint), or None."""
        return self._local

    # --- what the serving part needs (agent.serve.serving.ServingHost) ---------------------
    @property
    def peer_id(self) -> str:
        return self.mesh.peer_id

    def spans_for(self, model_id: str) -> list[PeerSpan]:
        return self.table.spans_for(model_id)

    def devices(self) -> DeviceReport | None:
        return self.info.devices

    def set_stream_handler(self, protocol_id: str, handler: Any) -> None:
        self.mesh.host.set_stream_handler(protocol_id, handler)

    def reason(self) -> str:
        """Why the agent is in its state; while joining, what the serving part is doing."""
        if self.info.state == "joining" and self.serving is not None and self.serving.activity:
            return self.serving.activity
        return self.info.reason

    def spans(self, model_id: str) -> list[PeerSpan]:
        # Entries are expired by expire_loop (every 0.25 s), which also logs and forgets.
        spans = self.table.spans_for(model_id)
        s = self.serving
        if s is not None and s.model_id == model_id and s.shard is not None:
            spans.append(
                PeerSpan(
                    peer_id=self.self_id,
                    start=s.span[0],
                    end=s.span[1],
                    throughput=s.throughput,
                    state=self.info.state,
                    sessions=s.active_sessions(),
                    kv_free_tokens=s.kv_free_tokens(),
                )
            )
        return spans

    def peer_addrs(self, peer_id: str) -> list[str]:
        return self.table.addrs(peer_id)

    def known_models(self) -> dict[str, tuple[str | None, int | None]]:
        models = self.table.models()
        if self.serving is not None:
            models[self.serving.model_id] = (self.serving.model_name, self.serving.n_blocks)
        return models

    async def generate(self, req: dict[str, Any], emit: control.Emit) -> Any:
        """The control API's `generate`: imports torch on first use only."""
        from agent.policy.modelresolve import resolve_model
        from agent.route.generation import GenerateRequest, run_generation

        request = GenerateRequest.from_json(req)
        model_id, _ = resolve_model(request.model, self.known_models())
        model_dir = request.model_dir
        if model_dir is None and self.serving is not None and self.serving.model_id == model_id:
            model_dir = self.cfg.model
        if model_dir is None:
            raise ShardmeshError(
                f"this agent has no local checkpoint of {model_id}: pass --model-dir DIR"
            )
        parts, health = self.client_state()
        return await run_generation(self, parts, request, model_id, model_dir, emit, health=health)

    def client_state(self) -> tuple[ClientParts, PeerHealth]:
        """The head/tokenizer cache and peer failure history shared by every way a
        generation reaches this agent (control socket, HTTP API)."""
        from agent.route.generation import ClientParts
        from agent.route.health import PeerHealth

        if self._client_parts is None or self._health is None:
            self._client_parts, self._health = ClientParts(), PeerHealth()
        return self._client_parts, self._health

    def failovers(self) -> int:
        return self._health.failovers if self._health is not None else 0

    # --- ads ---------------------------------------------------------------------------
    def build_ad(self, state: str | None = None) -> CapacityAd:
        self._seq += 1
        devices = self.info.devices
        serving = self.serving
        return CapacityAd(
            version=PROTOCOL_VERSION,
            peer_id=self.mesh.peer_id,
            addrs=tuple(self.mesh.listen_addrs()),
            devices=tuple(DeviceSummary(**d) for d in devices.summaries()) if devices else (),
            model=serving.model_id if serving else None,
            model_name=serving.model_name if serving else None,
            n_blocks=serving.n_blocks if serving else None,
            span=serving.chosen_span() if serving else None,
            throughput=serving.throughput if serving else 0.0,
            kv_free_tokens=serving.kv_free_tokens() if serving else 0,
            sessions=serving.active_sessions() if serving else 0,
            state=state or self.info.state,
            seq=self._seq,
            timestamp=time.time(),
            ttl=self.ad_ttl(),
            reason=self.reason(),
        )

    def announce_interval(self) -> float:
        return max(self.cfg.announce_interval, (len(self.table) + 1) / MESH_AD_RATE)

    def ad_ttl(self) -> float:
        return max(self.cfg.ad_ttl, TTL_PER_INTERVAL * self.announce_interval())

    async def publish_ad(self, state: str | None = None) -> None:
        data = encode_signed_ad(self.build_ad(state), self.key)
        await self.mesh.publish(data)

    async def announce_loop(self) -> None:
        """Publish an ad every interval, on deadlines: a slow publish or device scan must
        not stretch the period (peers would see the ad late and expire us)."""
        refreshed = time.monotonic()
        deadline = trio.current_time()
        while True:
            # With [idle] on, IdleWatch reads the devices more often and stores the report.
            if self.idle is None and time.monotonic() - refreshed >= DEVICE_REFRESH_S:
                self.info.devices = await trio.to_thread.run_sync(discover)
                refreshed = time.monotonic()
            interval = self.announce_interval()
            with trio.move_on_after(interval):
                try:
                    await self.publish_ad()
                except Exception as exc:  # a publish failure must not kill the agent
                    log.warning("publishing the capacity ad failed: %s", exc)
            # Jitter keeps many agents started together from publishing in lockstep.
            deadline = max(deadline + interval * random.uniform(0.9, 1.1), trio.current_time())
            await trio.sleep_until(deadline)

    # --- peers -------------------------------------------------------------------------
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
            if time.monotonic() - last_trim > 60:
                self.mesh.trim_router_state()
                last_trim = time.monotonic()
            for pid in self.table.expire(time.monotonic(), self.mesh.is_connected):
                log.info("peer expired: %s", pid)
                self.mesh.validator.forget(pid)
            await trio.sleep(0.25)

    def on_mdns_peer(self, info: Any) -> None:
        """libp2p's mDNS listener only fills the peerstore; queue the peer for a dial.
        Called from zeroconf's thread, hence the thread-safe queue."""
        pid = info.peer_id.to_base58()
        if pid != self.mesh.peer_id:
            self.discovered.put((pid, [f"{a}/p2p/{pid}" for a in info.addrs]))

    async def peer_exchange_loop(self) -> None:
        """Dial peers learned from ads (peer exchange through the mesh) or mDNS, with backoff."""
        while True:
            await trio.sleep(0.2)
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
                    self._dial_backoff[pid] = now + 10.0

    async def bootstrap_loop(self, addr: str) -> None:
        """Keep a connection to one bootstrap peer, retrying with capped exponential backoff."""
        delay = 0.5
        from agent.multiaddrs import split_peer_addr

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
            await trio.sleep(2.0)

    # --- control API -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        devices = self.info.devices
        result: dict[str, Any] = {
            "peer_id": self.mesh.peer_id,
            "addrs": self.mesh.listen_addrs(),
            "state": self.info.state,
            "reason": self.reason(),
            "devices": devices.summaries() if devices else [],
            "model": None,
            "model_name": None,
            "span": None,
            "sessions": 0,
            "protocols": self.protocols(),
            "uptime_s": round(time.monotonic() - self.info.started, 3),
            "rejected_ads": dict(self.mesh.validator.rejected),
            "connected_peers": len(self.mesh.connected_peers()),
            "known_peers": len(self.table),
            "gossip_bytes_in": self.mesh.bytes_in,
            "gossip_bytes_out": self.mesh.bytes_out,
            "ad_delay_ms": _percentiles(self.mesh.ad_delays_ms),
            "gossip_mesh_peers": self.mesh.gossip_mesh_size(),
        }
        if self.mesh.gate is not None:
            result.update(self.mesh.gate.status())  # "swarm", "swarm_refused"
        if self.serving:
            result.update(self.serving.status())
        if self.idle:
            result["idle"] = self.idle.status()
        return result

    def protocols(self) -> list[str]:
        from protocol.swarm import SWARM_AUTH_PROTOCOL_ID

        protos = [f"/meshsub/1.1.0 (topic {CAPACITY_TOPIC})", SWARM_AUTH_PROTOCOL_ID]
        if self.serving:
            protos.insert(0, self.serving.protocol_id)
        return protos

    def peers(self) -> dict[str, Any]:
        now = time.monotonic()
        rows = []
        for e in self.table:
            ad = e.ad
            rows.append(
                {
                    "peer_id": ad.peer_id,
                    "addrs": list(ad.addrs),
                    "state": ad.state,
                    "devices": [_device_dict(d) for d in ad.devices],
                    "model": ad.model,
                    "model_name": ad.model_name,
                    "n_blocks": ad.n_blocks,
                    "span": list(ad.span) if ad.span else None,
                    "throughput": ad.throughput,
                    "kv_free_tokens": ad.kv_free_tokens,
                    "sessions": ad.sessions,
                    "age_s": round(now - e.received, 3),
                    "connected": self.mesh.is_connected(ad.peer_id),
                }
            )
        return {"self": self.mesh.peer_id, "peers": rows, "coverage": self.coverage()}

    def coverage(self) -> list[dict[str, Any]]:
        """Per model: how many times each block is served (online peers, this node included)."""
        models = self.table.models()
        if self.serving:
            models.setdefault(
                self.serving.model_id, (self.serving.model_name, self.serving.n_blocks)
            )
        out = []
        for model_id, (name, n_blocks) in sorted(models.items()):
            if not n_blocks:
                continue
            counts = [0] * n_blocks
            spans = [
                e.ad.span for e in self.table if e.ad.model == model_id and e.ad.state == "online"
            ]
            if self.serving and self.serving.model_id == model_id and self.info.state == "online":
                spans.append(self.serving.chosen_span())
            for span in spans:
                if span:
                    for b in range(span[0], min(span[1], n_blocks)):
                        counts[b] += 1
            out.append(
                {
                    "model": model_id,
                    "model_name": name,
                    "n_blocks": n_blocks,
                    "replicas": counts,
                    "complete": min(counts) > 0,
                }
            )
        return out


def _percentiles(values: Any) -> dict[str, float] | None:
    data = sorted(values)
    if not data:
        return None
    return {
        "p50": round(data[len(data) // 2], 1),
        "p90": round(data[int(len(data) * 0.9)], 1),
        "max": round(data[-1], 1),
    }


def _device_dict(d: DeviceSummary) -> dict[str, Any]:
    return {
        "kind": d.kind,
        "name": d.name,
        "memory_total": d.memory_total,
        "memory_free": d.memory_free,
        "utilization": d.utilization,
    }


async def run_agent(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT. Raises IdentityError/ControlError/etc for setup
    failures, which the CLI turns into one line and exit 1."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pair = load_or_create_identity(cfg.identity_path)
    control.prepare_socket_path(cfg.control_socket)
    if cfg.swarm.secret_file is not None:
        from agent.net.swarm import load_secret

        load_secret(cfg.swarm.secret_file)  # fail now, not after loading torch and blocks
    signing_key = Ed25519PrivateKey.from_private_bytes(private_seed(key_pair))
    serving = None
    if cfg.model is not None:
        from agent.serve.serving import Serving  # imports torch: only for agents that serve

        serving = Serving.prepare(cfg.serve)

    leaving = trio.Event()
    try:
        await _run_mesh(cfg, key_pair, signing_key, serving, leaving)
    except BaseExceptionGroup as group:
        # py-libp2p's teardown can race (an inbound gossip message spawning a task into
        # its closing nursery) and raise from host.run(). Once we chose to stop, that is
        # noise, not a failure: exit 0 as promised. Before that, it is a real error.
        if not leaving.is_set():
            raise
        log.debug("libp2p teardown raised (ignored, we were stopping): %r", group)
    log.info("agent stopped")


async def _run_mesh(
    cfg: AgentConfig,
    key_pair: Any,
    signing_key: Ed25519PrivateKey,
    serving: Serving | None,
    leaving: trio.Event,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_mesh(cfg.mesh, key_pair) as mesh:
            node = Node(cfg, mesh, signing_key)
            if cfg.mdns:
                from libp2p.discovery.events.peerDiscovery import peerDiscovery

                peerDiscovery.register_peer_discovered_handler(node.on_mdns_peer)
            node.info.devices = await trio.to_thread.run_sync(discover)
            log.info("peer id %s", mesh.peer_id)
            for addr in mesh.listen_addrs():
                log.info("listening on %s", addr)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.peer_exchange_loop)
                nursery.start_soon(mesh.receive_ads, node.on_ad)
                nursery.start_soon(node.expire_loop)
                for addr in cfg.bootstrap:
                    nursery.start_soon(node.bootstrap_loop, addr)
                if not cfg.bootstrap:
                    node.joined.set()
                await nursery.start(
                    control.serve_control,
                    cfg.control_socket,
                    {"status": _wrap(node.status), "peers": _wrap(node.peers)},
                    {"generate": node.generate},
                )
                if cfg.api.listen:  # OpenAI-compatible API and /metrics (agent.httpapi)
                    from agent.api.httpapi import serve_api

                    await nursery.start(serve_api, node)
                nursery.start_soon(service.supervise, node)  # systemd: STATUS=, WATCHDOG=1
                nursery.start_soon(node.announce_loop)
                nursery.start_soon(_leave_on_signal, signals, node, nursery.cancel_scope, leaving)
                online = True
                if serving is not None:
                    from agent.serve.local import LocalEndpoint

                    node.serving, node._local = serving, LocalEndpoint(serving)
                    # Ads say "joining" (with the chosen span) while the blocks load.
                    if cfg.idle.enabled:
                        from agent.daemon.idlewatch import IdleWatch

                        node.idle = IdleWatch(node, serving)
                        online = await node.idle.start(nursery)
                    else:
                        await serving.start(node, nursery)
                if online and not leaving.is_set():  # a signal during loading wins
                    node.info.state, node.info.reason = "online", serving_reason(node)
                await node.publish_ad()
                log.info("agent %s", "online" if online else "up, serving nothing for now")
                nursery.start_soon(service.announce_ready, node)  # systemd: READY=1


async def _leave_on_signal(
    signals: Any, node: Node, scope: trio.CancelScope, leaving: trio.Event
) -> None:
    """SIGTERM/SIGINT at any point (also while blocks load): drain, say goodbye, stop."""
    async for signum in signals:
        log.info("received %s, leaving the mesh", signal.Signals(signum).name)
        service.notify_stopping(f"received {signal.Signals(signum).name}")
        break
    leaving.set()
    await _drain_for_shutdown(node, signals)
    node.info.state = "leaving"
    with trio.move_on_after(LEAVE_GRACE_S):
        await node.publish_ad("leaving")
        # Let the first hop carry the leaving ad out before the host closes (at 20 agents
        # a 0.3 s wait once lost it: peers then dropped us only at TTL).
        await trio.sleep(0.8)
    # py-libp2p logs its own teardown races (tasks spawned into closing nurseries) as
    # errors with tracebacks; they say nothing about our shutdown, which is orderly.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    scope.cancel()


async def _drain_for_shutdown(node: Node, signals: Any) -> None:
    """Like the owner coming back: no new sessions, and running ones get the grace period
    (bounded by systemd's stop timeout, leaving time to leave) to finish; what is left is
    ended so its clients fail over at once. A second signal skips the wait."""
    serving = node.serving
    if serving is None or serving.shard is None:
        return
    serving.set_accepting(False)
    from agent.daemon.sdnotify import bounded_grace

    grace = bounded_grace(node.cfg.idle.drain_grace)
    if serving.active_sessions() and grace > 0:
        node.info.state = "draining"
        node.info.reason = f"stopping: {serving.active_sessions()} sessions get {grace:.0f} s"
        log.info("draining %d sessions for up to %.0f s", serving.active_sessions(), grace)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:

                async def second_signal() -> None:
                    async for _ in signals:
                        log.info("second signal: leaving now")
                        nursery.cancel_scope.cancel()

                nursery.start_soon(second_signal)
                with trio.move_on_after(1.5):
                    await node.publish_ad("draining")
                while serving.active_sessions():
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    left = serving.active_sessions()
    if left:
        log.warning("ending %d sessions still open (their clients fail over)", left)
    with trio.move_on_after(2.0):
        await serving.end_sessions()


def serving_reason(node: Node) -> str:
    if node.serving:
        s, e = node.serving.span
        return f"serving blocks {s}:{e} of {node.serving.model_name}"
    return "no model configured: routing and relaying only"


def _wrap(fn: Any) -> control.Handler:
    async def handler(req: dict[str, Any]) -> Any:
        return fn()

    return handler
