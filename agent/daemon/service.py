"""What systemd sees of the running agent: READY once it is of use, a STATUS= line a person
reads in `systemctl status`, WATCHDOG=1 pings from the event loop, STOPPING=1 on the way out.

READY=1 is sent once the agent listens (control socket and libp2p), has joined the mesh
through a bootstrap peer or given up waiting `bootstrap_wait` seconds for one (and said so),
and loaded its blocks. The watchdog pings come from a trio task, so a blocked event loop
stops them and systemd restarts the agent.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import trio

from agent.daemon.sdnotify import notifier

log = logging.getLogger("shardmesh.service")

STATUS_REFRESH_S = 2.0  # how often STATUS= is recomputed (sent only when it changed)
_stopping = False  # once STOPPING=1 is sent, READY=1 must not follow


class Supervised(Protocol):
    """What systemd's side reads of the running agent (the daemon's Node provides it)."""

    @property
    def joined(self) -> trio.Event: ...  # a bootstrap peer answered (or none is configured)

    @property
    def started(self) -> float: ...  # time.monotonic() at the agent's start

    @property
    def bootstrap_wait(self) -> float: ...  # READY=1 at the latest this long after the start

    def status(self) -> dict[str, Any]: ...


def status_line(status: dict[str, Any], *, joined: bool = True) -> str:
    """One line from the control API's status, e.g.
    'online: serving blocks 0:4 of tiny-llama; 3 peers (2 connected); 1 session'.
    `joined` False (bootstrap peers configured, none reached yet) adds a note saying so."""
    known = int(status.get("known_peers") or 0)
    connected = int(status.get("connected_peers") or 0)
    sessions = int(status.get("sessions") or 0)
    head = str(status.get("state") or "unknown")
    if status.get("reason"):
        head += f": {status['reason']}"
    peers = _plural(known, "peer")
    if connected != known:
        peers += f" ({connected} connected)"
    line = f"{head}; {peers}; {_plural(sessions, 'session')}"
    return line if joined else line + "; no bootstrap peer reached yet"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def supervise(node: Supervised) -> None:
    """Ping the watchdog at the interval systemd asked for and keep STATUS= current."""
    sd = notifier()
    if not sd.enabled:
        return
    interval = sd.watchdog_interval
    tick = min(STATUS_REFRESH_S, interval) if interval else STATUS_REFRESH_S
    next_ping = trio.current_time()
    last = ""
    while True:
        fields = []
        try:
            line = status_line(node.status(), joined=node.joined.is_set())
        except Exception as exc:  # a status bug must not stop the watchdog pings
            log.debug("status line failed: %r", exc)
            line = last
        if line != last:
            fields.append("STATUS=" + line)
            last = line
        now = trio.current_time()
        if interval and now >= next_ping:
            fields.insert(0, "WATCHDOG=1")
            next_ping = now + interval
        sd.send(*fields)
        await trio.sleep(tick)


async def announce_ready(node: Supervised) -> None:
    """READY=1 once the mesh is joined or `bootstrap_wait` (from the agent's start) ran out.
    Called when the agent is listening and its blocks are loaded."""
    wait = node.bootstrap_wait - (time.monotonic() - node.started)
    with trio.move_on_after(max(0.0, wait)):
        await node.joined.wait()
    if _stopping:
        return
    if not node.joined.is_set():
        log.warning(
            "no bootstrap peer answered in %g s; ready without them (still retrying)",
            node.bootstrap_wait,
        )
    notifier().ready(status_line(node.status(), joined=node.joined.is_set()))
    log.debug("told systemd: ready")


def notify_stopping(why: str) -> None:
    """STOPPING=1 as the first thing on SIGTERM/SIGINT, so `systemctl status` says so."""
    global _stopping
    _stopping = True
    notifier().stopping(f"stopping: {why}")
