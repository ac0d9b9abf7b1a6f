"""The agent's lifecycle: the one owner of its state (joining / online / draining / leaving),
the reason line that goes with it, and admission (whether the serving part takes sessions).

Everything else only reads `state` and `reason()`: ads (agent.daemon.announce), `shardmesh
status`, /metrics, systemd's STATUS= line. The start-up wiring (agent.daemon.node), the idle
watch and the signal handler ask for a change through the methods below; nothing else writes
the state or the reason, and nothing else calls `Serving.set_accepting`. The serving part's own
`activity` ("choosing blocks", "loading blocks 0:4") stays its own: while joining, it is the
reason.

A load that fails (bad weights, a missing tensor, out of memory, an unreadable checkpoint) is
no crash and no restart loop: the agent stays up, online but serving no blocks (routing and
relaying, its ads claim no span), and `load_failed` makes the reason say
"load failed: <why>" (one line, `load_error_line`), which `shardmesh status` and systemd's
STATUS= show.

One drain procedure, `drain(grace)`, serves both ways of ceasing to serve. The owner coming
back (agent.daemon.idlewatch: grace `idle.drain_grace`, cut short when the idle policy says
the grace is over) and SIGTERM (`stop`: grace bounded by systemd's stop timeout, cut short by
a second signal). Draining means: no new sessions; the state says draining and an ad says so at
once, so routers stop choosing us; running sessions get the grace to finish; those left are
ended, so their clients fail over and replay elsewhere at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterable, Callable
from typing import Any, Protocol

import trio

from agent.daemon.sdnotify import bounded_grace
from agent.errors import ShardmeshError
from agent.policy.snapshot import DRAINING, JOINING, LEAVING, ONLINE

log = logging.getLogger("shardmesh.agent")

LEAVE_GRACE_S = 1.5  # all the leaving ad may take, its linger included
# Let the first hop carry the leaving ad out before the host closes (at 20 agents a 0.3 s
# wait once lost it: peers then dropped us only at TTL).
LEAVE_LINGER_S = 0.8
ANNOUNCE_TIMEOUT_S = 2.0  # a state change's ad; the regular announce loop retries anyway
END_SESSIONS_TIMEOUT_S = 2.0
DRAIN_POLL_S = 0.1

# A fixed line, or one computed when read (the idle policy's countdown).
Reason = str | Callable[[], str]
LOAD_FAILED = "load failed"  # how the reason line after a failed load starts
MAX_LOAD_ERROR_CHARS = 300  # of the why in that line (ads carry reasons up to 512)


class Admission(Protocol):
    """The serving part as the lifecycle drives it (agent.serve.serving.Serving)."""

    @property
    def activity(self) -> str: ...

    @property
    def shard(self) -> object | None: ...  # None while no blocks are loaded

    @property
    def span(self) -> tuple[int, int]: ...

    @property
    def model_name(self) -> str: ...

    def set_accepting(self, accepting: bool) -> None: ...

    def active_sessions(self) -> int: ...

    async def end_sessions(self) -> None: ...


class Publisher(Protocol):
    """Publishes this agent's capacity ad now, with the lifecycle's state (agent.daemon.node)."""

    async def publish_ad(self, state: str | None = None) -> None: ...


def load_error_line(exc: BaseException) -> str:
    """Why a load failed, on one line: an expected failure's own message (the checkpoint's
    ModelError: a missing tensor, a corrupt file), "out of memory (...)", else the
    exception's type and the first words of its message. No traceback."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError":  # torch's (CUDA) OOM
        text = f"out of memory ({text})" if text else "out of memory"
    elif not isinstance(exc, ShardmeshError):
        text = f"{name}: {text}" if text else name
    if len(text) > MAX_LOAD_ERROR_CHARS:
        text = text[: MAX_LOAD_ERROR_CHARS - 1] + "…"
    return text


def serving_reason(serving: Admission | None) -> str:
    """The reason line of an online agent."""
    if serving is not None:
        start, end = serving.span
        return f"serving blocks {start}:{end} of {serving.model_name}"
    return "no model configured: routing and relaying only"


class Unloadable(Protocol):
    async def unload(self) -> None: ...


async def settle_failed_load(lifecycle: Lifecycle, serving: Unloadable | None, why: str) -> None:
    """A load failed (at start-up or a reload by the idle watch; `why` is load_error_line's):
    one line in the log, not a traceback or an exit (systemd would restart us into the same
    failure); drop whatever half loaded, so ads claim no span; stay up routing and relaying,
    the reason saying "load failed: <why>" (docs/ARCHITECTURE.md)."""
    log.error("load failed: %s; serving no blocks (shardmesh status shows this)", why)
    if serving is not None:
        with trio.move_on_after(10.0):
            try:
                await serving.unload()  # frees what a failed load left (after out of memory)
            except Exception as exc:
                log.warning("freeing the failed load's memory: %s", load_error_line(exc))
    lifecycle.load_failed(why)


