"""Defaults, then the TOML file, then flag overrides: merged section by section."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config.errors import ConfigError
from agent.config.sections import (
    AgentConfig,
    ApiConfig,
    ClientConfig,
    IdleConfig,
    LimitsConfig,
    SwarmConfig,
    section_keys,
)
from agent.config.validation import validate

_PATH_KEYS = {"state_dir", "control", "model", "swarm.secret_file", "api.key_file"}
_LIST_KEYS = {
    "listen",
    "bootstrap",
    "swarm.allow",
    "swarm.deny",
    "api.server_names",
    "limits.trusted_peers",
}
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


def _merge_section(cls: type, base: Any, values: dict[str, Any], prefix: str = "") -> Any:
    known = section_keys(cls)
    changes: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known or key in SECTIONS:
            raise _unknown_keys([_unknown(prefix, raw_key)])
        name = known[key]
        changes[name] = _coerce(prefix + key, value, getattr(base, name))
    return replace(base, **changes)


def _table_keys(prefix: str) -> list[str]:
    """The keys of one table ("" the top level, "api." [api]) as a file writes them."""
    cls = SECTIONS[prefix[:-1]] if prefix else AgentConfig
    return [k for k in section_keys(cls) if k not in SECTIONS]


def _unknown(prefix: str, raw_key: str) -> str:
    """One unknown key, quoted, and what it may have meant: the key of the same name in
    another table, else its table's key (or, at the top level, the table) closest to it."""
    import difflib

    key = raw_key.replace("-", "_")
    tables = ("", *(f"{name}." for name in SECTIONS))
    elsewhere = [table + key for table in tables if table != prefix and key in _table_keys(table)]
    choices = _table_keys(prefix) + ([] if prefix else list(SECTIONS))
    close = [prefix + c for c in difflib.get_close_matches(key, choices, n=1, cutoff=0.6)]
    guess = (elsewhere or close)[:1]
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return f"'{prefix}{raw_key}'{hint}"


def _unknown_keys(keys: list[str]) -> ConfigError:
    if len(keys) == 1:
        return ConfigError(f"unknown config key {keys[0]}")
    return ConfigError(f"unknown config keys {', '.join(keys)}")


def _check_keys(top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    """ConfigError naming every unknown key of one layer, each with a guess if one is close."""
    unknown: list[str] = []
    for prefix, values in (("", top), *((f"{n}.", t) for n, t in tables.items())):
        known = _table_keys(prefix)
        unknown += [_unknown(prefix, k) for k in values if k.replace("-", "_") not in known]
    if unknown:
        raise _unknown_keys(unknown)


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
    """Merge one layer (file or flags): top-level keys, then each [section] table. Every
    unknown key of the layer is named in one ConfigError."""
    data = dict(data)
    tables = {}
    for name in SECTIONS:
        if name in data:
            table = data.pop(name)
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: expected a table")
            tables[name] = table
    _check_keys(data, tables)
    cfg = _merge_section(AgentConfig, cfg, data)
    for name, table in tables.items():
        merged = _merge_section(SECTIONS[name], getattr(cfg, name), table, f"{name}.")
        cfg = replace(cfg, **{name: merged})
    return cfg
