"""Protocol ids and versions shared by every peer.

Ids carry the full semantic version (`/shardmesh/<name>/<major>.<minor>.<patch>`); peers
interoperate when the major versions match.
"""

from __future__ import annotations

import re

PROTOCOL_VERSION = "1.0.0"
PROTOCOL_MAJOR = 1

_VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def parse_version(version: str) -> tuple[int, int, int]:
    """Split "major.minor.patch" into ints; ValueError if it is not exactly that."""
    m = _VERSION_RE.fullmatch(version)
    if m is None:
        raise ValueError(f"not a major.minor.patch version: {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def protocol_id(name: str, version: str = PROTOCOL_VERSION) -> str:
    """The libp2p protocol id for `name` at `version`, e.g. /shardmesh/forward/1.0.0."""
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"bad protocol name: {name!r}")
    parse_version(version)
    return f"/shardmesh/{name}/{version}"


FORWARD_PROTOCOL_ID = protocol_id("forward")
CAPACITY_TOPIC = f"shardmesh/capacity/{PROTOCOL_MAJOR}"
