"""systemd's notify protocol (sd_notify(3)) without a dependency: one datagram a message.

Under a `Type=notify` unit systemd sets $NOTIFY_SOCKET (a path, or '@name' for an abstract
socket); every message is `KEY=VALUE` lines in one AF_UNIX datagram: READY=1, STATUS=...,
STOPPING=1, WATCHDOG=1. Outside systemd the variable is unset and every call is a no-op, so
the agent calls these unconditionally. A failed send is logged once and never raised: a
notification must not take the agent down.

The stop timeout: systemd tells a service neither its TimeoutStopSec= nor how long it has
left after SIGTERM. The unit therefore states it twice, `TimeoutStopSec=N` and
`Environment=SHARDMESH_STOP_TIMEOUT_S=N` (tests/test_systemd.py checks they agree), and
`stop_timeout_s()` reads the latter.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("shardmesh.sdnotify")

STOP_TIMEOUT_ENV = "SHARDMESH_STOP_TIMEOUT_S"
# What the agent keeps for itself after the drain: the leaving ad (LEAVE_GRACE_S) and the
# libp2p teardown, so systemd's SIGKILL never lands mid-goodbye.
STOP_MARGIN_S = 5.0


class Notifier:
    """Sends notifications to systemd; does nothing when $NOTIFY_SOCKET is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram. True when it was sent."""
        if self.address is None or not fields:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the event loop on a full queue: a dropped ping is better.
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                shown = self.address.replace("\0", "@")
                log.warning(
                    "cannot notify systemd on %s (further failures not logged): %s", shown, exc
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self, status: str | None = None) -> bool:
        return self.send("WATCHDOG=1", *_status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    # One line: a newline would start a new (bogus) field.
    return [] if text is None else ["STATUS=" + " ".join(text.split())]


def _socket_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value:
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying systemd", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises; None without a watchdog or when $WATCHDOG_PID names another process."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def stop_timeout_s(env: Mapping[str, str] | None = None) -> float | None:
    """How long systemd waits after SIGTERM before SIGKILL, in seconds, as the unit states it
    in $SHARDMESH_STOP_TIMEOUT_S; None when not stated (not under the unit, or 'infinity')."""
    env = os.environ if env is None else env
    raw = env.get(STOP_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        if raw and raw != "infinity":
            log.warning("%s=%r is not a number of seconds; ignored", STOP_TIMEOUT_ENV, raw)
        return None
    return value if value > 0 and math.isfinite(value) else None


def bounded_grace(grace: float, env: Mapping[str, str] | None = None) -> float:
    """The drain grace to use on SIGTERM: `grace`, cut so that the drain plus STOP_MARGIN_S
    ends before systemd's stop timeout."""
    timeout = stop_timeout_s(env)
    if timeout is None:
        return grace
    return max(0.0, min(grace, timeout - STOP_MARGIN_S))


_default: Notifier | None = None


def notifier() -> Notifier:
    """The process-wide notifier, built from the environment on first use."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default
