"""Prometheus metrics for `GET /metrics`, in the text exposition format.

Most numbers already live on the agent (peer table, serving, mesh counters), so a collector
reads them when Prometheus scrapes, and nothing is kept twice. It reads them through
`MetricsSource`, which the daemon's Node provides (agent.api never imports the daemon).
Only what happens in hot paths is counted as it happens: forward-step latency
(agent.serve.stats.STEP_SECONDS), framed-stream bytes (FramedStream totals) and failovers
(PeerHealth.failovers).

Imports prometheus_client only (no torch).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.policy.snapshot import AGENT_STATES
from agent.serve.stats import BATCH_ROWS, BATCH_TOKENS, STEP_SECONDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServedCounters(Protocol):
    """The serving part as /metrics reads it (agent.serve.serving.Serving)."""

    @property
    def model_id(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def tokens_served(self) -> int: ...

    @property
    def errors_sent(self) -> Mapping[str, int]: ...

    def active_sessions(self) -> int: ...

    def kv_free_tokens(self) -> int: ...

    def chosen_span(self) -> tuple[int, int] | None: ...


class AdRejections(Protocol):
    """The ad validator's tally (protocol.ads.AdValidator)."""

    @property
    def rejected(self) -> Mapping[str, int]: ...


class MeshCounters(Protocol):
    """The libp2p side as /metrics reads it (agent.net.mesh.Mesh)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def validator(self) -> AdRejections: ...

    def connected_peers(self) -> Sized: ...


class MetricsSource(Protocol):
    """What the collector reads of the running agent (the daemon's Node)."""

    @property
    def mesh(self) -> MeshCounters: ...

    @property
    def serving(self) -> ServedCounters | None: ...

    @property
    def state(self) -> str: ...

    @property
    def started(self) -> float: ...  # time.monotonic() at the start

    def peer_states(self) -> Iterable[str]: ...  # one per peer in the table

    def coverage(self) -> list[dict[str, Any]]: ...


class NodeCollector(Collector):
    """Reads the agent's state at scrape time."""

    def __init__(self, node: MetricsSource, failovers: Callable[[], int]) -> None:
        self.node = node
        self.failovers = failovers

    def describe(self) -> Iterable[Metric]:
        return []  # no names to check at registration; collect() reads live state

    def collect(self) -> Iterable[Metric]:
        yield from self._self_metrics()
        yield from self._peer_metrics()
        yield from self._serving_metrics()
        yield from self._traffic_metrics()

    def _self_metrics(self) -> Iterable[Metric]:
        node = self.node
        info = GaugeMetricFamily("shardmesh_info", "This agent.", labels=["peer_id"])
        info.add_metric([node.mesh.peer_id], 1)
        yield info
        state = GaugeMetricFamily(
            "shardmesh_state", "1 for the state this agent is in.", labels=["state"]
        )
        for name in AGENT_STATES:
            state.add_metric([name], 1.0 if node.state == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "shardmesh_uptime_seconds",
            "Seconds since the agent started.",
            value=time.monotonic() - node.started,
        )

    def _peer_metrics(self) -> Iterable[Metric]:
        node = self.node
        counts = Tally(node.peer_states())
        peers = GaugeMetricFamily(
            "shardmesh_peers", "Peers in this agent's table, by state.", labels=["state"]
        )
        for name in sorted(set(AGENT_STATES) | set(counts)):
            peers.add_metric([name], counts.get(name, 0))
        yield peers
        yield GaugeMetricFamily(
            "shardmesh_connected_peers",
            "Peers with an open libp2p connection.",
            value=len(node.mesh.connected_peers()),
        )
        rejected = CounterMetricFamily(
            "shardmesh_ads_rejected", "Capacity ads dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(node.mesh.validator.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        covered = GaugeMetricFamily(
            "shardmesh_model_min_replicas",
            "Per model: how many times its least-served block is served (0 = not covered).",
            labels=["model", "model_name"],
        )
        for row in node.coverage():
            covered.add_metric(
                [row["model"], row["model_name"] or ""], min(row["replicas"], default=0)
            )
        yield covered

    def _serving_metrics(self) -> Iterable[Metric]:
        serving = self.node.serving
        sessions = GaugeMetricFamily(
            "shardmesh_sessions", "Inference sessions open on this agent's blocks."
        )
        tokens = CounterMetricFamily(
            "shardmesh_tokens_served", "Tokens (prefill and decode) run through this agent."
        )
        kv_free = GaugeMetricFamily(
            "shardmesh_kv_free_tokens", "KV-cache tokens this agent can still reserve."
        )
        errors = CounterMetricFamily(
            "shardmesh_forward_errors",
            "Error replies on the forward protocol, by code.",
            labels=["code"],
        )
        sessions.add_metric([], serving.active_sessions() if serving else 0)
        tokens.add_metric([], serving.tokens_served if serving else 0)
        kv_free.add_metric([], serving.kv_free_tokens() if serving else 0)
        for code, n in sorted((serving.errors_sent if serving else {}).items()):
            errors.add_metric([code], n)
        yield from (sessions, tokens, kv_free, errors)
        span = serving.chosen_span() if serving else None
        if serving is None or span is None:
            return
        labels = ["model", "model_name"]
        values = [serving.model_id, serving.model_name]
        for name, text, value in (
            ("shardmesh_served_span_start", "First block this agent serves.", span[0]),
            ("shardmesh_served_span_end", "One past the last block this agent serves.", span[1]),
            ("shardmesh_served_blocks", "Blocks this agent serves.", span[1] - span[0]),
        ):
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric(values, value)
            yield family

    def _traffic_metrics(self) -> Iterable[Metric]:
        from agent.net.framed import FramedStream

        mesh = self.node.mesh
        traffic = CounterMetricFamily(
            "shardmesh_bytes",
            "Bytes sent and received: gossip (capacity ads) and forward (hidden states).",
            labels=["direction", "kind"],
        )
        traffic.add_metric(["in", "gossip"], mesh.bytes_in)
        traffic.add_metric(["out", "gossip"], mesh.bytes_out)
        traffic.add_metric(["in", "forward"], FramedStream.total_in)
        traffic.add_metric(["out", "forward"], FramedStream.total_out)
        yield traffic
        yield CounterMetricFamily(
            "shardmesh_failovers",
            "Hops replaced after a peer failed, in generations this agent ran.",
            value=self.failovers(),
        )


class ApiMetrics:
    """One registry per API server: the node collector, the step histogram, and the API's
    own counters."""

    def __init__(self, node: MetricsSource, failovers: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, failovers))
        self.registry.register(STEP_SECONDS)
        self.registry.register(BATCH_ROWS)
        self.registry.register(BATCH_TOKENS)
        self.requests = Counter(
            "shardmesh_api_requests",
            "HTTP API requests, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "shardmesh_api_generations_in_flight",
            "Generations the HTTP API is running now.",
            registry=self.registry,
        )
        self.tokens = Counter(
            "shardmesh_api_tokens",
            "Tokens in API generations, by kind (prompt or completion).",
            ["kind"],
            registry=self.registry,
        )

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def count_tokens(self, usage: dict[str, Any]) -> None:
        self.tokens.labels(kind="prompt").inc(usage["prompt_tokens"])
        self.tokens.labels(kind="completion").inc(usage["completion_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
