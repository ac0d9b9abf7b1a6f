"""The running agent, wired together: `run_agent(cfg)` is what `shardmesh up` (and systemd)
runs.

The parts live in their own modules and get their own config section: the lifecycle (state,
reason, admission, the drain; agent.daemon.lifecycle), the ads (agent.daemon.announce), the
peers (agent.daemon.discovery), the control API's views (agent.daemon.views), the idle policy
(agent.daemon.idlewatch) and what systemd sees (agent.daemon.service). `Node` holds them and
is what the serving part (ServingHost), the generation client (MeshView), the HTTP API
(agent.api.httpapi.ApiNode) and systemd (service.Supervised) see of the agent. The parts
import none of this module.

Everything lives in one trio nursery; SIGTERM/SIGINT drain, publish a leaving ad and cancel
it. Serving model blocks is an optional part (agent.serve), imported only when a model is
configured, so an agent that serves nothing never imports torch.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from agent.api import control
from agent.config import AgentConfig
from agent.daemon import service, views
from agent.daemon.announce import Announcer
from agent.daemon.discovery import Discovery, LoopErrors
from agent.daemon.idlewatch import IdleWatch
from agent.daemon.lifecycle import Lifecycle, load_error_line, settle_failed_load
from agent.errors import ShardmeshError
from agent.hw.devices import DeviceReport, discover
from agent.net.identity import load_or_create_identity, private_seed
from agent.net.mesh import Mesh, check_listen_addrs, open_mesh
from agent.policy.peertable import INTAKE_REASONS, AdIntake, PeerTable, RelayBudget, TableLimits
from agent.policy.snapshot import LEAVING, PeerSpan
from agent.route.view import LocalForward, ModelPeer

if TYPE_CHECKING:
    from agent.route.generation import ClientParts
    from agent.route.health import PeerHealth
    from agent.serve.serving import Serving

log = logging.getLogger("shardmesh.agent")


class Node:
    """The agent's parts and the views others get of them (see the module's docstring)."""

    def __init__(self, cfg: AgentConfig, mesh: Mesh, key: Ed25519PrivateKey) -> None:
        self.cfg = cfg
        # What the generation client reads (agent.route.view.MeshView).
        self.mesh = mesh
        self.host: IHost = mesh.host
        self.self_id: str = mesh.peer_id
        self.local: LocalForward | None = None  # the agent's own blocks as a hop, once serving
        # The peer table is bounded; eviction spares peers we are connected to and peers
        # that served our generations. New peer ids are charged to the peer relaying them.
        limits = TableLimits.from_config(cfg.limits)
        self.table = PeerTable(mesh.peer_id, limits, protected=self._protected)
        mesh.intake = AdIntake(
            self.table, RelayBudget(limits.new_peers_per_minute), self.model_blocks
        )
        for reason in INTAKE_REASONS:
            mesh.validator.rejected.setdefault(reason, 0)
        self.views = views.PeerViews(self.table)
        self.loop_errors = LoopErrors()
        self.device_report: DeviceReport | None = None
        self.serving: Serving | None = None
        self.idle: IdleWatch | None = None  # set when [idle] is enabled and a model is served
        self.lifecycle = Lifecycle(self)
        self.discovery = Discovery(cfg.discovery, mesh, self.table, self.loop_errors)
        self.announcer = Announcer(
            cfg.announce, mesh, key, self.table, self.lifecycle, self.devices
        )
        self.announcer.refresh_devices = self.refresh_devices
        self._client_parts: ClientParts | None = None
        self._health: PeerHealth | None = None

    def attach(self, serving: Serving) -> None:
        """The serving part (before its blocks load): its ads, its hop, its admission."""
        from agent.serve.local import LocalEndpoint

        self.serving = self.announcer.serving = serving
        self.local = LocalEndpoint(serving)
        self.lifecycle.attach(serving)

    def watch_idle(self, serving: Serving) -> IdleWatch:
        """[idle] on: the idle watch drives the serving part and reads the devices."""
        self.idle = IdleWatch(self.cfg.idle, serving, self.lifecycle, self, self.set_devices)
        self.announcer.refresh_devices = None  # the idle watch reads them more often
        return self.idle

    # --- devices ---------------------------------------------------------------------------
    def devices(self) -> DeviceReport | None:
        return self.device_report

    def set_devices(self, report: DeviceReport) -> None:
        self.device_report = report

    async def refresh_devices(self) -> None:
        self.device_report = await trio.to_thread.run_sync(discover)

    # --- what the serving part needs (agent.serve.host.ServingHost) -------------------------
    @property
    def peer_id(self) -> str:
        return self.mesh.peer_id

    def spans_for(self, model_id: str) -> list[PeerSpan]:
        return self.table.spans_for(model_id)

    def set_stream_handler(
        self, protocol_id: str, handler: Callable[[Any], Awaitable[None]]
    ) -> None:
        self.mesh.host.set_stream_handler(TProtocol(protocol_id), handler)

    async def publish_ad(self, state: str | None = None) -> None:
        await self.announcer.publish_ad(state)

    # --- what the generation client needs (MeshView), besides the attributes ----------------
    def spans(self, model_id: str) -> list[PeerSpan]:
        """The table's rows for a model, this agent's own blocks included once loaded.
        Entries are expired by Discovery.expire_loop (every 0.25 s)."""
        spans = self.table.spans_for(model_id)
        s = self.serving
        if s is not None and s.model_id == model_id and s.shard is not None:
            spans.append(
                PeerSpan(
                    peer_id=self.self_id,
                    start=s.span[0],
                    end=s.span[1],
                    throughput=s.throughput,
                    state=self.lifecycle.state,
                    sessions=s.active_sessions(),
                    kv_free_tokens=s.kv_free_tokens(),
                )
            )
        return spans

    def peer_addrs(self, peer_id: str) -> list[str]:
        return self.table.addrs(peer_id)

    def model_peers(self, model_id: str) -> list[ModelPeer]:
        """Every peer whose ad names the model, this agent included, whatever its state and
        span (agent.route.view.ModelPeers): how a client tells "loading" from "not served"."""
        rows = [
            ModelPeer(e.ad.peer_id, e.ad.state, e.ad.span, e.ad.reason)
            for e in self.table
            if e.ad.model == model_id
        ]
        s = self.serving
        if s is not None and s.model_id == model_id:
            state, reason = self.lifecycle.state, self.lifecycle.reason()
            rows.append(ModelPeer(self.self_id, state, s.chosen_span(), reason))
        return rows

    # --- what the peer table and the ad intake ask ----------------------------------------
    def _protected(self, peer_id: str) -> bool:
        """Peers the table never evicts to make room: connected ones, ones that served us."""
        health = self._health
        return self.mesh.is_connected(peer_id) or (health is not None and peer_id in health.rtt_ms)

    def model_blocks(self, model_id: str) -> int | None:
        """The block count of a model this agent knows (serves), else None: an ad for it
        with another count is refused."""
        s = self.serving
        return s.n_blocks if s is not None and s.model_id == model_id else None

    # --- what the control API, the HTTP API, /metrics and systemd read -------------------------
    @property
    def state(self) -> str:
        return self.lifecycle.state

    @property
    def started(self) -> float:
        return self.lifecycle.started

    @property
    def joined(self) -> trio.Event:
        return self.discovery.joined

    @property
    def bootstrap_wait(self) -> float:
        return self.discovery.cfg.bootstrap_wait

    def peer_states(self) -> Iterable[str]:
        return (entry.ad.state for entry in self.table)

    def status(self) -> dict[str, Any]:
        errors = dict(self.loop_errors.counts)
        errors["announce"] = sum(self.announcer.failures.values())
        errors["ad_handler"] = self.mesh.ad_handler_errors
        errors["ad_validator"] = self.mesh.validate_errors
        return views.status(
            self.mesh,
            self.table,
            self.lifecycle,
            self.device_report,
            self.serving,
            self.idle,
            loop_errors=errors,
        )

    def peers(self) -> dict[str, Any]:
        return views.peers(self.mesh, self.table, self.coverage(), self.views)

    def coverage(self) -> list[dict[str, Any]]:
        """Per model: how many times each block is served (online peers, this node included).
        Built once per change of the table or of this agent's own span (views.PeerViews)."""
        s = self.serving
        if s is None:
            return self.views.coverage(None)
        row = None
        if s.shard is not None:
            # Only the span and the state count for coverage: a key that changes with them.
            row = PeerSpan(self.self_id, s.span[0], s.span[1], 0.0, self.lifecycle.state, 0, 0)
        return self.views.coverage((s.model_id, s.model_name, s.n_blocks, row))

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
        return await run_generation(
            self, parts, request, model_id, model_dir, emit, health=health, cfg=self.cfg.client
        )

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


