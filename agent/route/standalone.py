"""A client that joins the mesh by itself (no local agent): listens to ads, opens sessions.

The Python API (as in the README):

    head = ClientHead.load("./tiny-llama", dtype="float32", device="cpu")
    async with open_standalone(["/ip4/127.0.0.1/tcp/7411/p2p/12D3Koo..."]) as mesh:
        await wait_for_model(mesh, "tiny-llama", timeout_s=20)
        result = await generate_ids(mesh, head, [1, 2, 3], max_new_tokens=16)

(`generate_ids` from agent.route.generate; pass it `cfg=ClientConfig(...)` for other
deadlines, failover or verified outputs.)
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from agent.errors import ShardmeshError
from agent.policy.routing import NoRoute, find_route
from agent.policy.snapshot import PeerSpan
from agent.route.loading import DEADLINE_MARGIN_S, Notify, loading_now
from agent.route.view import GenerationError, LocalForward, ModelLoading, ModelPeer


class StandaloneView:
    """A mesh node that only listens to ads and opens sessions (no ads, no serving)."""

    local: LocalForward | None = None

    def __init__(self, mesh: Any) -> None:
        from agent.policy.peertable import AdIntake, PeerTable, RelayBudget, TableLimits

        self.mesh = mesh
        self.host = mesh.host
        self.self_id = mesh.peer_id
        # Bounded like an agent's, and new peer ids charged to the peer relaying them, so a
        # flood of fresh signed ids through a bootstrap peer cannot fill the client either.
        limits = TableLimits()
        self.table = PeerTable(mesh.peer_id, limits)
        mesh.intake = AdIntake(self.table, RelayBudget(limits.new_peers_per_minute))

    def spans(self, model_id: str) -> list[PeerSpan]:
        self.table.expire(time.monotonic(), self.mesh.is_connected)
        return self.table.spans_for(model_id)

    def on_ad(self, ad: Any) -> None:
        self.table.update(ad, time.monotonic())

    def peer_addrs(self, peer_id: str) -> list[str]:
        return self.table.addrs(peer_id)

    def model_peers(self, model_id: str) -> list[ModelPeer]:
        """Every peer whose ad names the model (agent.route.view.ModelPeers)."""
        return [
            ModelPeer(e.ad.peer_id, e.ad.state, e.ad.span, e.ad.reason)
            for e in self.table
            if e.ad.model == model_id
        ]


@asynccontextmanager
async def open_standalone(
    bootstrap: Sequence[str],
    *,
    join_timeout_s: float = 15.0,
    swarm_secret_file: Path | None = None,
) -> AsyncIterator[StandaloneView]:
    """Join the mesh through `bootstrap` with a throwaway identity and listen to its ads
    (a private swarm's members admit it only with the swarm's secret)."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from agent.config import MeshConfig, SwarmConfig
    from agent.net.mesh import open_mesh

    if not bootstrap:
        raise GenerationError("a standalone client needs at least one --bootstrap address")
    # Loopback listen, no mDNS: a client dials out and is reached only on its connections.
    cfg = MeshConfig(swarm=SwarmConfig(secret_file=swarm_secret_file))
    async with open_mesh(cfg, create_new_key_pair()) as mesh, trio.open_nursery() as nursery:
        view = StandaloneView(mesh)
        nursery.start_soon(mesh.receive_ads, view.on_ad)
        errors = []
        with trio.move_on_after(join_timeout_s):
            for addr in bootstrap:
                try:
                    await mesh.dial([addr])
                    break
                except ConnectionError as exc:
                    errors.append(str(exc))
            else:
                raise GenerationError(f"cannot join the mesh: {'; '.join(errors)}")
        if not mesh.connected_peers():
            raise GenerationError("cannot join the mesh: bootstrap peers did not answer in time")
        try:
            yield view
        finally:
            nursery.cancel_scope.cancel()


async def wait_for_model(
    view: StandaloneView,
    want: str,
    timeout_s: float,
    *,
    loading_wait_s: float = 0.0,
    notify: Notify | None = None,
) -> tuple[str, int]:
    """Wait until some peer advertises a model matching `want` (id or unique name) and every
    block is served; returns (model id, n_blocks).

    Up to `timeout_s` for the model to show up and be covered; while peers are loading its
    blocks (agent.route.loading), up to `loading_wait_s` from the start when that is longer,
    telling `notify`; then ModelLoading. Otherwise GenerationError says what is missing."""
    from agent.policy.modelresolve import resolve_model

    began = trio.current_time()
    deadline = began + timeout_s
    # Say "loading" before an enclosing deadline (the CLI's --timeout) cuts the wait short.
    loading_deadline = max(deadline, began + loading_wait_s)
    outer = trio.current_effective_deadline()
    if math.isfinite(outer):
        loading_deadline = min(loading_deadline, outer - DEADLINE_MARGIN_S)
    told = ""
    while True:
        loading = None
        try:
            model_id, n_blocks = resolve_model(want, view.table.models())
            loading = loading_now(view, model_id, 0, n_blocks)
            find_route(view.spans(model_id), 0, n_blocks, rtt_ms={})
            return model_id, n_blocks
        except (ShardmeshError, NoRoute) as exc:
            now = trio.current_time()
            if loading is not None:
                line = loading.describe()
                if notify is not None and line != told:
                    await notify(loading)
                    told = line
                if now >= loading_deadline:
                    raise ModelLoading(
                        f"{line}; still loading after {now - began:.0f} s: try again shortly"
                    ) from None
            elif now >= deadline:
                raise GenerationError(str(exc)) from None
        await trio.sleep(0.2)
