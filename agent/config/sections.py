"""One frozen dataclass per part of the agent, and the AgentConfig that holds them; each part
is handed its own section (MeshConfig, ServeConfig, ...), never the whole config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.config.errors import ConfigError
from agent.config.paths import default_state_dir

DEFAULT_PORT = 7411
LOG_LEVELS = ("debug", "info", "warning", "error")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-agent serving limits, enforced before any work is done."""

    max_sessions: int = 32
    max_session_tokens: int = 4096
    max_batch: int = 16
    max_frame_bytes: int = 64 * 1024 * 1024
    # Continuous batching (agent.serve.batcher): one forward carries at most this many
    # sequences and tokens (rows x new tokens); a longer step (a prefill) runs in chunks of
    # batch_prefill_chunk tokens between other sessions' decode steps.
    max_batch_rows: int = 32
    max_batch_tokens: int = 512
    batch_prefill_chunk: int = 256
    # Seconds a forward may wait for the next steps of other sessions that are active (never
    # longer than the last forward took; 0: run at once): streams a pipeline spread over its
    # stages meet again in one batch. Never waits when only one session is active.
    max_batch_wait: float = 0.05
    # KV-cache memory is reserved in pages of this many tokens as a session grows, not at
    # its max_length up front (a step that needs a page that does not fit is refused).
    kv_page_tokens: int = 256
    session_idle_timeout: float = 120.0
    # Fraction of the device's free memory (after loading blocks) the KV caches may use.
    kv_memory_fraction: float = 0.5
    # A fixed KV-cache budget in tokens (over the served span) instead; 0 = from memory.
    kv_budget_tokens: int = 0
    # Per peer (issue: secure by default). A peer over a limit gets an error or is dropped;
    # nobody else notices.
    max_connections: int = 256
    per_peer_connections: int = 2
    per_peer_sessions: int = 16
    per_peer_requests_per_s: float = 1000.0
    per_peer_bytes_per_s: float = 256.0 * 1024 * 1024
    # KV-cache tokens one peer may reserve; 0 = per_peer_kv_share of the agent's KV budget.
    per_peer_kv_tokens: int = 0
    # Forward streams one peer may hold open at once; one more is reset at once.
    per_peer_streams: int = 8
    # The share of max_sessions one peer may hold (never fewer than 4 sessions, never more
    # than per_peer_sessions), and of the KV budget when per_peer_kv_tokens is 0: a quarter
    # each, so that two peer ids cannot take the whole agent.
    per_peer_session_share: float = 0.25
    per_peer_kv_share: float = 0.25
    # The peer table (agent.policy.peertable): entries it holds (the least recently heard
    # unprotected peer makes room), and new peer ids one relaying peer may introduce a minute.
    max_known_peers: int = 1024
    new_peers_per_minute: float = 120.0
    # Bytes a connection a stranger opened may leave unread on its streams until the peer
    # proves the swarm secret or does something useful (agent.net.upstream); streams the
    # swarm gate holds for one unproven peer (one more is reset at once).
    stranger_buffer_bytes: int = 1024 * 1024
    held_streams_per_peer: int = 16
    # Peer ids held only to the agent's own limits, not to one peer's share: your own HTTP
    # API agents, whose many users reach every server as one peer.
    trusted_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SwarmConfig:
    """Who may join: a private swarm's shared secret, and peer-id allow/deny lists."""

    secret_file: Path | None = None  # owner-only file holding the swarm secret
    allow: tuple[str, ...] = ()  # when not empty, only these peer ids are accepted
    deny: tuple[str, ...] = ()
    auth_timeout: float = 5.0  # seconds a new connection has to prove the secret


@dataclass(frozen=True)
class IdleConfig:
    """Serve only while the owner leaves the machine idle (issue: run on idle machines)."""

    enabled: bool = False
    # Thresholds on what *other* processes use (NVML, per process).
    gpu_utilization_max: float = 10.0  # percent
    gpu_memory_max_mib: float = 1024.0
    cpu_load_max: float = 0.0  # share of all cores other processes use, 0..1; 0 = off
    yield_to_users: bool = False  # anyone logged in counts as the owner being back
    check_interval: float = 2.0  # seconds between checks
    drain_grace: float = 30.0  # seconds running sessions get to finish or move
    holdoff: float = 60.0  # seconds of idleness before loading again


@dataclass(frozen=True)
class ApiConfig:
    """OpenAI-compatible HTTP API and Prometheus metrics; off while `listen` is empty."""

    listen: str = ""  # HOST:PORT, e.g. 127.0.0.1:8080
    key_file: Path | None = None  # bearer keys, one a line; required off loopback
    model_dirs: tuple[Path, ...] = ()  # local checkpoints for the embeddings/head/tokenizer
    # Generations at once; more get 429. 8 is what one peer may hold at a server by default
    # (a quarter of max_sessions): list this agent in the servers' limits.trusted_peers to
    # run more, up to what their batches hold.
    max_concurrent: int = 8
    request_timeout: float = 600.0
    # Bearer keys on every route even on loopback: without key_file the agent will not start.
    require_key: bool = False
    # Host header names the API answers to besides api.listen's own (and localhost, 127.0.0.1,
    # [::1] on a loopback bind): NAME (any port) or NAME:PORT, e.g. a reverse proxy's name.
    # Other Host names get 421 (DNS rebinding); off loopback the check is on once this is set.
    server_names: tuple[str, ...] = ()


def _key(name: str | None) -> Any:
    """Field metadata: the field's key in the file and in overrides (None: not a key)."""
    return {"key": name}


