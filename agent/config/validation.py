"""Checks over a whole config, each failure one ConfigError line that names the key."""

from __future__ import annotations

import math

from agent.config.addresses import api_address, is_loopback
from agent.config.errors import ConfigError
from agent.config.sections import (
    DTYPES,
    LOG_LEVELS,
    AgentConfig,
    ApiConfig,
    ClientConfig,
    IdleConfig,
    SwarmConfig,
    parse_blocks,
    section_keys,
)


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
        if not 0 < getattr(cfg, key) < math.inf:  # NaN fails too
            raise ConfigError(f"{key}: must be positive")
    if cfg.ad_ttl < cfg.announce_interval:
        raise ConfigError("ad_ttl: must be at least announce_interval")
    if not 0 <= cfg.bootstrap_wait < math.inf:
        raise ConfigError("bootstrap_wait: must not be negative")
    if cfg.threads < 0:
        raise ConfigError("threads: must be 0 (auto) or positive")
    if cfg.max_blocks < 0:
        raise ConfigError("max_blocks: must be 0 (as memory allows) or positive")
    if parse_blocks(cfg.blocks) is not None and cfg.model is None:
        raise ConfigError(
            f"blocks: {cfg.blocks} names blocks to serve, but no model is set: add --model DIR "
            "(model in the config file), or drop --blocks to route and relay only"
        )
    lim = cfg.limits
    for key in (
        "max_sessions",
        "max_session_tokens",
        "max_batch",
        "max_frame_bytes",
        "max_batch_rows",
        "max_batch_tokens",
        "batch_prefill_chunk",
        "kv_page_tokens",
    ):
        if getattr(lim, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    if not 0 < lim.kv_memory_fraction <= 1:
        raise ConfigError("limits.kv_memory_fraction: must be in (0, 1]")
    if lim.kv_budget_tokens < 0:
        raise ConfigError("limits.kv_budget_tokens: must be 0 (from memory) or positive")
    if not 0 < lim.session_idle_timeout < math.inf:
        raise ConfigError("limits.session_idle_timeout: must be positive")
    for key in (
        "max_connections",
        "per_peer_connections",
        "per_peer_sessions",
        "per_peer_streams",
        "max_known_peers",
        "held_streams_per_peer",
    ):
        if getattr(lim, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    for key in ("per_peer_requests_per_s", "per_peer_bytes_per_s", "new_peers_per_minute"):
        if not 0 < getattr(lim, key) < math.inf:
            raise ConfigError(f"limits.{key}: must be positive")
    if not 0 <= lim.max_batch_wait <= 1.0:
        raise ConfigError("limits.max_batch_wait: seconds, 0..1 (0: never wait)")
    if not 64 * 1024 <= lim.stranger_buffer_bytes <= 64 * 1024 * 1024:
        raise ConfigError("limits.stranger_buffer_bytes: must be between 64 KiB and 64 MiB")
    for pid in lim.trusted_peers:
        if not pid.isalnum() or len(pid) < 40:
            raise ConfigError(f"limits.trusted_peers: {pid!r} is not a peer id")
    if lim.per_peer_kv_tokens < 0:
        raise ConfigError(
            "limits.per_peer_kv_tokens: must be 0 (per_peer_kv_share of the budget) or positive"
        )
    for key in ("per_peer_session_share", "per_peer_kv_share"):
        if not 0 < getattr(lim, key) <= 1:
            raise ConfigError(f"limits.{key}: a share, in (0, 1]")
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
    if not 0 < swarm.auth_timeout < math.inf:
        raise ConfigError("swarm.auth_timeout: must be positive")
    for key in ("allow", "deny"):
        for pid in getattr(swarm, key):
            if not pid.isalnum() or len(pid) < 40:
                raise ConfigError(f"swarm.{key}: {pid!r} is not a peer id")


def _validate_idle(idle: IdleConfig) -> None:
    if not 0 <= idle.gpu_utilization_max <= 100:
        raise ConfigError("idle.gpu_utilization_max: must be a percentage, 0..100")
    for key in ("gpu_memory_max_mib", "cpu_load_max", "drain_grace", "holdoff"):
        if not 0 <= getattr(idle, key) < math.inf:
            raise ConfigError(f"idle.{key}: must not be negative")
    if idle.cpu_load_max > 1:
        raise ConfigError("idle.cpu_load_max: a share of all cores, 0..1 (0: not checked)")
    if not 0 < idle.check_interval < math.inf:
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
    if not 0 < api.request_timeout < math.inf:
        raise ConfigError("api.request_timeout: must be positive")
    if api.require_key and api.key_file is None:
        raise ConfigError(
            "api.require_key: the API must want bearer keys, but no key file is set: "
            "set api.key_file (--api-key-file)"
        )
    for name in api.server_names:
        try:
            parse_server_name(name)
        except ValueError:
            raise ConfigError(
                f"api.server_names: {name!r} is not NAME or NAME:PORT (as in a Host header: "
                "no scheme, path or wildcard)"
            ) from None


def parse_server_name(text: str) -> tuple[str, int | None]:
    """A Host header's value, or an `api.server_names` entry: `NAME`, `NAME:PORT`, `[V6]`
    or `[V6]:PORT` (a bare `V6` address too) -> (name, port or None). Names are lowercased,
    IPv6 addresses written compressed in brackets. ValueError for anything else."""
    import ipaddress

    text = text.lower()
    if text.count(":") > 1 and not text.startswith("["):
        name, rest = f"[{text}]", ""  # a bare IPv6 address (server_names only, in practice)
    elif text.startswith("["):
        end = text.find("]")
        name, rest = text[: end + 1], text[end + 1 :]
    else:
        name, sep, port = text.partition(":")
        rest = sep + port
    if name.startswith("["):
        name = f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"  # ValueError if not one
    elif not name or not all(c.isascii() and (c.isalnum() or c in "-._") for c in name):
        raise ValueError(f"not a host name: {text!r}")
    if not rest:
        return name, None
    digits = rest[1:]
    if rest[0] != ":" or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"not a port: {text!r}")
    if not 0 < int(digits) <= 65535:
        raise ValueError(f"not a port: {text!r}")
    return name, int(digits)


def validate_client(client: ClientConfig) -> None:
    """ConfigError naming the [client] key whose value cannot work."""
    names = section_keys(ClientConfig)
    for key in ("step_timeout", "open_timeout", "verify_tolerance"):
        if not 0 < getattr(client, names[key]) < math.inf:
            raise ConfigError(f"client.{key}: must be positive")
    for key in ("max_failovers", "failed_peer_cooldown", "reroute_wait", "loading_wait"):
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
