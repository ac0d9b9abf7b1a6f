"""The agent's one configuration object: defaults, TOML file, command-line flags, validation.

Precedence: built-in defaults < config file < flags. Flags and file keys share names
(`--state-dir` is `state_dir` in the file). Every problem raises ConfigError with one line
that names the key, so the CLI can exit 2 without a traceback.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.errors import UsageError

DEFAULT_PORT = 7411
LOG_LEVELS = ("debug", "info", "warning", "error")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UsageError):
    """A bad flag, config key or value; the message is one line for the user."""


def default_state_dir() -> Path:
    """Per-platform state dir; systemd's StateDirectory= wins when set."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/shardmesh")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "shardmesh"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shardmesh"


# Where systemd/shardmesh.service puts the agent's socket: its RuntimeDirectory=.
SERVICE_CONTROL_SOCKET = Path("/run/shardmesh/control.sock")


def default_control_socket(state_dir: Path | None = None) -> Path:
    env = os.environ.get("SHARDMESH_CONTROL")
    if env:
        return Path(env)
    own = (state_dir or default_state_dir()) / "control.sock"
    # No agent of our own, but the system service runs: ask it (root may; anyone else is
    # told permission is denied, not that no agent runs).
    if state_dir is None and not os.path.exists(own) and os.path.exists(SERVICE_CONTROL_SOCKET):
        return SERVICE_CONTROL_SOCKET
    return own


@dataclass(frozen=True)
class LimitsConfig:
    """Per-agent serving limits, enforced before any work is done."""

    max_sessions: int = 32
    max_session_tokens: int = 4096
    max_batch: int = 16
    max_frame_bytes: int = 64 * 1024 * 1024
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
    # KV-cache tokens one peer may reserve; 0 = half the agent's KV budget.
    per_peer_kv_tokens: int = 0


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
    max_concurrent: int = 4  # generations at once; more get 429
    request_timeout: float = 600.0


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


