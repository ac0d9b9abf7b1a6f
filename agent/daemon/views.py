"""What the control API's `status` and `peers` answer (and /metrics' coverage): plain dicts
built from the running agent's parts when asked. The JSON keys are part of the CLI's
`--json` output: keep them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from agent.daemon.lifecycle import Lifecycle
from agent.hw.devices import DeviceReport
from agent.net.mesh import Mesh
from agent.policy.peertable import PeerTable
from agent.policy.placement import coverage
from agent.policy.snapshot import ROUTABLE_STATES, PeerSpan
from protocol import DeviceSummary
from protocol.ids import CAPACITY_TOPIC


class Reporting(Protocol):
    """A part that adds its own keys to `status` (the serving part, the idle watch)."""

    def status(self) -> dict[str, Any]: ...


class ServedModel(Reporting, Protocol):
    """The serving part as `status` and `coverage` see it (agent.serve.serving.Serving)."""

    @property
    def protocol_id(self) -> str: ...

    @property
    def model_id(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def n_blocks(self) -> int: ...


def status(
    mesh: Mesh,
    table: PeerTable,
    lifecycle: Lifecycle,
    devices: DeviceReport | None,
    serving: ServedModel | None,
    idle: Reporting | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "peer_id": mesh.peer_id,
        "addrs": mesh.listen_addrs(),
        "state": lifecycle.state,
        "reason": lifecycle.reason(),
        "devices": devices.summaries() if devices else [],
        "model": None,
        "model_name": None,
        "span": None,
        "sessions": 0,
        "protocols": protocols(serving),
        "uptime_s": round(time.monotonic() - lifecycle.started, 3),
        "rejected_ads": dict(mesh.validator.rejected),
        "connected_peers": len(mesh.connected_peers()),
        "known_peers": len(table),
        "gossip_bytes_in": mesh.bytes_in,
        "gossip_bytes_out": mesh.bytes_out,
        "ad_delay_ms": _percentiles(mesh.ad_delays_ms),
        "gossip_mesh_peers": mesh.gossip_mesh_size(),
    }
    if mesh.gate is not None:
        result.update(mesh.gate.status())  # "swarm", "swarm_refused"
    if serving:
        result.update(serving.status())
    if idle:
        result["idle"] = idle.status()
    return result


def protocols(serving: ServedModel | None) -> list[str]:
    from protocol.swarm import SWARM_AUTH_PROTOCOL_ID

    protos = [f"/meshsub/1.1.0 (topic {CAPACITY_TOPIC})", SWARM_AUTH_PROTOCOL_ID]
    if serving:
        protos.insert(0, serving.protocol_id)
    return protos


def peers(mesh: Mesh, table: PeerTable, coverage_rows: list[dict[str, Any]]) -> dict[str, Any]:
    now = time.monotonic()
    rows = []
    for e in table:
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
                "connected": mesh.is_connected(ad.peer_id),
            }
        )
    return {"self": mesh.peer_id, "peers": rows, "coverage": coverage_rows}


def model_coverage(
    models: dict[str, tuple[str | None, int | None]],
    spans_for: Callable[[str], Iterable[PeerSpan]],
) -> list[dict[str, Any]]:
    """Per model: how many times each block is served by online peers (`spans_for(model_id)`
    gives the rows, this agent's own included)."""
    out = []
    for model_id, (name, n_blocks) in sorted(models.items()):
        if not n_blocks:
            continue
        counts = coverage(spans_for(model_id), n_blocks, ROUTABLE_STATES)
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
