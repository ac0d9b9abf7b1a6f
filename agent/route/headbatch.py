"""The client's LM head for concurrent generations: one matmul for every stream waiting.

Several generations through one client (`shardmesh generate` with many prompts, the HTTP API's
users, a benchmark) each need the logits of their last hidden state once a token. Run one at
a time on the event loop, sixteen streams cost sixteen small matmuls in a row, and the loop
(and so every stream's network I/O) is blocked meanwhile: the streams reach the servers one
after another and the servers' continuous batching has little to batch. Here the logits of
every stream waiting run as one matmul in a worker thread; a stream that asks while it runs
is in the next one. Rows are independent (the final norm and the head are per token), so a
stream's logits do not depend on who else is in the batch beyond float rounding.

No task of its own: the first waiting caller runs a batch (its own row and everyone else's)
and hands over; the next caller whose row is not done runs the next. The thread call is
shielded, so a caller cancelled mid-batch still delivers the others' rows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio

if TYPE_CHECKING:
    from agent.model.head import ClientHead

# Rows one head matmul carries at most (a larger crowd waits for the next one).
MAX_ROWS = 64


@dataclass(eq=False)
class _Row:
    hidden: torch.Tensor  # [b, q, hidden]
    logits: torch.Tensor | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.logits is not None or self.error is not None


@dataclass(eq=False)
class HeadBatcher:
    head: ClientHead
    _queue: list[_Row] = field(default_factory=list)
    _busy: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`head.logits(hidden)`, batched with the other streams asking at the same time."""
        row = _Row(hidden)
        self._queue.append(row)
        try:
            while not row.finished:
                if self._busy:
                    await self._changed.wait()
                else:
                    await self._run(row)
        finally:
            if row in self._queue:  # cancelled before its batch
                self._queue.remove(row)
        if row.error is not None:
            raise row.error
        assert row.logits is not None
        return row.logits

    async def _run(self, mine: _Row) -> None:
        self._busy = True
        try:
            while not mine.finished:
                batch = self._queue[:MAX_ROWS]
                del self._queue[: len(batch)]
                with trio.CancelScope(shield=True):
                    results = await trio.to_thread.run_sync(self._compute, batch)
                for row, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        row.error = result
                    else:
                        row.logits = result
        finally:
            self._busy = False
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def _compute(self, batch: list[_Row]) -> list[torch.Tensor | BaseException]:
        """In a worker thread: rows of one shape in one matmul; any other shape alone."""
        shapes = {tuple(r.hidden.shape[1:]) for r in batch}
        if len(batch) > 1 and len(shapes) == 1:
            try:
                out = self.head.logits(torch.cat([r.hidden for r in batch], dim=0))
                return list(out.split([r.hidden.shape[0] for r in batch], dim=0))
            except Exception:  # one bad row: each alone below says which
                pass
        results: list[torch.Tensor | BaseException] = []
        for r in batch:
            try:
                results.append(self.head.logits(r.hidden))
            except Exception as exc:
                results.append(exc)
        return results


# One batcher per head and trio run (a batcher's events belong to the run that made them).
_batchers: weakref.WeakKeyDictionary[ClientHead, tuple[object, HeadBatcher]] = (
    weakref.WeakKeyDictionary()
)


def head_batcher(head: ClientHead) -> HeadBatcher:
    """The batcher every generation through `head` in this trio run shares."""
    run = trio.lowlevel.current_root_task()
    entry = _batchers.get(head)
    if entry is None or entry[0] is not run:
        entry = (run, HeadBatcher(head))
        _batchers[head] = entry
    return entry[1]
