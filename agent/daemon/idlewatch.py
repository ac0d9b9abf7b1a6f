"""Runs the idle policy on a live agent: read the owner's activity, drain, unload, reload.

The decisions are agent.idle's (pure); this module does the I/O around them: NVML/psutil
readings in a worker thread, the serving part's drain/unload/load, and a fresh ad at every
change so peers stop routing to us at once, not at the next announce.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import psutil
import trio

from agent.hw.devices import DeviceReport, discover
from agent.policy.idle import Action, IdlePolicy, Phase, busy_reasons, owner_activity

if TYPE_CHECKING:
    from agent.daemon.node import Node
    from agent.serve.serving import Serving

log = logging.getLogger("shardmesh.idle")


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


class IdleWatch:
    """Owned by the node when `[idle] enabled`; `status()` goes into `shardmesh status`."""

    def __init__(self, node: Node, serving: Serving) -> None:
        self.node = node
        self.serving = serving
        self.cfg = node.cfg.idle
        self.policy = IdlePolicy(self.cfg)
        self.cpu = CpuSampler() if self.cfg.cpu_load_max else None

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
        report, reasons = await trio.to_thread.run_sync(self.read)
        self.node.info.devices = report
        self.serving.open_protocol(self.node, nursery)
        loaded = not reasons
        if reasons:
            self.policy.start_yielded(time.monotonic(), reasons)
            self._set("draining")
            log.info("owner active at start (%s): serving nothing until idle", "; ".join(reasons))
        else:
            await self.serving.load(self.node)
        nursery.start_soon(self.run)
        return loaded

    async def run(self) -> None:
        while True:
            await trio.sleep(self.cfg.check_interval)
            report, reasons = await trio.to_thread.run_sync(self.read)
            self.node.info.devices = report
            await self.apply(self.policy.step(time.monotonic(), reasons, self._sessions()))
            if self.policy.phase is not Phase.SERVING:
                self.node.info.reason = self.explain()

    async def apply(self, action: Action) -> None:
        why = "; ".join(self.policy.reasons)
        if action is Action.DRAIN:
            log.warning("owner is back (%s): draining, no new sessions", why)
            self.serving.set_accepting(False)
            await self._announce("draining")
        elif action is Action.RESUME:
            log.info("owner left again before the drain ended: serving again")
            self.serving.set_accepting(True)
            await self._announce("online")
        elif action is Action.UNLOAD:
            left = self._sessions()
            if left:
                log.warning("grace period over: ending %d sessions (clients fail over)", left)
            await self.serving.unload()
            await self._announce("draining")
        elif action is Action.LOAD:
            log.info("machine idle for %g s: loading blocks again", self.cfg.holdoff)
            self._set("joining")
            await self.serving.load(self.node)
            self.serving.set_accepting(True)
            self.policy.loaded()
            await self._announce("online")

    def explain(self) -> str:
        return self.policy.explain(time.monotonic(), self._sessions())

    def status(self) -> dict[str, Any]:
        return {"phase": self.policy.phase.value, "why": self.explain()}

    def _sessions(self) -> int:
        return self.serving.active_sessions()

    def _set(self, state: str) -> None:
        from agent.daemon.node import serving_reason

        self.node.info.state = state
        self.node.info.reason = serving_reason(self.node) if state == "online" else self.explain()

    async def _announce(self, state: str) -> None:
        self._set(state)
        with trio.move_on_after(2.0):
            try:
                await self.node.publish_ad()
            except Exception as exc:  # the regular announce loop will try again
                log.warning("publishing the %s ad failed: %s", state, exc)
