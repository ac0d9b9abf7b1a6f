"""The agent's one configuration object: defaults, TOML file, command-line flags, validation.

Precedence: built-in defaults < config file < flags. Flags and file keys share names
(`--state-dir` is `state_dir` in the file). Every problem raises ConfigError with one line
that names the key, so the CLI can exit 2 without a traceback.

The package: sections (one frozen dataclass per part, and the derived sections each part is
handed), paths (state dir, control socket), addresses (HOST:PORT), loading (TOML + flags) and
validation. Every part imports what it needs from `agent.config`.
"""

from agent.config.addresses import API_DEFAULT_HOST, api_address, is_loopback, parse_host_port
from agent.config.errors import ConfigError
from agent.config.loading import SECTIONS, load_config
from agent.config.paths import SERVICE_CONTROL_SOCKET, default_control_socket, default_state_dir
from agent.config.sections import (
    DEFAULT_PORT,
    DTYPES,
    LOG_LEVELS,
    AgentConfig,
    AnnounceConfig,
    ApiConfig,
    ClientConfig,
    DiscoveryConfig,
    IdleConfig,
    LimitsConfig,
    MeshConfig,
    ServeConfig,
    SwarmConfig,
    parse_blocks,
    section_keys,
)
from agent.config.validation import validate, validate_client

__all__ = [
    "API_DEFAULT_HOST",
    "DEFAULT_PORT",
    "DTYPES",
    "LOG_LEVELS",
    "SECTIONS",
    "SERVICE_CONTROL_SOCKET",
    "AgentConfig",
    "AnnounceConfig",
    "ApiConfig",
    "ClientConfig",
    "ConfigError",
    "DiscoveryConfig",
    "IdleConfig",
    "LimitsConfig",
    "MeshConfig",
    "ServeConfig",
    "SwarmConfig",
    "api_address",
    "default_control_socket",
    "default_state_dir",
    "is_loopback",
    "load_config",
    "parse_blocks",
    "parse_host_port",
    "section_keys",
    "validate",
    "validate_client",
]
