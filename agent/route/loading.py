"""Requests for a model whose blocks are still loading: the decision (pure, over a snapshot of
the spans and of the peers that name the model) and the bounded wait for coverage.

A model counts as loading when some blocks of the range asked for have no usable online peer
and at least one peer naming the model is "joining" with a span over those blocks, or with no
span yet (still choosing its blocks). The client then says so (which peers load which blocks,
what they report) instead of "not fully served", and waits for coverage up to its budget
(`[client] loading_wait`, or the request's own: `shardmesh generate` sends its `--timeout`);
after that it raises `ModelLoading`. When nothing is loading, the caller's usual path runs at
once and its error says what is missing (and which peers failed to load the model).

No torch here: the HTTP API imports this to list a loading model and to decide its answers.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from agent.policy.routing import describe_blocks
from agent.policy.snapshot import JOINING, ROUTABLE_STATES, PeerSpan
from agent.route.view import MeshView, ModelLoading, ModelPeer, ModelPeers

log = logging.getLogger("shardmesh.client")

# The lifecycle's reason line after a failed load starts so (agent.daemon.lifecycle).
LOAD_FAILED = "load failed"
POLL_S = 0.25
# The waiting notice goes out again this often while nothing changes: a keepalive that
# stops the control socket's reader from timing out during a long load.
NOTICE_EVERY_S = 5.0
# ModelLoading is raised this long before an enclosing deadline (the API's request timeout,
# the standalone CLI's --timeout), so the caller gets "loading", not a bare timeout.
DEADLINE_MARGIN_S = 0.5
MAX_PEERS_NAMED = 4  # peers described in one message; the rest are counted
MAX_REASON_CHARS = 160  # of each peer's reason line in a message


@dataclass(frozen=True)
class Loading:
    """Blocks [start, end) of `model_id` lack an online peer; `peers` are loading them."""

    model_id: str
    missing: tuple[int, ...]  # blocks no usable online peer serves
    peers: tuple[ModelPeer, ...]  # joining peers naming the model, by span
    unclaimed: tuple[int, ...]  # missing blocks no loading peer claims (yet)
    self_id: str = ""  # the asking agent's own peer id: named "this agent" in messages

    @property
    def model_name(self) -> str:
        return self.model_id.partition("@")[0] or self.model_id

    def describe(self) -> str:
        """One line, e.g. 'model tiny-llama is loading on 2 peers (blocks 0:4 on 3fQx9a;
        blocks 4:8 on 9PzR1b: measuring)'."""
        n = len(self.peers)
        parts = [_peer_part(p, self.self_id) for p in self.peers[:MAX_PEERS_NAMED]]
        if n > MAX_PEERS_NAMED:
            parts.append(f"{n - MAX_PEERS_NAMED} more")
        line = f"model {self.model_name} is loading on {_plural(n, 'peer')} ({'; '.join(parts)})"
        if self.unclaimed and all(p.span is not None for p in self.peers):
            line += f"; no peer serves or loads {describe_blocks(list(self.unclaimed))} yet"
        return line

    def to_json(self) -> dict[str, Any]:
        """The control socket's "waiting" event (and the API's /v1/models detail)."""
        return {
            "model": self.model_id,
            "message": self.describe(),
            "missing": describe_blocks(list(self.missing)),
            "peers": [
                {
                    "peer_id": p.peer_id,
                    "span": list(p.span) if p.span else None,
                    "reason": _printable(p.reason),
                }
                for p in self.peers
            ],
        }


def loading_state(
    model_id: str,
    start: int,
    end: int,
    spans: Sequence[PeerSpan],
    peers: Sequence[ModelPeer],
    avoid: Collection[str] = (),
    self_id: str = "",
) -> Loading | None:
    """Whether blocks [start, end) wait for peers that are loading them: None when every
    block has a usable online peer (routable now), or when no joining peer names the model
    with a span over the missing blocks or without a span yet (nothing to wait for).
    `self_id`: the asking agent's peer id, which messages call "this agent"."""
    if end <= start:
        return None
    avoided = set(avoid)
    usable = [s for s in spans if s.state in ROUTABLE_STATES and s.peer_id not in avoided]
    missing = _uncovered(start, end, [(s.start, s.end) for s in usable])
    if not missing:
        return None
    joining = [
        p
        for p in peers
        if p.state == JOINING
        and p.peer_id not in avoided
        and (p.span is None or _overlaps(p.span, missing))
    ]
    if not joining:
        return None
    joining.sort(key=lambda p: (p.span is None, p.span or (0, 0), p.peer_id))
    unclaimed = set(_uncovered(start, end, [p.span for p in joining if p.span]))
    unclaimed_blocks = tuple(b for b in missing if b in unclaimed)
    return Loading(model_id, tuple(missing), tuple(joining), unclaimed_blocks, self_id)


