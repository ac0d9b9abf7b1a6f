"""The client's route through the mesh: which peer runs which blocks, as a pure function.

A route is a chain of hops whose spans are contiguous and together cover [start, end). It is the
cheapest path over block boundaries, where a hop via peer p from boundary a to b costs the expected
milliseconds per token it adds:

    rtt(p) + (b - a) * 1000 / throughput(p) * (1 + LOAD_FACTOR * p.sessions)
           + KV_FULL_PENALTY_MS if p has no free KV cache

Every edge goes forward (a < b), so the graph is a DAG and one pass over the boundaries in order
finds the shortest path (Dijkstra would give the same answer with a heap it does not need).
The same function serves the whole model (0, n_blocks) and failover: re-routing only a lost span
[a, b) while avoiding the peer that failed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from agent.policy.snapshot import ONLINE, PeerSpan

# Used for a peer that has not measured its throughput, when no usable peer has either.
DEFAULT_THROUGHPUT = 100.0
# Concurrent sessions share a peer's compute; batching recovers part of it, hence under 1.
LOAD_FACTOR = 0.5
# A peer without free KV cache would have to refuse or evict: use it only when nothing else can.
KV_FULL_PENALTY_MS = 10_000.0
# Costs this close count as tied, so float rounding does not decide between 1 and 2 hops.
_REL_TIE = 1e-9


@dataclass(frozen=True)
class Hop:
    """Run blocks [start, end) on peer_id."""

    peer_id: str
    start: int
    end: int


class NoRoute(Exception):
    """No usable peer serves some blocks of the requested range."""

    def __init__(self, uncovered: list[int]) -> None:
        self.uncovered = list(uncovered)
        super().__init__(f"no usable peer serves {describe_blocks(self.uncovered)}")


def describe_blocks(blocks: list[int]) -> str:
    """'block 3', 'blocks 3-5', 'blocks 3-5, 9': inclusive ranges of block indices."""
    ranges: list[str] = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        ranges.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    noun = "block" if len(blocks) == 1 else "blocks"
    return f"{noun} {', '.join(ranges)}"


def _usable(
    peers: Sequence[PeerSpan],
    start: int,
    end: int,
    avoid: Collection[str],
    max_sessions: int | None,
) -> list[PeerSpan]:
    avoided = set(avoid)
    usable = [
        p
        for p in peers
        if p.state == ONLINE
        and p.peer_id not in avoided
        and (max_sessions is None or p.sessions < max_sessions)
        and p.start < end
        and p.end > start
    ]
    # Sorted so that the route does not depend on the order of the peer table.
    return sorted(usable, key=lambda p: (p.peer_id, p.start, p.end))


def _rtt(peer_id: str, rtt_ms: Mapping[str, float], default_rtt_ms: float) -> float:
    value = rtt_ms.get(peer_id, default_rtt_ms)
    if not math.isfinite(value):
        value = default_rtt_ms
    return max(0.0, value)


def find_route(
    peers: Sequence[PeerSpan],
    start: int,
    end: int,
    *,
    rtt_ms: Mapping[str, float],
    avoid: Collection[str] = (),
    default_rtt_ms: float = 50.0,
    max_sessions: int | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end) exactly.

    Only online peers are used; peers in `avoid` (recently failed) and, when `max_sessions` is
    given, peers with that many sessions or more are left out. A hop may use part of a peer's
    span. A peer without a measured throughput is assumed as fast as the median measured usable
    peer. Among routes of equal cost the one with fewer hops wins. start == end gives [].

    Raises NoRoute listing the blocks of [start, end) that no usable peer serves.
    """
    if start < 0 or end < start:
        raise ValueError(f"bad block range [{start}, {end})")
    if start == end:
        return []
    usable = _usable(peers, start, end, avoid, max_sessions)

    uncovered = [
        block for block in range(start, end) if not any(p.start <= block < p.end for p in usable)
    ]
    if uncovered:
        raise NoRoute(uncovered)

    measured = [p.throughput for p in usable if p.throughput > 0]
    unmeasured_throughput = statistics.median(measured) if measured else DEFAULT_THROUGHPUT

    # best[i]: (cost ms, hops) of the cheapest known route from `start` to boundary start+i.
    size = end - start
    best: list[tuple[float, int] | None] = [None] * (size + 1)
    via: list[tuple[int, str] | None] = [None] * (size + 1)
    best[0] = (0.0, 0)
    for a in range(start, end):
        reached = best[a - start]
        if reached is None:
            continue
        cost_a, hops_a = reached
        for p in usable:
            if not p.start <= a < p.end:
                continue
            throughput = p.throughput if p.throughput > 0 else unmeasured_throughput
            per_block_ms = 1000.0 / throughput * (1.0 + LOAD_FACTOR * p.sessions)
            fixed_ms = _rtt(p.peer_id, rtt_ms, default_rtt_ms)
            if p.kv_free_tokens == 0:
                fixed_ms += KV_FULL_PENALTY_MS
            for b in range(a + 1, min(p.end, end) + 1):
                candidate = (cost_a + fixed_ms + (b - a) * per_block_ms, hops_a + 1)
                if _better(candidate, best[b - start]):
                    best[b - start] = candidate
                    via[b - start] = (a, p.peer_id)

    route: list[Hop] = []
    b = end
    while b > start:
        step = via[b - start]
        assert step is not None  # every block is covered, so every boundary is reachable
        a, peer_id = step
        route.append(Hop(peer_id, a, b))
        b = a
    route.reverse()
    return route


def _better(candidate: tuple[float, int], current: tuple[float, int] | None) -> bool:
    if current is None:
        return True
    cost, hops = candidate
    current_cost, current_hops = current
    if abs(cost - current_cost) <= _REL_TIE * max(1.0, abs(current_cost)):
        return hops < current_hops
    return cost < current_cost
