"""Real agents as child processes: `shardmesh up` started the way a user starts it, driven
over its control socket, stopped by pid. Every wait is bounded.

Used by `shardmesh demo`, the tests (tests/agentproc.py) and the benchmarks (scripts/). At
import time this needs agent.errors only; agent.api.control's blocking client (no trio, no
libp2p) is imported on the first request and psutil on the first resource reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from agent.errors import ShardmeshError

if TYPE_CHECKING:
    import psutil

# The command before `up`: this interpreter, so children run the same agent code.
SHARDMESH: tuple[str, ...] = (sys.executable, "-m", "agent.cli")
# Loopback only and no multicast discovery: agents meet only through the bootstrap flags given.
LOOPBACK: tuple[str, ...] = ("--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0")
READY_STATES: tuple[str, ...] = ("online",)
KILL_WAIT_S = 5.0  # after SIGKILL; only a process stuck in the kernel takes longer
MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class AgentError(ShardmeshError):
    """An agent exited while starting, or a bounded wait ran out; one line for the user."""


class WaitTimeout(AgentError):
    """wait_for ran out of time."""


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `pred` until it returns something truthy, and return that. Whatever `pred` raises
    passes through (a dead agent should fail the wait at once, not at the deadline)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def pdeathsig_preexec() -> None:
    """A Popen preexec_fn: the kernel SIGTERMs the child when its parent dies, so a killed
    benchmark leaves no agents behind (Linux; elsewhere it does nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class AgentProcess:
    """One `shardmesh up` child process.

    Its command line is `entry up --state-dir STATE_DIR *base_args *args`: flags in `args`
    come last, so they override the base ones. Its output goes to `state_dir.parent /
    <name>.log` (appended: a restarted agent keeps one log). It counts as ready once its
    control socket reports a state in `ready_states`.

    args, env, python_args and ready_states are plain attributes read at launch and wait
    time, so a caller may change them between runs (a restart with another bootstrap peer).
    """

    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str] = (),
        *,
        base_args: Sequence[str] = LOOPBACK,
        env: Mapping[str, str] | None = None,
        entry: Sequence[str] | None = None,
        python_args: Sequence[str] = (),
        cwd: Path | None = None,
        die_with_parent: bool = False,
        ready_states: Sequence[str] = READY_STATES,
    ) -> None:
        """`env`: overrides on top of this process's environment. `entry`: another launcher
        instead of `python -m agent.cli`. `python_args`: interpreter options before `-m`
        (e.g. -X tracemalloc), for the default entry only. `die_with_parent`: see
        pdeathsig_preexec."""
        self.state_dir = state_dir
        self.args = list(args)
        self.base_args = list(base_args)
        self.env = dict(env or {})
        self.entry = list(entry) if entry else None
        self.python_args = list(python_args)
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.ready_states = tuple(ready_states)
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peer_id: str | None = None
        self.addrs: list[str] = []
        self.started_at = 0.0  # time.monotonic() at launch
        self.ready_at = 0.0  # ... when it was first seen ready
        self._ps: psutil.Process | None = None

    # --- identity ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.state_dir.name

    @property
    def control(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def addr(self) -> str:
        """The first listen address with /p2p/<id>: what another agent's --bootstrap takes."""
        if not self.addrs:
            raise AgentError(f"agent {self.name} has no address yet (not ready)")
        return self.addrs[0]

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise AgentError(f"agent {self.name} was never launched")
        return self.proc.pid

    def command(self) -> list[str]:
        if self.entry and self.python_args:
            raise ValueError("python_args apply to the default entry only")
        entry = self.entry or [sys.executable, *self.python_args, "-m", "agent.cli"]
        return [*entry, "up", "--state-dir", str(self.state_dir), *self.base_args, *self.args]

    # --- starting ---------------------------------------------------------------------------
    def start(self, ready_timeout: float = 60.0) -> Self:
        self.launch()
        return self.wait_ready(ready_timeout)

    def launch(self) -> None:
        """Start the process and return at once; wait_ready waits for it."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log_path, "ab") as log:  # the child holds its own copy of the fd
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                preexec_fn=pdeathsig_preexec if self.die_with_parent else None,
            )
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        self._ps = None

    def wait_ready(self, timeout: float = 60.0, *, interval: float = 0.1) -> Self:
        """Poll the control socket every `interval` s; sets peer_id, addrs and ready_at."""
        what = f"agent {self.name} to be ready"
        try:
            status = wait_for(self._ready_status, timeout, what, interval=interval)
        except WaitTimeout:
            raise self.failure(f"agent {self.name} was not ready within {timeout:g} s") from None
        self.ready_at = time.monotonic()
        assert status is not None  # wait_for returns only a truthy reading
        self.peer_id = status["peer_id"]
        self.addrs = list(status["addrs"])
        return self

    def _ready_status(self) -> dict[str, Any] | None:
        self.check_running()
        if not self.control.exists():  # not listening yet: spare the connect attempt
            return None
        status = self.request_or_none("status")
        return status if status and status.get("state") in self.ready_states else None

    def check_running(self) -> None:
        """Raise self.failure(...) if the process is not running."""
        if self.proc is None:
            raise self.failure(f"agent {self.name} was never launched")
        if self.proc.poll() is not None:
            raise self.failure(f"agent {self.name} exited with code {self.proc.returncode}")

    def failure(self, message: str) -> Exception:
        """What a failed start raises: the message and the log's last line, on one line (the
        CLI prints it as is). A subclass may quote more of the log."""
        return AgentError(f"{message}: {self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- the control API ----------------------------------------------------------------------
    def request(self, cmd: str, *, timeout: float = 5.0, **args: Any) -> Any:
        """One command's result; ControlError if the agent cannot answer."""
        from agent.api.control import request

        return request(self.control, cmd, timeout=timeout, **args)

    def request_or_none(self, cmd: str, *, timeout: float = 5.0, **args: Any) -> Any:
        """The result, or None while the agent cannot answer (starting, overloaded, gone)."""
        try:
            return self.request(cmd, timeout=timeout, **args)
        except (ShardmeshError, OSError, ValueError):
            return None

    def stream_request(
        self, cmd: str, *, timeout: float = 10.0, **args: Any
    ) -> Iterator[dict[str, Any]]:
        """Every reply line of a streaming command (generate: tokens, then the result)."""
        from agent.api.control import stream_request

        return stream_request(self.control, cmd, timeout=timeout, **args)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def peers(self) -> dict[str, Any]:
        return self.request("peers")

    def peer_ids(self) -> set[str]:
        return {p["peer_id"] for p in self.peers()["peers"]}

    # --- its log ------------------------------------------------------------------------------
    def log(self, chars: int = 4000) -> str:
        """The end of its log ("" if there is none)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def tail(self) -> str:
        """Its log's last line, for one-line errors."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    # --- stopping -------------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send `sig` if the process still runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """Its exit code; subprocess.TimeoutExpired if it runs on past `timeout`."""
        if self.proc is None:
            raise AgentError(f"agent {self.name} was never launched")
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0, *, signalled: bool = False) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout`; the exit code (None if
        never launched). `signalled`: the caller has sent SIGTERM already, so send none now
        (a second SIGTERM cuts a serving agent's drain short)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not signalled:
                self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=KILL_WAIT_S)

    # --- resources (benchmarks) -------------------------------------------------------------------
    @property
    def ps(self) -> psutil.Process:
        """psutil's handle on the process (RSS, CPU, fds), made on first use."""
        if self._ps is None:
            import psutil

            self._ps = psutil.Process(self.pid)
        return self._ps

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / MIB

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far."""
        t = self.ps.cpu_times()
        return t.user + t.system


def start_many(agents: Sequence[AgentProcess], ready_timeout: float = 180.0) -> None:
    """Launch all, then wait for each: they import and load in parallel."""
    for a in agents:
        a.launch()
    for a in agents:
        a.wait_ready(ready_timeout)


def stop_all(
    agents: Sequence[AgentProcess], timeout: float = 10.0, *, drain: bool = False
) -> list[int | None]:
    """SIGTERM every agent first, so they leave in parallel, then wait for each (SIGKILL after
    `timeout`); their exit codes. `drain=False` sends each a second SIGTERM as it is waited
    for, which cuts a serving agent's session drain short; `drain=True` lets it drain. An
    agent that cannot be stopped (None) does not keep the others running."""
    for a in agents:
        with contextlib.suppress(OSError):
            a.signal(signal.SIGTERM)
    codes: list[int | None] = []
    for a in agents:
        code = None
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            code = a.stop(timeout, signalled=drain)
        codes.append(code)
    return codes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(
    *args: str,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    entry: Sequence[str] = SHARDMESH,
) -> subprocess.CompletedProcess[str]:
    """Run one `shardmesh` command to completion, capturing its output as text."""
    return subprocess.run(
        [*entry, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
