"""Tests for agent.routing: the client's route over a peer-table snapshot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from itertools import pairwise, product

import pytest
from factories import peer_span
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.routing import (
    DEFAULT_THROUGHPUT,
    KV_FULL_PENALTY_MS,
    LOAD_FACTOR,
    Hop,
    NoRoute,
    find_route,
)
from agent.policy.snapshot import PeerSpan

# Peers here have measured their throughput unless a test says otherwise.
peer = partial(peer_span, throughput=1000.0)


def route_of(hops: list[Hop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in hops]


def test_single_peer_covering_all() -> None:
    hops = find_route([peer("a", 0, 12)], 0, 12, rtt_ms={"a": 5.0})
    assert hops == [Hop("a", 0, 12)]


def test_chain_of_peers() -> None:
    peers = [peer("c", 8, 12), peer("a", 0, 4), peer("b", 4, 8)]
    hops = find_route(peers, 0, 12, rtt_ms={})
    assert route_of(hops) == [("a", 0, 4), ("b", 4, 8), ("c", 8, 12)]


@pytest.mark.parametrize(
    ("peers", "rtt", "expected"),
    [
        # two full replicas: the lower RTT wins
        (
            [peer("far", 0, 8), peer("near", 0, 8)],
            {"far": 80.0, "near": 2.0},
            [("near", 0, 8)],
        ),
        # two full replicas, same RTT: the faster one wins
        (
            [peer("slow", 0, 8, throughput=100.0), peer("fast", 0, 8, throughput=5000.0)],
            {"slow": 5.0, "fast": 5.0},
            [("fast", 0, 8)],
        ),
        # one slow peer serving all vs two fast halves: the halves save more than one extra RTT
        (
            [
                peer("whole", 0, 8, throughput=80.0),
                peer("left", 0, 4, throughput=8000.0),
                peer("right", 4, 8, throughput=8000.0),
            ],
            {"whole": 10.0, "left": 10.0, "right": 10.0},
            [("left", 0, 4), ("right", 4, 8)],
        ),
        # the same, but RTTs are large: one hop wins
        (
            [
                peer("whole", 0, 8, throughput=800.0),
                peer("left", 0, 4, throughput=8000.0),
                peer("right", 4, 8, throughput=8000.0),
            ],
            {"whole": 100.0, "left": 100.0, "right": 100.0},
            [("whole", 0, 8)],
        ),
        # overlapping spans: the faster peer takes all it can, the other only the rest of its span
        (
            [peer("a", 0, 6, throughput=2000.0), peer("b", 4, 10), peer("c", 0, 10)],
            {"a": 1.0, "b": 1.0, "c": 50.0},
            [("a", 0, 6), ("b", 6, 10)],
        ),
    ],
)
def test_overlapping_spans_pick_the_cheapest(
    peers: list[PeerSpan], rtt: dict[str, float], expected: list[tuple[str, int, int]]
) -> None:
    end = expected[-1][2]
    assert route_of(find_route(peers, 0, end, rtt_ms=rtt)) == expected


def test_partial_use_of_a_span() -> None:
    # b serves 0..12 but only 6..9 is needed from it
    peers = [peer("a", 0, 6), peer("b", 0, 12), peer("c", 9, 12)]
    rtt = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert route_of(find_route(peers, 3, 8, rtt_ms=rtt)) == [("b", 3, 8)]
    assert route_of(find_route([peer("b", 0, 12)], 5, 7, rtt_ms=rtt)) == [("b", 5, 7)]


def test_fewer_hops_when_costs_tie() -> None:
    # with zero RTT splitting a span in two costs the same: the one-hop route wins
    peers = [peer("a", 0, 8, throughput=300.0), peer("b", 0, 8, throughput=300.0)]
    hops = find_route(peers, 0, 8, rtt_ms={"a": 0.0, "b": 0.0})
    assert len(hops) == 1


def test_result_does_not_depend_on_table_order() -> None:
    peers = [peer("x", 0, 5), peer("y", 0, 5), peer("z", 5, 10), peer("w", 5, 10)]
    first = find_route(peers, 0, 10, rtt_ms={})
    assert find_route(list(reversed(peers)), 0, 10, rtt_ms={}) == first


def test_missing_rtt_uses_the_default() -> None:
    peers = [peer("measured", 0, 4), peer("unknown", 0, 4)]
    assert find_route(peers, 0, 4, rtt_ms={"measured": 30.0})[0].peer_id == "measured"
    hops = find_route(peers, 0, 4, rtt_ms={"measured": 30.0}, default_rtt_ms=1.0)
    assert hops[0].peer_id == "unknown"


def test_unmeasured_throughput_is_taken_as_typical() -> None:
    # an unmeasured peer is assumed as fast as the median measured one, not infinitely slow
    peers = [peer("new", 0, 8, throughput=0.0), peer("old", 0, 8, throughput=1000.0)]
    assert find_route(peers, 0, 8, rtt_ms={"new": 1.0, "old": 20.0})[0].peer_id == "new"
    # and when nobody has measured, RTT decides
    peers = [peer("p", 0, 8, throughput=0.0), peer("q", 0, 8, throughput=0.0)]
    assert find_route(peers, 0, 8, rtt_ms={"p": 9.0, "q": 3.0})[0].peer_id == "q"


def test_avoid_set_forces_the_replica() -> None:
    peers = [peer("a", 0, 8), peer("b", 0, 8)]
    rtt = {"a": 1.0, "b": 40.0}
    assert find_route(peers, 0, 8, rtt_ms=rtt)[0].peer_id == "a"
    assert find_route(peers, 0, 8, rtt_ms=rtt, avoid={"a"})[0].peer_id == "b"


@pytest.mark.parametrize("state", ["draining", "leaving", "joining"])
def test_peers_not_online_are_not_used(state: str) -> None:
    peers = [peer("busy", 0, 8, state=state), peer("ok", 0, 8)]
    hops = find_route(peers, 0, 8, rtt_ms={"busy": 0.1, "ok": 90.0})
    assert route_of(hops) == [("ok", 0, 8)]
    with pytest.raises(NoRoute):
        find_route(peers[:1], 0, 8, rtt_ms={})


def test_load_penalty_prefers_an_idle_replica() -> None:
    peers = [peer("busy", 0, 8, sessions=12), peer("idle", 0, 8)]
    assert find_route(peers, 0, 8, rtt_ms={"busy": 10.0, "idle": 10.0})[0].peer_id == "idle"


def test_max_sessions_excludes_full_peers() -> None:
    peers = [peer("full", 0, 8, sessions=4), peer("other", 0, 8, sessions=1)]
    rtt = {"full": 1.0, "other": 300.0}
    assert find_route(peers, 0, 8, rtt_ms=rtt)[0].peer_id == "full"
    assert find_route(peers, 0, 8, rtt_ms=rtt, max_sessions=4)[0].peer_id == "other"


def test_kv_full_peer_is_penalised_not_excluded() -> None:
    peers = [peer("full", 0, 8, kv_free_tokens=0), peer("other", 0, 8)]
    rtt = {"full": 1.0, "other": 300.0}
    assert find_route(peers, 0, 8, rtt_ms=rtt)[0].peer_id == "other"
    # the only peer for the span: still used
    assert find_route(peers[:1], 0, 8, rtt_ms=rtt)[0].peer_id == "full"
    assert KV_FULL_PENALTY_MS > 1000


@pytest.mark.parametrize(
    ("peers", "start", "end", "uncovered", "message"),
    [
        ([peer("a", 0, 3), peer("b", 6, 10)], 0, 10, [3, 4, 5], "blocks 3-5"),
        ([peer("a", 0, 3), peer("b", 4, 10)], 0, 10, [3], "block 3"),
        ([peer("a", 1, 4), peer("b", 5, 8)], 0, 10, [0, 4, 8, 9], "blocks 0, 4, 8-9"),
        ([], 2, 5, [2, 3, 4], "blocks 2-4"),
        # a draining peer does not fill the hole
        ([peer("a", 0, 3), peer("b", 3, 6, state="draining")], 0, 6, [3, 4, 5], "blocks 3-5"),
    ],
)
def test_hole_raises_no_route(
    peers: list[PeerSpan], start: int, end: int, uncovered: list[int], message: str
) -> None:
    with pytest.raises(NoRoute) as caught:
        find_route(peers, start, end, rtt_ms={})
    assert caught.value.uncovered == uncovered
    assert str(caught.value) == f"no usable peer serves {message}"


def test_avoiding_the_only_peer_raises_no_route() -> None:
    with pytest.raises(NoRoute) as caught:
        find_route([peer("a", 0, 4), peer("b", 4, 8)], 0, 8, rtt_ms={}, avoid=["b"])
    assert caught.value.uncovered == [4, 5, 6, 7]


def test_reroute_of_a_lost_sub_span() -> None:
    peers = [peer("a", 0, 4), peer("b", 4, 8), peer("c", 8, 12), peer("b2", 3, 9)]
    rtt = {"a": 1.0, "b": 1.0, "c": 1.0, "b2": 30.0}
    full = find_route(peers, 0, 12, rtt_ms=rtt)
    assert route_of(full) == [("a", 0, 4), ("b", 4, 8), ("c", 8, 12)]
    # b fails: only [4, 8) is re-routed, to the replica that covers it
    assert route_of(find_route(peers, 4, 8, rtt_ms=rtt, avoid={"b"})) == [("b2", 4, 8)]


def test_empty_range_and_bad_range() -> None:
    assert find_route([], 3, 3, rtt_ms={}) == []
    with pytest.raises(ValueError):
        find_route([peer("a", 0, 4)], 3, 2, rtt_ms={})
    with pytest.raises(ValueError):
        find_route([peer("a", 0, 4)], -1, 2, rtt_ms={})


def test_snapshot_rejects_impossible_rows() -> None:
    with pytest.raises(ValueError):
        peer("a", 4, 4)
    with pytest.raises(ValueError):
        peer("a", 0, 4, state="sleeping")
    with pytest.raises(ValueError):
        peer("a", 0, 4, throughput=float("nan"))


def test_two_hundred_blocks_stay_fast() -> None:
    peers = [peer(f"p{i}", s, min(s + 20, 200)) for i, s in enumerate(range(0, 200, 7))]
    hops = find_route(peers, 0, 200, rtt_ms={})
    assert hops[0].start == 0 and hops[-1].end == 200


@st.composite
def meshes(draw: st.DrawFn) -> tuple[list[PeerSpan], int, int]:
    n_blocks = draw(st.integers(1, 24))
    peers = []
    for i in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, n_blocks - 1))
        peers.append(
            PeerSpan(
                peer_id=f"p{i}",
                start=start,
                end=draw(st.integers(start + 1, n_blocks)),
                throughput=draw(st.sampled_from([0.0, 10.0, 300.0, 5000.0])),
                state=draw(st.sampled_from(["online", "online", "online", "draining", "joining"])),
                sessions=draw(st.integers(0, 4)),
                kv_free_tokens=draw(st.sampled_from([0, 512])),
            )
        )
    start = draw(st.integers(0, n_blocks - 1))
    end = draw(st.integers(start + 1, n_blocks))
    return peers, start, end


@settings(max_examples=300, deadline=None)
@given(
    mesh=meshes(),
    rtts=st.lists(st.floats(0, 200), min_size=8, max_size=8),
    avoid=st.sets(st.sampled_from([f"p{i}" for i in range(8)]), max_size=3),
)
def test_any_route_is_contiguous_and_uses_allowed_peers(
    mesh: tuple[list[PeerSpan], int, int], rtts: list[float], avoid: set[str]
) -> None:
    peers, start, end = mesh
    rtt_ms = {f"p{i}": rtt for i, rtt in enumerate(rtts)}
    allowed = {p.peer_id: p for p in peers if p.state == "online" and p.peer_id not in avoid}
    coverable = all(any(p.start <= b < p.end for p in allowed.values()) for b in range(start, end))
    try:
        hops = find_route(peers, start, end, rtt_ms=rtt_ms, avoid=avoid)
    except NoRoute as no_route:
        assert not coverable
        assert no_route.uncovered
        for b in no_route.uncovered:
            assert start <= b < end
            assert not any(p.start <= b < p.end for p in allowed.values())
        return
    assert coverable
    assert hops[0].start == start and hops[-1].end == end
    for first, second in pairwise(hops):
        assert first.end == second.start
        assert first.peer_id != second.peer_id  # a split of one peer's span is never cheaper
    for hop in hops:
        assert hop.start < hop.end
        p = allowed[hop.peer_id]
        assert p.start <= hop.start and hop.end <= p.end


def hop_cost_model(
    peers: list[PeerSpan], start: int, end: int, rtt_ms: dict[str, float]
) -> tuple[list[PeerSpan], Callable[[PeerSpan, int, int], float]]:
    """The usable peers and the per-hop cost, written out from routing's documented model."""
    usable = [p for p in peers if p.state == "online" and p.start < end and p.end > start]
    measured = [p.throughput for p in usable if p.throughput > 0]
    typical = statistics.median(measured) if measured else DEFAULT_THROUGHPUT

    def hop_ms(p: PeerSpan, a: int, b: int) -> float:
        throughput = p.throughput or typical
        cost = rtt_ms[p.peer_id] + (b - a) * 1000.0 / throughput * (1 + LOAD_FACTOR * p.sessions)
        return cost + (KV_FULL_PENALTY_MS if p.kv_free_tokens == 0 else 0.0)

    return usable, hop_ms