def load_failures(peers: Sequence[ModelPeer], self_id: str = "") -> str:
    """A note on peers that failed to load the model, for a "not fully served" error:
    ' (2 peers failed to load it: 3fQx9a: load failed: ...; ...)', or ''."""
    failed = [p for p in peers if p.reason.startswith(LOAD_FAILED)]
    if not failed:
        return ""
    parts = [f"{_who(p.peer_id, self_id)}: {_printable(p.reason)}" for p in failed]
    parts = parts[:MAX_PEERS_NAMED]
    if len(failed) > MAX_PEERS_NAMED:
        parts.append(f"{len(failed) - MAX_PEERS_NAMED} more")
    return f" ({_plural(len(failed), 'peer')} failed to load it: {'; '.join(parts)})"


def model_peers(view: MeshView, model_id: str) -> list[ModelPeer]:
    """The peers naming `model_id`, when the view can tell (agent.route.view.ModelPeers)."""
    return view.model_peers(model_id) if isinstance(view, ModelPeers) else []


def loading_now(
    view: MeshView, model_id: str, start: int, end: int, avoid: Collection[str] = ()
) -> Loading | None:
    """`loading_state` over what the view sees right now."""
    peers = model_peers(view, model_id)
    if not peers:
        return None
    spans = view.spans(model_id)
    return loading_state(model_id, start, end, spans, peers, avoid, getattr(view, "self_id", ""))


Notify = Callable[[Loading], Awaitable[Any]]


async def wait_while_loading(
    view: MeshView,
    model_id: str,
    n_blocks: int,
    budget_s: float,
    notify: Notify | None = None,
    *,
    avoid: Callable[[], Collection[str]] | None = None,
) -> None:
    """Return at once unless the model is loading (see `loading_state`); else tell `notify`
    (at once, on every change and every NOTICE_EVERY_S), and return when the loading is
    over: every block online, or nothing left loading (the route's own error then says
    what is missing). Raises ModelLoading after `budget_s` seconds, or DEADLINE_MARGIN_S
    before the enclosing cancel scope's deadline, whichever comes first."""

    def now_loading() -> Loading | None:
        return loading_now(view, model_id, 0, n_blocks, avoid() if avoid else ())

    loading = now_loading()
    if loading is None:
        return
    began = trio.current_time()
    deadline = began + max(0.0, budget_s)
    outer = trio.current_effective_deadline()
    if math.isfinite(outer):
        deadline = min(deadline, outer - DEADLINE_MARGIN_S)
    log.info("waiting for coverage: %s", loading.describe())
    told, told_at = "", -math.inf
    while True:
        line = loading.describe()
        now = trio.current_time()
        if notify is not None and (line != told or now - told_at >= NOTICE_EVERY_S):
            await notify(loading)
            told, told_at = line, now
        if now >= deadline:
            raise ModelLoading(
                f"{line}; still loading after {now - began:.0f} s: try again shortly"
            )
        await trio.sleep(min(POLL_S, max(0.0, deadline - now)))
        nxt = now_loading()
        if nxt is None:
            log.info("%s: loading over after %.1f s", model_id, trio.current_time() - began)
            return
        loading = nxt


def _uncovered(start: int, end: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Blocks of [start, end) inside none of `spans`: one sweep, O(blocks + spans)."""
    delta = [0] * (end - start + 1)
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if a < b:
            delta[a - start] += 1
            delta[b - start] -= 1
    out: list[int] = []
    depth = 0
    for i in range(end - start):
        depth += delta[i]
        if depth == 0:
            out.append(start + i)
    return out


def _overlaps(span: tuple[int, int], blocks: Sequence[int]) -> bool:
    """Whether some of the sorted `blocks` lie in [span[0], span[1])."""
    i = bisect.bisect_left(blocks, span[0])
    return i < len(blocks) and blocks[i] < span[1]


def _peer_part(p: ModelPeer, self_id: str) -> str:
    who = _who(p.peer_id, self_id)
    if p.span is None:
        where = f"blocks not chosen yet on {who}"
    else:
        where = f"blocks {p.span[0]}:{p.span[1]} on {who}"
    # "loading blocks 0:4" says nothing the span does not; anything else is worth showing.
    reason = _printable(p.reason)
    if reason and (p.span is None or reason != f"loading blocks {p.span[0]}:{p.span[1]}"):
        where += f": {reason}"
    return where


def _printable(text: str) -> str:
    """A peer's own words on one line: no control characters (a terminal shows these lines),
    at most MAX_REASON_CHARS."""
    clean = "".join(c if c.isprintable() else " " for c in text).strip()
    return clean if len(clean) <= MAX_REASON_CHARS else clean[: MAX_REASON_CHARS - 1] + "…"


def _who(peer_id: str, self_id: str) -> str:
    return "this agent" if self_id and peer_id == self_id else peer_id[-6:]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
