"""Continuous batching, the trio half: steps of concurrent sessions run as one forward.

A stream handler's step waits here (`run`); one loop (`loop`, in the serving nursery) takes
what is waiting whenever the device is free, asks agent.serve.batchplan which slices the next
forward carries, and runs them through `ShardModel.forward_batch` in a worker thread. A step
that arrives while a forward runs goes in the next one: no step waits for a batch to fill.
A long step (a prefill) runs in chunks across forwards, interleaved with other sessions'
decodes; its answer is the concatenation of its chunks, sent when the last one has run.

A batch is all or nothing in the model layer; when one fails, each of its steps is run alone
so the failure reaches only the step that caused it. The loop is the only writer of the
queue's progress; a handler that is cancelled leaves its step to be skipped (its session is
closed with the stream).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from agent.serve.batchplan import BatchBounds, Slice, Waiting, gather_wait, plan_batch
from agent.serve.stats import BATCH_ROWS, BATCH_TOKENS

if TYPE_CHECKING:
    import torch

    from agent.model.blocks import SessionCache, ShardModel

log = logging.getLogger("shardmesh.serving")

# A session that ran a step this recently is expected to send its next one (gather_wait).
ACTIVE_WINDOW_S = 1.0


@dataclass(eq=False)
class _Job:
    key: int
    cache: SessionCache
    hidden: torch.Tensor  # [b, q, hidden] on the device
    position: int
    span: tuple[int, int]
    done: int = 0  # tokens run so far
    outputs: list[torch.Tensor] = field(default_factory=list)
    error: BaseException | None = None
    finished: trio.Event = field(default_factory=trio.Event)
    abandoned: bool = False  # its handler went away: skip what is left

    @property
    def total(self) -> int:
        return int(self.hidden.shape[1])


class StepBatcher:
    """One queue of steps in front of the blocks of one agent."""

    def __init__(
        self, bounds: BatchBounds, compute: trio.CapacityLimiter, max_wait_s: float = 0.0
    ) -> None:
        self.bounds = bounds
        # How long a forward may wait for the steps of other active sessions; at most the
        # last forward's own time (waiting longer than a forward never pays).
        self.max_wait_s = max_wait_s
        self._last_forward_s = 0.0
        self._recent: dict[int, float] = {}  # id(session cache) -> when it last stepped
        self.compute = compute  # the device: held for the whole of one forward
        self._shard: Callable[[], ShardModel | None] = lambda: None
        self._queue: list[_Job] = []
        self._keys = itertools.count()
        self._wake = trio.Event()
        # Read by status: the last forward's sequences and tokens, and counts overall.
        self.last_rows = 0
        self.forwards = 0
        self.rows_total = 0

    def attach(self, shard: Callable[[], ShardModel | None]) -> None:
        """Where the loaded blocks are (None while unloaded)."""
        self._shard = shard

    def forget(self, cache: SessionCache) -> None:
        """The session closed: its next step is not coming (gather_wait)."""
        self._recent.pop(id(cache), None)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def run(
        self, cache: SessionCache, hidden: torch.Tensor, position: int, span: tuple[int, int]
    ) -> torch.Tensor:
        """Queue one session's step and wait for its output [b, q, hidden]; raises what the
        model raised for it (PositionError / ValueError for a bad step)."""
        import torch

        job = _Job(next(self._keys), cache, hidden, position, span)
        self._queue.append(job)
        self._wake.set()
        try:
            await job.finished.wait()
        except BaseException:
            job.abandoned = True
            raise
        if job.error is not None:
            raise job.error
        return job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1)

    async def loop(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            self._queue = [j for j in self._queue if not j.abandoned]
            if not self._queue:
                continue
            await self._gather()
            plan = plan_batch([_waiting(j) for j in self._queue], self.bounds)
            await self._run_plan(plan)

    async def _gather(self) -> None:
        """Wait (briefly, see gather_wait) for the steps of other active sessions."""
        start = trio.current_time()
        limit = min(self.max_wait_s, self._last_forward_s)
        while True:
            now = trio.current_time()
            for key in [k for k, t in self._recent.items() if now - t > ACTIVE_WINDOW_S]:
                del self._recent[key]
            queued = {id(j.cache) for j in self._queue if not j.abandoned}
            active = len(queued | set(self._recent))
            wait = gather_wait(len(queued), active, now - start, limit)
            if wait <= 0:
                return
            self._wake = trio.Event()
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _run_plan(self, plan: list[Slice]) -> None:
        jobs = {j.key: j for j in self._queue}
        slices = [(jobs[s.key], s.tokens) for s in plan]
        t0 = trio.current_time()
        async with self.compute:
            shard = self._shard()
            if shard is None:
                results: list[torch.Tensor | BaseException] = [
                    ValueError("the blocks were unloaded") for _ in slices
                ]
            else:
                results = await trio.to_thread.run_sync(_forward, shard, slices)
        done_at = trio.current_time()
        self._last_forward_s = done_at - t0
        for job, _ in slices:
            self._recent[id(job.cache)] = done_at
        rows = sum(j.hidden.shape[0] for j, _ in slices)
        self.last_rows = rows
        self.forwards += 1
        self.rows_total += rows
        BATCH_ROWS.observe(rows)
        BATCH_TOKENS.observe(sum(j.hidden.shape[0] * n for j, n in slices))
        for (job, n), result in zip(slices, results, strict=True):
            if isinstance(result, BaseException):
                job.error = result
            else:
                job.outputs.append(result)
                job.done += n
            if job.error is not None or job.done >= job.total:
                self._queue.remove(job)
                job.finished.set()


def _waiting(job: _Job) -> Waiting:
    return Waiting(
        key=job.key, span=job.span, rows=int(job.hidden.shape[0]), remaining=job.total - job.done
    )


def _forward(
    shard: ShardModel, slices: list[tuple[_Job, int]]
) -> list[torch.Tensor | BaseException]:
    """In a worker thread: one forward over every slice; if that fails, each alone, so an
    error is the step's own."""
    from agent.model.blocks import BatchItem

    items = [
        BatchItem(
            job.cache, job.hidden[:, job.done : job.done + n], job.position + job.done, job.span
        )
        for job, n in slices
    ]
    try:
        return list(shard.forward_batch(items))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    out: list[torch.Tensor | BaseException] = []
    for item in items:
        try:
            out.append(shard.forward(item.cache, item.hidden, item.position, span=item.span))
        except Exception as exc:
            out.append(exc)
    return out
