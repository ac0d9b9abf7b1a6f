"""HOST:PORT addresses of the HTTP API, and which hosts are loopback."""

from __future__ import annotations

from agent.config.errors import ConfigError
from agent.config.sections import ApiConfig

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
