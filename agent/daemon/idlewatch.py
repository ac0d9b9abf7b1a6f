"""Runs the idle policy on a live agent: read the owner's activity, drain, unload, reload.

The decisions are agent.policy.idle's (pure); this module does the I/O around them: NVML and
psutil readings in a worker thread, and the serving part's load/unload. The state, the reason
line and admission belong to the lifecycle: the owner coming back starts its `drain` (the same
procedure SIGTERM uses), which ends when the policy says the grace is over; every change
publishes a fresh ad so peers stop (or start) routing to us at once, not at the next announce.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import psutil
import trio

from agent.config import IdleConfig
from agent.daemon.lifecycle import Admission, Lifecycle, load_error_line, settle_failed_load
from agent.hw.devices import DeviceReport, discover
from agent.policy.idle import Action, IdlePolicy, busy_reasons, owner_activity
from agent.serve.host import ServingHost

log = logging.getLogger("shardmesh.idle")


class IdleServing(Admission, Protocol):
    """The serving part as the idle watch drives it (agent.serve.serving.Serving)."""

    def open_protocol(self, host: ServingHost, nursery: trio.Nursery) -> None: ...

    async def load(self, host: ServingHost) -> None: ...

    async def unload(self) -> None: ...


class CpuSampler:
    """Share of all cores that other processes used since the last reading (0..1)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.cores = psutil.cpu_count() or 1
        psutil.cpu_percent(None)  # the first reading primes both counters
        self.process.cpu_percent(None)

    def others(self) -> float:
        system = psutil.cpu_percent(None) / 100
        own = self.process.cpu_percent(None) / 100 / self.cores
        return max(0.0, system - own)


class _Drain:
    """The owner's drain in progress: a task running Lifecycle.drain."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.grace_over = trio.Event()  # the policy's word: end what is left now
        self.done = trio.Event()


class IdleWatch:
    """Owned by the node when `[idle] enabled`; `status()` goes into `shardmesh status`.
    Readings go to `on_devices` (the agent's device report, shown in ads and status)."""

    def __init__(
        self,
        cfg: IdleConfig,
        serving: IdleServing,
        lifecycle: Lifecycle,
        host: ServingHost,
        on_devices: Callable[[DeviceReport], None],
    ) -> None:
        self.cfg = cfg
        self.serving = serving
        self.lifecycle = lifecycle
        self.host = host
        self.on_devices = on_devices
        self.policy = IdlePolicy(cfg)
        self.cpu = CpuSampler() if cfg.cpu_load_max else None
        self._nursery: trio.Nursery | None = None
        self._drain: _Drain | None = None

    def read(self) -> tuple[DeviceReport, list[str]]:
        """Blocking (NVML, psutil): run in a worker thread."""
        report = discover()
        users = len(psutil.users()) if self.cfg.yield_to_users else None
        reading = owner_activity(
            report,
            {os.getpid()},
            cpu_others=self.cpu.others() if self.cpu else None,
            users=users,
        )
        return report, busy_reasons(reading, self.cfg)

    async def start(self, nursery: trio.Nursery) -> bool:
        """Open the forward protocol and load the blocks unless the owner is busy right now.
        Returns whether the blocks were loaded; the watch loop runs from here on."""
        self._nursery = nursery
        report, reasons = await trio.to_thread.run_sync(self.read)
        self.on_devices(report)
        self.serving.open_protocol(self.host, nursery)
        loaded = not reasons
        if reasons:
            self.policy.start_yielded(time.monotonic(), reasons)
            self.lifecycle.yielded(self.explain)
            log.info("owner active at start (%s): serving nothing until idle", "; ".join(reasons))
        else:
            await self.serving.load(self.host)
        nursery.start_soon(self.run)
        return loaded

    async def run(self) -> None:
        while True:
            await trio.sleep(self.cfg.check_interval)
            report, reasons = await trio.to_thread.run_sync(self.read)
            self.on_devices(report)
            await self.apply(self.policy.step(time.monotonic(), reasons, self._sessions()))

    async def apply(self, action: Action) -> None:
        if self.lifecycle.stopping:  # the way out (Lifecycle.stop) owns everything now
            return
        why = "; ".join(self.policy.reasons)
        if action is Action.DRAIN:
            log.warning("owner is back (%s): draining, no new sessions", why)
            await self._start_drain()
        elif action is Action.RESUME:
            log.info("owner left again before the drain ended: serving again")
            self._cancel_drain()
            await self.lifecycle.rejoin()
        elif action is Action.UNLOAD:
            await self._finish_drain()
            await self.serving.unload()
            await self.lifecycle.announce()  # still draining; the ad now has no span
        elif action is Action.LOAD:
            log.info("machine idle for %g s: loading blocks again", self.cfg.holdoff)
            self.lifecycle.joining(self.explain)
            try:
                await self.serving.load(self.host)
            except Exception as exc:  # out of memory now that the owner left things behind
                # As at start-up; the policy stays put (no reload loop).
                await settle_failed_load(self.lifecycle, self.serving, load_error_line(exc))
                await self.lifecycle.announce()
                return
            self.policy.loaded()
            await self.lifecycle.rejoin()

    def explain(self) -> str:
        return self.policy.explain(time.monotonic(), self._sessions())

    def status(self) -> dict[str, Any]:
        return {"phase": self.policy.phase.value, "why": self.explain()}

    def _sessions(self) -> int:
        return self.serving.active_sessions()

    # --- the drain: Lifecycle.drain in a task, so the policy keeps checking the owner ---------
    async def _start_drain(self) -> None:
        """Returns once admission is closed and the draining ad is on its way."""
        assert self._nursery is not None, "start() first"
        drain = self._drain = _Drain()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with drain.scope:
                    await self.lifecycle.drain(
                        self.cfg.drain_grace,
                        reason=self.explain,
                        until=drain.grace_over,
                        task_status=task_status,
                    )
            finally:
                drain.done.set()

        await self._nursery.start(run)

    def _cancel_drain(self) -> None:
        """The owner left during the grace: the sessions stay (the caller re-admits)."""
        if self._drain is not None:
            self._drain.scope.cancel()
            self._drain = None

    async def _finish_drain(self) -> None:
        """The grace is over (or no session is left): the drain ends what is left."""
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.grace_over.set()
            await drain.done.wait()