@dataclass(frozen=True)
class ClientConfig:
    """The routing client ([client]): deadlines, failover and verified outputs of the
    generations this agent runs (control socket, HTTP API) and of `shardmesh generate
    --bootstrap --config FILE`. Seconds fields end in `_s`; their keys do not
    (`step_timeout`), as everywhere else in the file; `verify` is the `--verify` fraction."""

    step_timeout_s: float = field(default=30.0, metadata=_key("step_timeout"))
    open_timeout_s: float = field(default=10.0, metadata=_key("open_timeout"))
    max_failovers: int = 6
    failed_peer_cooldown_s: float = field(default=60.0, metadata=_key("failed_peer_cooldown"))
    # How long to wait for a replacement to appear in the peer table.
    reroute_wait_s: float = field(default=10.0, metadata=_key("reroute_wait"))
    # How long a generation waits for blocks that peers are still loading (they announce
    # "joining") before it fails with "loading" (the HTTP API: 503 with Retry-After); a
    # request may bring its own (`shardmesh generate` waits up to its --timeout).
    loading_wait_s: float = field(default=60.0, metadata=_key("loading_wait"))
    wire_dtype: str = "float32"
    max_chunk_bytes: int = 16 * 1024 * 1024  # prefill/replay chunks stay well under frames
    # Verified outputs (agent.route.verify): the share of steps each hop also runs on a
    # witness (0 = off, 1 = every step), the per-row relative error still counted as
    # agreement (absorbs bf16/fp16 vs fp32 peers), and the seed of the step draw (None: from
    # the OS, so a peer cannot know which steps are checked; only code sets it, to reproduce
    # a run: a seed in a config file would tell which steps are checked).
    verify_fraction: float = field(default=0.0, metadata=_key("verify"))
    verify_tolerance: float = 0.05
    verify_seed: int | None = field(default=None, metadata=_key(None))


@dataclass(frozen=True)
class MeshConfig:
    """What the libp2p host reads: where it listens, mDNS, who may join, connection caps."""

    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    mdns: bool = False
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass(frozen=True)
class ServeConfig:
    """What the serving part reads: its top-level keys (model, blocks, ...) and [limits]."""

    model: Path | None = None
    blocks: str = "auto"
    max_blocks: int = 0
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 0
    announce_interval: float = 5.0  # auto placement listens for a few intervals
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def block_range(self) -> tuple[int, int] | None:
        """The explicit `START:END` span, or None for `auto`."""
        return parse_blocks(self.blocks)


@dataclass(frozen=True)
class AnnounceConfig:
    """What the announcer reads: the ad period and TTL (both stretched as the mesh grows)."""

    announce_interval: float = 5.0
    ad_ttl: float = 20.0


@dataclass(frozen=True)
class DiscoveryConfig:
    """How the agent finds peers: bootstrap addresses (retried, waited for), mDNS."""

    bootstrap: tuple[str, ...] = ()
    bootstrap_retry_max: float = 30.0
    bootstrap_wait: float = 30.0
    mdns: bool = True


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = field(default_factory=default_state_dir)
    listen: tuple[str, ...] = (f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    log_level: str = "info"
    log_json: bool = False
    control: Path | None = None
    announce_interval: float = 5.0  # seconds; stretched as the mesh grows (node.py)
    ad_ttl: float = 20.0  # seconds
    bootstrap_retry_max: float = 30.0
    # Seconds the agent waits for a bootstrap peer before telling systemd it is ready anyway.
    bootstrap_wait: float = 30.0
    # Serving (issue: sharded blocks). None model = a node that only relays and routes.
    model: Path | None = None
    blocks: str = "auto"
    max_blocks: int = 0  # with --blocks auto: serve at most this many (0: as memory allows)
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    client: ClientConfig = field(default_factory=ClientConfig)

    @property
    def control_socket(self) -> Path:
        return self.control or self.state_dir / "control.sock"

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "identity.key"

    def block_range(self) -> tuple[int, int] | None:
        """The explicit `START:END` span, or None for `auto`."""
        return parse_blocks(self.blocks)

    @property
    def mesh(self) -> MeshConfig:
        return MeshConfig(listen=self.listen, mdns=self.mdns, swarm=self.swarm, limits=self.limits)

    @property
    def serve(self) -> ServeConfig:
        return ServeConfig(
            model=self.model,
            blocks=self.blocks,
            max_blocks=self.max_blocks,
            dtype=self.dtype,
            device=self.device,
            threads=self.threads,
            announce_interval=self.announce_interval,
            limits=self.limits,
        )

    @property
    def announce(self) -> AnnounceConfig:
        return AnnounceConfig(announce_interval=self.announce_interval, ad_ttl=self.ad_ttl)

    @property
    def discovery(self) -> DiscoveryConfig:
        return DiscoveryConfig(
            bootstrap=self.bootstrap,
            bootstrap_retry_max=self.bootstrap_retry_max,
            bootstrap_wait=self.bootstrap_wait,
            mdns=self.mdns,
        )


def parse_blocks(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    start_s, sep, end_s = text.partition(":")
    try:
        start, end = int(start_s), int(end_s)
    except ValueError:
        start = end = -1
    if not sep or start < 0 or end <= start:
        raise ConfigError(
            f"blocks: expected 'auto' or START:END with 0 <= START < END, got {text!r}"
        )
    return start, end


def section_keys(cls: type) -> dict[str, str]:
    """A section's keys (in the file and in overrides) -> its field names; a field's key is
    its name unless its metadata names another (or None: not a key)."""
    keys: dict[str, str] = {}
    for f in fields(cls):
        key = f.metadata.get("key", f.name)
        if key is not None:
            keys[key] = f.name
    return keys
