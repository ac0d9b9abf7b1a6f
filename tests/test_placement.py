"""Tests for agent.placement: `--blocks auto` span choice over a peer-table snapshot."""

from __future__ import annotations

import hashlib

import pytest
from factories import peer_span as span  # throughput unmeasured unless given
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.placement import blocks_that_fit, choose_span, coverage, uncovered_blocks
from agent.policy.snapshot import PeerSpan


def pick_index(self_id: str, n: int) -> int:
    return (
        int.from_bytes(hashlib.sha256(self_id.encode(errors="surrogatepass")).digest()[:8], "big")
        % n
    )


def ids_picking(n_choices: int) -> list[str]:
    """One self id for each tie index 0..n_choices-1 (found by scanning, not hard-coded)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < n_choices:
        found.setdefault(pick_index(f"peer-{i}", n_choices), f"peer-{i}")
        i += 1
    return [found[k] for k in range(n_choices)]


@pytest.mark.parametrize(
    ("budget", "block", "kv", "expected"),
    [
        (0, 100, 0, 0),
        (-5, 100, 0, 0),
        (99, 100, 0, 0),
        (100, 100, 0, 1),
        (1000, 100, 0, 10),
        (1000, 100, 25, 8),
        (10**12, 3 * 10**8, 10**8, 2500),
    ],
)
def test_blocks_that_fit(budget: int, block: int, kv: int, expected: int) -> None:
    assert blocks_that_fit(budget, block, kv) == expected


@pytest.mark.parametrize(("block", "kv"), [(0, 0), (-1, 0), (10, -1)])
def test_blocks_that_fit_rejects_bad_sizes(block: int, kv: int) -> None:
    with pytest.raises(ValueError):
        blocks_that_fit(1000, block, kv)


def test_coverage_counts_online_and_joining_only() -> None:
    spans = [
        span("a", 0, 4),
        span("b", 2, 6, state="joining"),
        span("c", 0, 8, state="draining"),
        span("d", 5, 8, state="leaving"),
        span("e", 6, 12),  # reaches past the model: clipped
    ]
    assert coverage(spans, 8) == [1, 1, 2, 2, 1, 1, 1, 1]
    assert uncovered_blocks(spans[:2], 8) == [6, 7]
    assert uncovered_blocks([], 3) == [0, 1, 2]
    assert coverage([], 0) == []


def test_choose_span_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        choose_span([], 24, 0, self_id="x")
    with pytest.raises(ValueError):
        choose_span([], 0, 4, self_id="x")


@pytest.mark.parametrize("capacity", [24, 25, 1000])
def test_capacity_at_least_model_serves_everything(capacity: int) -> None:
    others = [span("a", 0, 10, throughput=50.0)]
    assert choose_span(others, 24, capacity, self_id="me") == (0, 24)


def test_empty_mesh_picks_an_end_window_chosen_by_id_hash() -> None:
    # On an empty mesh only the two end windows keep the remaining hole in one piece.
    left_id, right_id = ids_picking(2)
    assert choose_span([], 24, 8, self_id=left_id) == (0, 8)
    assert choose_span([], 24, 8, self_id=right_id) == (16, 24)


def test_empty_mesh_different_ids_spread() -> None:
    picks = {choose_span([], 24, 8, self_id=f"node-{i}") for i in range(20)}
    assert picks == {(0, 8), (16, 24)}


def test_same_id_same_choice() -> None:
    others = [span("a", 4, 10)]
    assert choose_span(others, 24, 6, self_id="x") == choose_span(others, 24, 6, self_id="x")


@pytest.mark.parametrize(
    ("others", "n", "capacity", "expected"),
    [
        # a hole in the middle is filled exactly
        ([span("a", 0, 8), span("b", 16, 24)], 24, 8, (8, 16)),
        # a hole smaller than the capacity: the window covers all of it
        ([span("a", 0, 10), span("b", 14, 24)], 24, 8, None),
        # a hole at the start
        ([span("a", 6, 24)], 24, 6, (0, 6)),
        # a hole at the end
        ([span("a", 0, 20)], 24, 4, (20, 24)),
        # joining peers count: the only hole left is after them
        ([span("a", 0, 8), span("b", 8, 16, state="joining")], 24, 8, (16, 24)),
        # a single block hole with capacity 1
        ([span("a", 0, 5), span("b", 6, 12)], 12, 1, (5, 6)),
    ],
)
def test_fills_holes(
    others: list[PeerSpan], n: int, capacity: int, expected: tuple[int, int] | None
) -> None:
    chosen = choose_span(others, n, capacity, self_id="newcomer")
    assert chosen[1] - chosen[0] == min(capacity, n)
    if expected is not None:
        assert chosen == expected
    assert uncovered_blocks([*others, span("newcomer", *chosen)], n) == []


def test_hole_wins_over_weak_throughput() -> None:
    others = [span("a", 0, 12, throughput=1.0), span("b", 16, 24, throughput=1000.0)]
    assert choose_span(others, 24, 4, self_id="n") == (12, 16)


def test_more_uncovered_blocks_wins() -> None:
    # Holes [3, 5) and [10, 16): a 6-block window fits the bigger one entirely.
    others = [span("a", 0, 3), span("b", 5, 10), span("c", 16, 20)]
    assert choose_span(others, 20, 6, self_id="n") == (10, 16)


@pytest.mark.parametrize(
    ("others", "capacity", "inside"),
    [
        # three equal thirds, the middle one slow
        (
            [
                span("a", 0, 8, throughput=800.0),
                span("b", 8, 16, throughput=80.0),
                span("c", 16, 24, throughput=800.0),
            ],
            8,
            (8, 16),
        ),
        # throughput is shared over a span: a long span is weaker per block
        ([span("a", 0, 20, throughput=200.0), span("b", 20, 24, throughput=200.0)], 4, (0, 20)),
        # the slow end
        ([span("a", 0, 12, throughput=500.0), span("b", 12, 24, throughput=5.0)], 6, (12, 24)),
    ],
)
def test_weakest_throughput_region_when_equally_covered(
    others: list[PeerSpan], capacity: int, inside: tuple[int, int]
) -> None:
    for self_id in ("n1", "n2", "n3", "n4"):
        start, end = choose_span(others, 24, capacity, self_id=self_id)
        assert inside[0] <= start and end <= inside[1]


def test_second_replicas_go_where_there_is_one() -> None:
    others = [span("a", 0, 24), span("b", 0, 12), span("c", 12, 24)]
    # every block has 2 replicas; adding 'a' again for [0, 12) makes [12, 24) the weakest
    more = [*others, span("d", 0, 12)]
    start, end = choose_span(more, 24, 12, self_id="n")
    assert (start, end) == (12, 24)


@pytest.mark.parametrize("state", ["draining", "leaving"])
def test_going_peers_are_ignored(state: str) -> None:
    others = [span("a", 0, 8), span("b", 8, 16, state=state), span("c", 16, 24)]
    assert choose_span(others, 24, 8, self_id="n") == (8, 16)


def test_own_stale_ad_is_ignored() -> None:
    others = [span("me", 0, 8), span("a", 8, 24)]
    assert choose_span(others, 24, 8, self_id="me") == (0, 8)


def join_one_by_one(capacities: list[int], n_blocks: int, prefix: str = "agent") -> list[PeerSpan]:
    """Each agent sees the spans of those before it (as joining peers) and picks its own."""
    table: list[PeerSpan] = []
    for i, capacity in enumerate(capacities):
        self_id = f"{prefix}-{i}"
        start, end = choose_span(table, n_blocks, capacity, self_id=self_id)
        table.append(span(self_id, start, end, state="joining"))
    return table


@pytest.mark.parametrize(
    ("capacities", "n_blocks"),
    [
        ([12, 12], 24),
        ([20, 10], 24),
        ([8, 8, 8], 24),
        ([10, 4, 10], 24),
        ([11, 5, 8], 24),
        ([3, 9, 12], 24),
        ([5, 5, 5, 5, 4], 24),
        ([1, 7, 2, 9, 5], 24),
        ([6, 6, 6, 6, 6], 30),
        ([13, 2, 17, 4, 4], 40),
        ([40, 40], 32),
    ],
)
def test_agents_joining_one_by_one_cover_the_model(capacities: list[int], n_blocks: int) -> None:
    assert sum(capacities) >= n_blocks
    for prefix in ("agent", "host", "gpu-box"):
        table = join_one_by_one(capacities, n_blocks, prefix)
        assert uncovered_blocks(table, n_blocks) == [], table


def test_agents_beyond_full_coverage_add_second_replicas() -> None:
    table = join_one_by_one([8, 8, 8, 8, 8, 8], 24)
    assert coverage(table, 24) == [2] * 24


@settings(max_examples=150, deadline=None)
@given(
    n_blocks=st.integers(1, 40),
    capacities=st.lists(st.integers(1, 45), min_size=1, max_size=6),
    prefix=st.text(min_size=1, max_size=8),
)
def test_joining_one_by_one_covers_whenever_capacity_suffices(
    n_blocks: int, capacities: list[int], prefix: str
) -> None:
    table = join_one_by_one(capacities, n_blocks, prefix)
    if sum(capacities) >= n_blocks:
        assert uncovered_blocks(table, n_blocks) == []
    else:
        # not enough capacity: no block was served twice while another had none
        assert max(coverage(table, n_blocks)) == 1


@st.composite
def peer_spans(draw: st.DrawFn) -> PeerSpan:
    start = draw(st.integers(0, 30))
    return PeerSpan(
        peer_id=draw(st.sampled_from(["a", "b", "c", "d", "e", "me"])),
        start=start,
        end=draw(st.integers(start + 1, 40)),
        throughput=draw(st.floats(0, 1e4)),
        state=draw(st.sampled_from(["joining", "online", "draining", "leaving"])),
        sessions=draw(st.integers(0, 5)),
        kv_free_tokens=draw(st.integers(0, 100)),
    )


@settings(max_examples=200, deadline=None)
@given(
    others=st.lists(peer_spans(), max_size=8),
    n_blocks=st.integers(1, 32),
    capacity=st.integers(1, 40),
    self_id=st.text(min_size=1, max_size=10),
)
def test_choose_span_is_a_valid_window(
    others: list[PeerSpan], n_blocks: int, capacity: int, self_id: str
) -> None:
    start, end = choose_span(others, n_blocks, capacity, self_id=self_id)
    assert 0 <= start < end <= n_blocks
    assert end - start == min(capacity, n_blocks)
    # never passes over a least-covered block it could have taken instead
    before = coverage([s for s in others if s.peer_id != self_id], n_blocks)
    assert min(before[start:end]) == min(before)


# --- the sweep over span endpoints (issue "Valid signatures, hostile values") -------------------


def _naive_counts(spans: list[PeerSpan], n_blocks: int, states: frozenset[str]) -> list[int]:
    return [
        sum(1 for s in spans if s.state in states and s.start <= b < s.end) for b in range(n_blocks)
    ]


@settings(max_examples=300, deadline=None)
@given(
    spans=st.lists(peer_spans(), max_size=10),
    n_blocks=st.integers(0, 45),
    routable=st.booleans(),
)
def test_coverage_runs_match_a_per_block_count(
    spans: list[PeerSpan], n_blocks: int, routable: bool
) -> None:
    import itertools

    from agent.policy.placement import coverage_runs
    from agent.policy.snapshot import ROUTABLE_STATES, SERVING_STATES

    states = ROUTABLE_STATES if routable else SERVING_STATES
    runs = coverage_runs(spans, n_blocks, states)
    expanded = [count for start, end, count in runs for _ in range(start, end)]
    assert expanded == _naive_counts(spans, n_blocks, states) == coverage(spans, n_blocks, states)
    # Runs tile [0, n_blocks) in order, neighbours differ.
    assert [r[0] for r in runs[1:]] == [r[1] for r in runs[:-1]]
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))


@settings(max_examples=300, deadline=None)
@given(spans=st.lists(peer_spans(), max_size=10), n_blocks=st.integers(1, 45))
def test_block_throughput_sweep_is_exactly_fsum(spans: list[PeerSpan], n_blocks: int) -> None:
    import math

    from agent.policy.placement import _block_throughput, _window_sums

    got = _block_throughput(spans, n_blocks)
    counted = [s for s in spans if s.state in ("online", "joining") and s.start < n_blocks]
    want = [
        math.fsum(s.throughput / s.length for s in counted if s.start <= b < s.end)
        for b in range(n_blocks)
    ]
    assert got == want  # bit for bit: ties stay ties
    for length in {1, n_blocks, max(1, n_blocks // 3)}:
        sums = _window_sums(got, length)
        assert sums == [math.fsum(got[i : i + length]) for i in range(n_blocks - length + 1)]


def test_hostile_spans_cost_nothing_per_claimed_block() -> None:
    """Spans claiming far more blocks than the model has count for the blocks that exist,
    and placement over thousands of them stays quick (it ran O(peers * blocks) before)."""
    import time

    others = [span(f"h{i}", 0, 10**9, throughput=1.0) for i in range(3000)]
    t0 = time.perf_counter()
    assert coverage(others, 100) == [3000] * 100
    choose_span(others, 100, 10, self_id="me")
    assert time.perf_counter() - t0 < 3.0