_PATH_KEYS = {"state_dir", "control", "model", "swarm.secret_file", "api.key_file"}
_LIST_KEYS = {"listen", "bootstrap", "swarm.allow", "swarm.deny"}
_PATH_LIST_KEYS = {"api.model_dirs"}
# Tables in the file, each one frozen dataclass on AgentConfig.
SECTIONS: dict[str, type] = {
    "limits": LimitsConfig,
    "swarm": SwarmConfig,
    "idle": IdleConfig,
    "api": ApiConfig,
    "client": ClientConfig,
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn a TOML/flag value into the field's type, or raise ConfigError naming the key."""
    if name in _PATH_KEYS:
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{name}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if name in _LIST_KEYS or name in _PATH_LIST_KEYS:
        if isinstance(value, str | Path):
            value = [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str | Path) and str(v) for v in value
        ):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        if name in _PATH_LIST_KEYS:
            return tuple(Path(v).expanduser() for v in value)
        return tuple(str(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported value {value!r}")


def section_keys(cls: type) -> dict[str, str]:
    """A section's keys (in the file and in overrides) -> its field names; a field's key is
    its name unless its metadata names another (or None: not a key)."""
    keys: dict[str, str] = {}
    for f in fields(cls):
        key = f.metadata.get("key", f.name)
        if key is not None:
            keys[key] = f.name
    return keys


def _merge_section(cls: type, base: Any, values: dict[str, Any], prefix: str = "") -> Any:
    known = section_keys(cls)
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known or key in SECTIONS:
            raise ConfigError(f"unknown config key '{prefix}{raw_key}'")
        name = known[key]
        changes[name] = _coerce(prefix + key, value, getattr(base, name))
    return replace(base, **changes)


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """Build the config: defaults, then the TOML file, then flag overrides (None = not given).

    Overrides name section keys with a dot: {"api.listen": "127.0.0.1:8080"}.
    """
    cfg = AgentConfig()
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_file}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        cfg = _apply(cfg, data)
    given: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, dot, sub = key.partition(".")
        if dot:
            given.setdefault(section, {})[sub] = value
        else:
            given[key] = value
    cfg = _apply(cfg, given)
    validate(cfg)
    return cfg


def _apply(cfg: AgentConfig, data: dict[str, Any]) -> AgentConfig:
    """Merge one layer (file or flags): top-level keys, then each [section] table."""
    data = dict(data)
    tables = {}
    for name in SECTIONS:
        if name in data:
            table = data.pop(name)
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: expected a table")
            tables[name] = table
    cfg = _merge_section(AgentConfig, cfg, data)
    for name, table in tables.items():
        merged = _merge_section(SECTIONS[name], getattr(cfg, name), table, f"{name}.")
        cfg = replace(cfg, **{name: merged})
    return cfg


def validate(cfg: AgentConfig) -> None:
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {cfg.log_level!r}"
        )
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.device != "auto" and cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda:N, got {cfg.device!r}")
    if not cfg.listen:
        raise ConfigError("listen: at least one address is needed")
    for key in ("announce_interval", "ad_ttl", "bootstrap_retry_max"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive")
    if cfg.ad_ttl < cfg.announce_interval:
        raise ConfigError("ad_ttl: must be at least announce_interval")
    if cfg.bootstrap_wait < 0:
        raise ConfigError("bootstrap_wait: must not be negative")
    if cfg.threads < 0:
        raise ConfigError("threads: must be 0 (auto) or positive")
    if cfg.max_blocks < 0:
        raise ConfigError("max_blocks: must be 0 (as memory allows) or positive")
    parse_blocks(cfg.blocks)
    lim = cfg.limits
    for key in ("max_sessions", "max_session_tokens", "max_batch", "max_frame_bytes"):
        if getattr(lim, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    if not 0 < lim.kv_memory_fraction <= 1:
        raise ConfigError("limits.kv_memory_fraction: must be in (0, 1]")
    if lim.kv_budget_tokens < 0:
        raise ConfigError("limits.kv_budget_tokens: must be 0 (from memory) or positive")
    if lim.session_idle_timeout <= 0:
        raise ConfigError("limits.session_idle_timeout: must be positive")
    for key in (
        "max_connections",
        "per_peer_connections",
        "per_peer_sessions",
    ):
        if getattr(lim, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    for key in ("per_peer_requests_per_s", "per_peer_bytes_per_s"):
        if getattr(lim, key) <= 0:
            raise ConfigError(f"limits.{key}: must be positive")
    if lim.per_peer_kv_tokens < 0:
        raise ConfigError("limits.per_peer_kv_tokens: must be 0 (half the budget) or positive")
    _validate_swarm(cfg.swarm)
    _validate_idle(cfg.idle)
    _validate_api(cfg.api)
    validate_client(cfg.client)
    from agent.multiaddrs import check_multiaddr

    for key in ("listen", "bootstrap"):
        for addr in getattr(cfg, key):
            problem = check_multiaddr(addr, need_peer_id=(key == "bootstrap"))
            if problem:
                raise ConfigError(f"{key}: {problem}")


def _validate_swarm(swarm: SwarmConfig) -> None:
    if swarm.auth_timeout <= 0:
        raise ConfigError("swarm.auth_timeout: must be positive")
    for key in ("allow", "deny"):
        for pid in getattr(swarm, key):
            if not pid.isalnum() or len(pid) < 40:
                raise ConfigError(f"swarm.{key}: {pid!r} is not a peer id")


def _validate_idle(idle: IdleConfig) -> None:
    if not 0 <= idle.gpu_utilization_max <= 100:
        raise ConfigError("idle.gpu_utilization_max: must be a percentage, 0..100")
    for key in ("gpu_memory_max_mib", "cpu_load_max", "drain_grace", "holdoff"):
        if getattr(idle, key) < 0:
            raise ConfigError(f"idle.{key}: must not be negative")
    if idle.cpu_load_max > 1:
        raise ConfigError("idle.cpu_load_max: a share of all cores, 0..1 (0: not checked)")
    if idle.check_interval <= 0:
        raise ConfigError("idle.check_interval: must be positive")


def _validate_api(api: ApiConfig) -> None:
    if api.listen:
        host, _ = api_address(api)
        if not is_loopback(host) and api.key_file is None:
            raise ConfigError(
                f"api.listen: {api.listen} is reachable from other machines, so the API needs "
                "bearer keys: set api.key_file (--api-key-file), or listen on 127.0.0.1"
            )
    if api.max_concurrent < 1:
        raise ConfigError("api.max_concurrent: must be at least 1")
    if api.request_timeout <= 0:
        raise ConfigError("api.request_timeout: must be positive")


def validate_client(client: ClientConfig) -> None:
    """ConfigError naming the [client] key whose value cannot work."""
    names = section_keys(ClientConfig)
    for key in ("step_timeout", "open_timeout", "verify_tolerance"):
        if not 0 < getattr(client, names[key]) < math.inf:
            raise ConfigError(f"client.{key}: must be positive")
    for key in ("max_failovers", "failed_peer_cooldown", "reroute_wait"):
        if not 0 <= getattr(client, names[key]) < math.inf:
            raise ConfigError(f"client.{key}: must not be negative")
    if client.wire_dtype not in DTYPES:
        raise ConfigError(
            f"client.wire_dtype: expected one of {', '.join(DTYPES)}, got {client.wire_dtype!r}"
        )
    if client.max_chunk_bytes < 1:
        raise ConfigError("client.max_chunk_bytes: must be at least 1")
    if not 0 <= client.verify_fraction <= 1:
        raise ConfigError("client.verify: a share of steps, 0..1 (0: not verified)")


API_DEFAULT_HOST = "127.0.0.1"


def api_address(api: ApiConfig) -> tuple[str, int]:
    """api.listen as (host, port); a bare `PORT` or `:PORT` binds loopback."""
    text = api.listen
    if text.isdigit() or text.startswith(":"):
        text = f"{API_DEFAULT_HOST}:{text.lstrip(':')}"
    return parse_host_port(text, "api.listen")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve anywhere


def parse_host_port(text: str, key: str = "address") -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ConfigError naming `key` otherwise."""
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return host, port
