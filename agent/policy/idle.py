"""The idle policy: serve only while the owner leaves the machine alone.

Two parts. `owner_activity` turns a device report (NVML, per process) plus CPU and login
readings into the reasons the owner counts as active; it ignores this agent's own process,
so serving never makes the agent yield to itself. `IdlePolicy` is a pure state machine with
the clock passed in: serving -> draining (owner back: no new sessions, running ones get a
grace period) -> yielded (blocks unloaded, memory returned) -> loading after the machine
has been idle for the hold-off time -> serving. The daemon runs it on a live agent
(agent.daemon.idlewatch.IdleWatch), draining through the agent's lifecycle.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from agent.config import IdleConfig
from agent.hw.devices import DeviceReport

MIB = 1024 * 1024


@dataclass(frozen=True)
class OwnerReading:
    """What other processes do on this machine right now (None: not measured)."""

    gpu_util: dict[int, float]  # GPU index -> percent used by other processes
    gpu_memory_mib: dict[int, float]  # GPU index -> MiB held by other processes
    cpu_others: float | None  # share of all cores used by other processes, 0..1
    users: int | None  # logged-in users


def owner_activity(
    report: DeviceReport,
    own_pids: Collection[int],
    *,
    cpu_others: float | None = None,
    users: int | None = None,
) -> OwnerReading:
    """Per GPU, what processes other than ours use. Utilisation comes from NVML's
    per-process samples; where a GPU keeps none, the whole GPU's utilisation counts as the
    owner's as soon as another process is on it (conservative: we yield rather than guess)."""
    util: dict[int, float] = {}
    memory: dict[int, float] = {}
    for gpu in report.gpus:
        others = [p for p in gpu.processes or [] if p.pid not in own_pids]
        memory[gpu.index] = sum(p.used_memory or 0 for p in others) / MIB
        if others and all(p.sm_util is not None for p in others):
            util[gpu.index] = float(sum(p.sm_util or 0 for p in others))
        elif others or (gpu.processes is None and gpu.utilization):
            # No per-process samples (or no process list at all): the GPU's own reading.
            util[gpu.index] = float(gpu.utilization or 0)
        else:
            util[gpu.index] = 0.0
    return OwnerReading(util, memory, cpu_others, users)


def busy_reasons(reading: OwnerReading, cfg: IdleConfig) -> list[str]:
    """Why the owner counts as active, one phrase each; empty when the machine is idle."""
    reasons = []
    for index, pct in sorted(reading.gpu_util.items()):
        if pct > cfg.gpu_utilization_max:
            reasons.append(
                f"GPU {index} {pct:.0f}% busy with other processes "
                f"(limit {cfg.gpu_utilization_max:g}%)"
            )
    for index, mib in sorted(reading.gpu_memory_mib.items()):
        if mib > cfg.gpu_memory_max_mib:
            reasons.append(
                f"GPU {index}: other processes hold {mib:.0f} MiB "
                f"(limit {cfg.gpu_memory_max_mib:g} MiB)"
            )
    cpu = reading.cpu_others
    if cfg.cpu_load_max and cpu is not None and cpu > cfg.cpu_load_max:
        reasons.append(f"other processes use {cpu:.0%} of the CPU (limit {cfg.cpu_load_max:.0%})")
    if cfg.yield_to_users and reading.users:
        noun = "user is" if reading.users == 1 else "users are"
        reasons.append(f"{reading.users} {noun} logged in")
    return reasons


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    YIELDED = "yielded"
    LOADING = "loading"


class Action(enum.Enum):
    NONE = "none"
    DRAIN = "drain"  # stop taking sessions, say "draining" in the ads
    RESUME = "resume"  # the owner left again before the drain ended: take sessions again
    UNLOAD = "unload"  # end what is left of the sessions, free the blocks
    LOAD = "load"  # idle long enough: load the blocks and rejoin


@dataclass
class IdlePolicy:
    """Decides, one check at a time, what the serving part should do. Pure: `now` is given."""

    cfg: IdleConfig
    phase: Phase = Phase.SERVING
    drain_started: float = 0.0
    idle_since: float | None = None
    reasons: tuple[str, ...] = ()

    def step(self, now: float, reasons: list[str], sessions: int) -> Action:
        self.reasons = tuple(reasons)
        if reasons:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        idle_for = 0.0 if self.idle_since is None else now - self.idle_since
        if self.phase is Phase.SERVING:
            if reasons:
                self.phase, self.drain_started = Phase.DRAINING, now
                return Action.DRAIN
        elif self.phase is Phase.DRAINING:
            if not reasons and idle_for >= self.cfg.holdoff:
                self.phase = Phase.SERVING
                return Action.RESUME
            if sessions == 0 or now - self.drain_started >= self.cfg.drain_grace:
                self.phase = Phase.YIELDED
                return Action.UNLOAD
        elif self.phase is Phase.YIELDED and not reasons and idle_for >= self.cfg.holdoff:
            self.phase = Phase.LOADING
            return Action.LOAD
        return Action.NONE

    def start_yielded(self, now: float, reasons: list[str]) -> None:
        """The owner was busy when the agent started: load nothing until idle long enough."""
        self.phase, self.reasons, self.idle_since = Phase.YIELDED, tuple(reasons), None

    def loaded(self) -> None:
        self.phase = Phase.SERVING

    def explain(self, now: float, sessions: int) -> str:
        """One line for `shardmesh status`: why the agent is serving or not."""
        why = "; ".join(self.reasons)
        if self.phase is Phase.SERVING:
            return "machine idle by the owner's rules"
        if self.phase is Phase.DRAINING:
            left = max(0.0, self.cfg.drain_grace - (now - self.drain_started))
            return f"owner active ({why}): draining, {sessions} sessions, {left:.0f} s grace left"
        if self.phase is Phase.LOADING:
            return "machine idle again: loading blocks"
        if self.reasons:
            return f"yielded to the owner: {why}"
        idle_for = 0.0 if self.idle_since is None else now - self.idle_since
        return (
            f"yielded to the owner; idle for {idle_for:.0f} s of the "
            f"{self.cfg.holdoff:g} s hold-off"
        )