async def run_agent(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT. Raises IdentityError/ControlError/etc for setup
    failures, which the CLI turns into one line and exit 1."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pair = load_or_create_identity(cfg.identity_path)
    control.prepare_socket_path(cfg.control_socket)
    # Ports in use: fail now, not after loading torch (open_mesh and the API check again).
    check_listen_addrs(cfg.mesh.listen)
    if cfg.api.listen:
        from agent.api.httpapi import check_api_port

        check_api_port(cfg.api)
    if cfg.swarm.secret_file is not None:
        from agent.net.swarm import load_secret

        load_secret(cfg.swarm.secret_file)  # fail now, not after loading torch and blocks
    signing_key = Ed25519PrivateKey.from_private_bytes(private_seed(key_pair))
    serving = None
    unreadable = None  # why the checkpoint cannot be served: the agent stays up and says so
    if cfg.model is not None:
        from agent.serve.serving import Serving  # imports torch: only for agents that serve

        try:
            serving = Serving.prepare(cfg.serve)
        except ShardmeshError as exc:  # a corrupt or missing checkpoint, blocks outside it
            unreadable = load_error_line(exc)

    leaving = trio.Event()
    try:
        await _run_mesh(cfg, key_pair, signing_key, serving, leaving, unreadable)
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
    unreadable: str | None = None,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_mesh(cfg.mesh, key_pair) as mesh:
            node = Node(cfg, mesh, signing_key)
            node.discovery.watch_mdns()
            await node.refresh_devices()
            log.info("peer id %s", mesh.peer_id)
            for addr in mesh.listen_addrs():
                log.info("listening on %s", addr)
            async with trio.open_nursery() as nursery:
                node.discovery.start(nursery)
                await nursery.start(
                    control.serve_control,
                    cfg.control_socket,
                    {"status": _wrap(node.status), "peers": _wrap(node.peers)},
                    {"generate": node.generate},
                )
                if cfg.api.listen:  # OpenAI-compatible API and /metrics (agent.api.httpapi)
                    from agent.api.httpapi import serve_api

                    await nursery.start(serve_api, node, cfg)
                nursery.start_soon(service.supervise, node)  # systemd: STATUS=, WATCHDOG=1
                nursery.start_soon(node.announcer.run)
                nursery.start_soon(_leave_on_signal, signals, node, nursery.cancel_scope, leaving)
                online = True
                failed = unreadable
                if serving is not None:
                    node.attach(serving)
                    # Ads say "joining" (with the chosen span) while the blocks load.
                    try:
                        if cfg.idle.enabled:
                            online = await node.watch_idle(serving).start(nursery)
                        else:
                            await serving.start(node, nursery)
                    except Exception as exc:  # bad weights, a missing tensor, out of memory
                        failed = load_error_line(exc)
                if failed is not None:
                    online = False
                    await settle_failed_load(node.lifecycle, serving, failed)
                if online:
                    node.lifecycle.online()  # refused once stopping: a signal while loading wins
                await node.publish_ad()
                log.info("agent %s", "online" if online else "up, serving nothing for now")
                nursery.start_soon(service.announce_ready, node)  # systemd: READY=1


async def _leave_on_signal(
    signals: Any, node: Node, scope: trio.CancelScope, leaving: trio.Event
) -> None:
    """SIGTERM/SIGINT at any point (also while blocks load: the load's worker thread is
    abandoned, not waited for): drain, say goodbye, stop. The drain's grace is
    `idle.drain_grace`, bounded by systemd's stop timeout; a second signal skips the wait
    (Lifecycle.stop), and one once the drain is over (or there is none) skips the leaving
    ad's linger too: the agent exits at once."""
    async for signum in signals:
        name = signal.Signals(signum).name
        log.info("received %s, leaving the mesh", name)
        service.notify_stopping(f"received {name}")
        break
    leaving.set()
    # One reader of the signals from here on (a receiver takes one at a time): it hands each
    # to the drain, and cuts the rest of the way out short once the drain is over.
    send, further = trio.open_memory_channel[int](math.inf)
    with trio.CancelScope() as way_out:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_further_signals, signals, send, node, way_out)
            async with further:
                await node.lifecycle.stop(node.cfg.idle.drain_grace, further)
            nursery.cancel_scope.cancel()
    # py-libp2p logs its own teardown races (tasks spawned into closing nurseries) as
    # errors with tracebacks; they say nothing about our shutdown, which is orderly.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    scope.cancel()


async def _further_signals(
    signals: Any, send: trio.MemorySendChannel[int], node: Node, way_out: trio.CancelScope
) -> None:
    """Signals after the first: to the drain (which a second one cuts short) while it runs;
    after it (the leaving ad), one ends the way out now."""
    async for signum in signals:
        if node.lifecycle.state == LEAVING:
            log.info("received %s again: exiting now", signal.Signals(signum).name)
            way_out.cancel()
            return
        send.send_nowait(signum)


def _wrap(fn: Callable[[], Any]) -> control.Handler:
    async def handler(req: dict[str, Any]) -> Any:
        return fn()

    return handler
