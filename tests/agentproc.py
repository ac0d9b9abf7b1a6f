"""Start real agents the way a user does (`shardmesh up ...` as a separate process) and stop
them by pid. Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SHARDMESH = [sys.executable, "-m", "agent.cli"]
FAST_GOSSIP = ["--announce-interval", "0.5", "--ad-ttl", "3"]


def cli(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one `shardmesh` command to completion."""
    return subprocess.run(
        [*SHARDMESH, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Agent:
    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        entry: Sequence[str] = SHARDMESH,
    ):
        self.state_dir = state_dir
        self.args = list(args)
        self.entry = list(entry)  # the command before `up` (another launcher, in some tests)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.peer_id: str | None = None
        self.addrs: list[str] = []
        # States in which the agent counts as started (an idle-policy agent whose owner is
        # busy stays "draining").
        self.ready_states: tuple[str, ...] = ("online",)

    @property
    def control(self) -> Path:
        return self.state_dir / "control.sock"

    def start(self, ready_timeout: float = 60.0) -> Agent:
        self.launch()
        return self.wait_ready(ready_timeout)

    def launch(self) -> None:
        """Start the process; flags in self.args come last, so they override these."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child for its lifetime
        cmd = [*self.entry, "up", "--state-dir", str(self.state_dir), "--no-mdns"]
        cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", *FAST_GOSSIP, *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()

    def wait_ready(self, ready_timeout: float) -> Agent:
        status = wait_for(self._ready, ready_timeout, f"agent {self.state_dir.name} to answer")
        self.peer_id = status["peer_id"]
        self.addrs = status["addrs"]
        return self

    def _ready(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
        try:
            status = self.status()
        except Exception:
            return None
        return status if status.get("state") in self.ready_states else None

    def request(self, cmd: str, **args: Any) -> Any:
        from agent.api.control import request

        return request(self.control, cmd, timeout=5.0, **args)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def peers(self) -> dict[str, Any]:
        return self.request("peers")

    def peer_ids(self) -> set[str]:
        return {p["peer_id"] for p in self.peers()["peers"]}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def start_many(agents: Sequence[Agent], ready_timeout: float = 180.0) -> None:
    """Start processes together (they import torch in parallel), then wait for each."""
    for a in agents:
        a.launch()
    for a in agents:
        a.wait_ready(ready_timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(agents: Sequence[Agent]) -> None:
    for a in agents:
        a.signal(signal.SIGTERM)
    for a in agents:
        a.stop()


def status_json(agent: Agent) -> dict[str, Any]:
    out = cli("status", "--json", "--control", str(agent.control))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
