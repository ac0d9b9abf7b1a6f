"""Where the agent keeps its state and where the CLI finds its control socket."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