class Lifecycle:
    """The agent's state, reason and admission; see the module's docstring."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._serving: Admission | None = None
        self._state = JOINING
        self._reason: Reason = "starting"
        self._stopping = False
        self.started = time.monotonic()

    def attach(self, serving: Admission) -> None:
        """The serving part whose admission this lifecycle owns (none: a relay-only agent)."""
        self._serving = serving

    # --- what everyone reads --------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def stopping(self) -> bool:
        """Set by the first signal (or `leave`): from then on only the way out changes state."""
        return self._stopping

    def reason(self) -> str:
        """Why the agent is in its state; while joining, what the serving part is doing."""
        serving = self._serving
        if self._state == JOINING and serving is not None and serving.activity:
            return serving.activity
        reason = self._reason
        return reason if isinstance(reason, str) else reason()

    # --- start-up and the idle policy ---------------------------------------------------------
    def online(self) -> bool:
        """Take sessions and say online (blocks loaded, or no model configured). Refused once
        stopping (a signal while the blocks load wins); returns whether it happened."""
        if self._stopping:
            return False
        self._admit(True)
        self._set(ONLINE, serving_reason(self._serving))
        return True

    async def rejoin(self) -> None:
        """`online`, and an ad at once (the idle watch: the owner left, the blocks are back)."""
        if self.online():
            await self._announce()

    def load_failed(self, why: str) -> bool:
        """The blocks could not be loaded (`why`: load_error_line's one line): stay up
        serving none of them (the caller has dropped its span, so ads claim no blocks),
        online for routing and relaying, the reason saying "load failed: <why>". Refused
        once stopping; returns whether it happened."""
        if self._stopping:
            return False
        self._set(ONLINE, f"{LOAD_FAILED}: {why}")
        return True

    def joining(self, reason: Reason) -> None:
        """Loading blocks again (the idle watch). The serving part's activity shows while set."""
        if not self._stopping:
            self._set(JOINING, reason)

    def yielded(self, reason: Reason) -> None:
        """Serving nothing for the owner's sake (no blocks loaded): ads say draining."""
        if not self._stopping:
            self._set(DRAINING, reason)

    async def announce(self) -> None:
        """An ad with the current state now (after the idle watch unloaded the blocks)."""
        if not self._stopping:
            await self._announce()

    # --- the drain, and the way out -----------------------------------------------------------
    async def drain(
        self,
        grace: float,
        *,
        reason: Reason | None = None,
        until: trio.Event | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Stop admission, say draining (an ad at once), give running sessions `grace` seconds
        to finish (`until`, once set, ends the wait early), then end the ones left. Returns
        how many were ended. With `nursery.start`, it returns once admission is closed and the
        state changed. Without loaded blocks there is nothing to drain.

        `reason` defaults to the stopping agent's line. A stopping agent with no session to
        wait for does not say draining: its leaving ad follows at once."""
        serving = self._serving
        if serving is None or serving.shard is None:
            task_status.started()
            return 0
        self._admit(False)
        sessions = serving.active_sessions()
        waits = sessions > 0 and grace > 0
        says = waits or not self._stopping
        if says:
            default = f"stopping: {sessions} sessions get {grace:.0f} s"
            self._set(DRAINING, reason if reason is not None else default)
        if waits:
            log.info("draining %d sessions for up to %.0f s", sessions, grace)
        task_status.started()
        async with trio.open_nursery() as nursery:
            if until is not None:
                nursery.start_soon(_cancel_when_set, until, nursery.cancel_scope)
            # The ad goes out within the grace: the drain never takes longer than `grace`.
            with trio.move_on_after(grace if waits else math.inf):
                if says:
                    await self._announce()
                while waits and serving.active_sessions():
                    await trio.sleep(DRAIN_POLL_S)
            nursery.cancel_scope.cancel()
        left = serving.active_sessions()
        if left:
            log.warning("ending %d sessions still open (their clients fail over)", left)
        with trio.move_on_after(END_SESSIONS_TIMEOUT_S):
            await serving.end_sessions()
        return left

    async def stop(self, drain_grace: float, signals: AsyncIterable[object] | None = None) -> None:
        """SIGTERM's way out, once the first signal arrived: drain (`drain_grace`, bounded by
        systemd's stop timeout so the leaving ad still fits; any further signal in `signals`
        skips the wait), then the leaving ad."""
        self._stopping = True
        serving = self._serving
        if serving is not None and serving.shard is not None:
            cut = trio.Event()
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(_cut_on_signal, signals, cut)
                await self.drain(bounded_grace(drain_grace), until=cut)
                nursery.cancel_scope.cancel()
        await self.leave()

    async def leave(self) -> None:
        """Say leaving (peers drop us at once), and give the ad a moment to get out."""
        self._stopping = True
        self._set(LEAVING, self._reason)
        with trio.move_on_after(LEAVE_GRACE_S):
            await self._announce()
            await trio.sleep(LEAVE_LINGER_S)

    # --- the only writers ---------------------------------------------------------------------
    def _set(self, state: str, reason: Reason) -> None:
        self._state, self._reason = state, reason

    def _admit(self, accepting: bool) -> None:
        if self._serving is not None:
            self._serving.set_accepting(accepting)

    async def _announce(self) -> None:
        with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
            try:
                await self._publisher.publish_ad()
            except Exception as exc:  # the regular announce loop will try again
                log.warning("publishing the %s ad failed: %s", self._state, exc)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _cut_on_signal(signals: AsyncIterable[object], cut: trio.Event) -> None:
    async for _ in signals:
        log.info("second signal: leaving now")
        cut.set()
