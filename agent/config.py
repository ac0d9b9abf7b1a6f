"""The agent's one configuration object: defaults, TOML file, command-line flags, validation.

Precedence: built-in defaults < config file < flags. Flags and file keys share names
(`--state-dir` is `state_dir` in the file). Every problem raises ConfigError with one line
that names the key, so the CLI can exit 2 without a traceback.
"""

from __future__ import annotations

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


def default_control_socket(state_dir: Path | None = None) -> Path:
    env = os.environ.get("SHARDMESH_CONTROL")
    if env:
        return Path(env)
    return (state_dir or default_state_dir()) / "control.sock"


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
    # Serving (issue: sharded blocks). None model = a node that only relays and routes.
    model: Path | None = None
    blocks: str = "auto"
    max_blocks: int = 0  # with --blocks auto: serve at most this many (0: as memory allows)
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 0
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def control_socket(self) -> Path:
        return self.control or self.state_dir / "control.sock"

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "identity.key"

    def block_range(self) -> tuple[int, int] | None:
        """The explicit `START:END` span, or None for `auto`."""
        return parse_blocks(self.blocks)


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


_PATH_KEYS = {"state_dir", "control", "model"}
_LIST_KEYS = {"listen", "bootstrap"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn a TOML/flag value into the field's type, or raise ConfigError naming the key."""
    if name in _PATH_KEYS:
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{name}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if name in _LIST_KEYS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of multiaddr strings, got {value!r}")
        return tuple(value)
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


def _merge_section(cls: type, base: Any, values: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name: f for f in fields(cls)}
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known or key == "limits":
            raise ConfigError(f"unknown config key '{prefix}{raw_key}'")
        changes[key] = _coerce(prefix + key, value, getattr(base, key))
    return replace(base, **changes)


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """Build the config: defaults, then the TOML file, then flag overrides (None = not given)."""
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
        limits = data.pop("limits", {})
        if not isinstance(limits, dict):
            raise ConfigError("limits: expected a table")
        cfg = _merge_section(AgentConfig, cfg, data)
        cfg = replace(cfg, limits=_merge_section(LimitsConfig, cfg.limits, limits, "limits."))
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = _merge_section(AgentConfig, cfg, given)
    validate(cfg)
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
    from agent.multiaddrs import check_multiaddr

    for key in ("listen", "bootstrap"):
        for addr in getattr(cfg, key):
            problem = check_multiaddr(addr, need_peer_id=(key == "bootstrap"))
            if problem:
                raise ConfigError(f"{key}: {problem}")