def brute_force_cost(
    peers: list[PeerSpan], start: int, end: int, rtt_ms: dict[str, float]
) -> float:
    """Cheapest cost over every way to cut [start, end) into segments."""
    usable, hop_ms = hop_cost_model(peers, start, end, rtt_ms)
    best = float("inf")
    for cuts in product([False, True], repeat=end - start - 1):
        bounds = [start, *(start + 1 + i for i, cut in enumerate(cuts) if cut), end]
        total = 0.0
        for a, b in pairwise(bounds):
            serving = [hop_ms(p, a, b) for p in usable if p.start <= a and b <= p.end]
            total += min(serving, default=float("inf"))
        best = min(best, total)
    return best


@settings(max_examples=200, deadline=None)
@given(mesh=meshes(), rtts=st.lists(st.floats(0, 200), min_size=8, max_size=8))
def test_route_is_the_cheapest(mesh: tuple[list[PeerSpan], int, int], rtts: list[float]) -> None:
    peers, start, end = mesh
    end = min(end, start + 10)  # keeps the brute force small
    rtt_ms = {f"p{i}": rtt for i, rtt in enumerate(rtts)}
    expected = brute_force_cost(peers, start, end, rtt_ms)
    try:
        hops = find_route(peers, start, end, rtt_ms=rtt_ms)
    except NoRoute:
        assert expected == float("inf")
        return
    _, hop_ms = hop_cost_model(peers, start, end, rtt_ms)
    by_id = {p.peer_id: p for p in peers}
    got = sum(hop_ms(by_id[h.peer_id], h.start, h.end) for h in hops)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
