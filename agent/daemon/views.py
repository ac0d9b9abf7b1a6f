"""What the control API's `status` and `peers` answer (and /metrics' coverage): plain dicts
built from the running agent's parts when asked. The JSON keys are part of the CLI's
`--json` output: keep them.

What depends only on the peer table (each peer's row less its age and connection, the
coverage per model) is built once per table change (`PeerViews`, keyed on the table's
`version`), not per request, and costs O(peers): coverage is a sweep over span endpoints
(agent.policy.placement.coverage_runs); the per-block `replicas` list is at most
protocol.ads.MAX_BLOCKS long, and at most MAX_COVERAGE_MODELS models get a row (this agent's
own first, then those most peers serve; `coverage_omitted` counts the others)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from agent.daemon.announce import ServedModelId
from agent.daemon.lifecycle import Lifecycle
from agent.hw.devices import DeviceReport
from agent.net.mesh import Mesh
from agent.policy.peertable import PeerEntry, PeerTable
from agent.policy.placement import coverage_runs
from agent.policy.snapshot import ROUTABLE_STATES, PeerSpan
from protocol import DeviceSummary
from protocol.ids import CAPACITY_TOPIC

# Models that get a coverage row in `peers` (and /metrics, the API's model list).
MAX_COVERAGE_MODELS = 64


class Reporting(Protocol):
    """A part that adds its own keys to `status` (the serving part, the idle watch)."""

    def status(self) -> dict[str, Any]: ...


class ServedModel(Reporting, ServedModelId, Protocol):
    """The serving part as `status` and `coverage` see it (agent.serve.serving.Serving)."""

    @property
    def protocol_id(self) -> str: ...


def status(
    mesh: Mesh,
    table: PeerTable,
    lifecycle: Lifecycle,
    devices: DeviceReport | None,
    serving: ServedModel | None,
    idle: Reporting | None,
    loop_errors: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    rejected = dict(mesh.validator.rejected)
    for reason, n in table.refused.items():
        rejected[reason] = rejected.get(reason, 0) + n
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
        "rejected_ads": rejected,
        "connected_peers": len(mesh.connected_peers()),
        "known_peers": len(table),
        "max_known_peers": table.limits.max_peers,
        "evicted_peers": table.evicted,
        "loop_errors": dict(loop_errors or {}),
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


def _static_row(e: PeerEntry) -> dict[str, Any]:
    ad = e.ad
    return {
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
    }


def peers(
    mesh: Mesh,
    table: PeerTable,
    coverage_rows: list[dict[str, Any]],
    cached: PeerViews | None = None,
) -> dict[str, Any]:
    now = time.monotonic()
    rows = []
    static = cached.rows() if cached is not None else [(e, _static_row(e)) for e in table]
    for e, row in static:
        rows.append(
            {
                **row,
                "age_s": round(now - e.received, 3),
                "connected": mesh.is_connected(e.ad.peer_id),
            }
        )
    result: dict[str, Any] = {"self": mesh.peer_id, "peers": rows, "coverage": coverage_rows}
    if cached is not None:
        result["coverage_omitted"] = cached.coverage_omitted
    return result


def _coverage_row(
    model_id: str, name: str | None, n_blocks: int, spans: Iterable[PeerSpan]
) -> dict[str, Any]:
    runs = coverage_runs(spans, n_blocks, ROUTABLE_STATES)
    counts: list[int] = []
    for start, end, count in runs:
        counts.extend([count] * (end - start))
    return {
        "model": model_id,
        "model_name": name,
        "n_blocks": n_blocks,
        "replicas": counts,
        "complete": all(count > 0 for _, _, count in runs),
    }


def model_coverage(
    models: dict[str, tuple[str | None, int | None]],
    spans_for: Callable[[str], Iterable[PeerSpan]],
) -> list[dict[str, Any]]:
    """Per model: how many times each block is served by online peers (`spans_for(model_id)`
    gives the rows, this agent's own included)."""
    return [
        _coverage_row(model_id, name, n_blocks, spans_for(model_id))
        for model_id, (name, n_blocks) in sorted(models.items())
        if n_blocks
    ]


OwnModel = tuple[str, str | None, int, PeerSpan | None]


class PeerViews:
    """The table's views, built once per change of the table (its `version`) or of this
    agent's own row (`own`: model id, name, n_blocks and its span row, once serving)."""

    def __init__(self, table: PeerTable, max_models: int = MAX_COVERAGE_MODELS) -> None:
        self.table = table
        self.max_models = max_models
        self.coverage_omitted = 0
        self._rows_version = -1
        self._rows: list[tuple[PeerEntry, dict[str, Any]]] = []
        self._coverage_key: tuple[int, OwnModel | None] | None = None
        self._coverage: list[dict[str, Any]] = []

    def rows(self) -> list[tuple[PeerEntry, dict[str, Any]]]:
        """(entry, its row less age and connection) per peer, in peer id order."""
        if self._rows_version != self.table.version:
            self._rows = [(e, _static_row(e)) for e in self.table]
            self._rows_version = self.table.version
        return self._rows

    def coverage(self, own: OwnModel | None = None) -> list[dict[str, Any]]:
        """Per model (at most `max_models`): replicas per block from online peers, this
        agent's own span included. The caller gets its own list (of shared rows)."""
        key = (self.table.version, own)
        if key != self._coverage_key:
            self._coverage = self._build(own)
            self._coverage_key = key
        return list(self._coverage)

    def _build(self, own: OwnModel | None) -> list[dict[str, Any]]:
        models = self.table.models()
        peers_of: dict[str, int] = {}
        for e in self.table:
            if e.ad.model:
                peers_of[e.ad.model] = peers_of.get(e.ad.model, 0) + 1
        if own is not None:
            models[own[0]] = (own[1], own[2])
        candidates = [m for m, (_, n_blocks) in models.items() if n_blocks]
        # This agent's model first, then those the most peers serve.
        candidates.sort(key=lambda m: (own is None or m != own[0], -peers_of.get(m, 0), m))
        chosen = sorted(candidates[: self.max_models])
        self.coverage_omitted = len(candidates) - len(chosen)
        out = []
        for model_id in chosen:
            name, n_blocks = models[model_id]
            assert n_blocks
            spans = self.table.spans_for(model_id)
            if own is not None and own[0] == model_id and own[3] is not None:
                spans.append(own[3])
            out.append(_coverage_row(model_id, name, n_blocks, spans))
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
