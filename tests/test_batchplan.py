"""The continuous-batching planner (agent.serve.batchplan): pure, no torch."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.serve.batchplan import BatchBounds, Slice, Waiting, plan_batch

BOUNDS = BatchBounds(max_rows=8, max_tokens=64, prefill_chunk=16)
SPAN = (0, 4)


def w(key: int, remaining: int, rows: int = 1, span: tuple[int, int] = SPAN) -> Waiting:
    return Waiting(key=key, span=span, rows=rows, remaining=remaining)


def test_nothing_waiting_plans_nothing() -> None:
    assert plan_batch([], BOUNDS) == []


def test_decodes_go_together() -> None:
    assert plan_batch([w(i, 1) for i in range(5)], BOUNDS) == [Slice(i, 1) for i in range(5)]


def test_rows_bound_leaves_the_rest_for_later() -> None:
    plan = plan_batch([w(i, 1, rows=3) for i in range(5)], BOUNDS)
    assert [s.key for s in plan] == [0, 1]  # 3 + 3 rows; a third would make 9 > 8


def test_a_long_prefill_is_chunked_and_decodes_still_run() -> None:
    # The prefill is the oldest: it runs its first chunk, and every decode comes along.
    plan = plan_batch([w(0, 100), w(1, 1), w(2, 1)], BOUNDS)
    assert plan == [Slice(0, 16), Slice(1, 1), Slice(2, 1)]


def test_decodes_before_younger_prefills() -> None:
    # Oldest decode, then a prefill and a decode: the decode is not pushed out by the prefill.
    bounds = BatchBounds(max_rows=8, max_tokens=20, prefill_chunk=16)
    plan = plan_batch([w(0, 1), w(1, 100), w(2, 1)], bounds)
    assert plan == [Slice(0, 1), Slice(2, 1), Slice(1, 16)]
    # Less token room: the prefill's chunk shrinks to what is left.
    tight = BatchBounds(max_rows=8, max_tokens=10, prefill_chunk=16)
    assert plan_batch([w(0, 1), w(1, 100), w(2, 1)], tight) == [
        Slice(0, 1),
        Slice(2, 1),
        Slice(1, 8),
    ]


def test_other_spans_wait() -> None:
    plan = plan_batch([w(0, 1), w(1, 1, span=(0, 2)), w(2, 1)], BOUNDS)
    assert [s.key for s in plan] == [0, 2]


def test_the_oldest_always_runs_even_over_the_bounds() -> None:
    big = BatchBounds(max_rows=2, max_tokens=4, prefill_chunk=16)
    assert plan_batch([w(0, 1, rows=5)], big) == [Slice(0, 1)]
    assert plan_batch([w(0, 10, rows=2)], big) == [Slice(0, 2)]


@given(
    st.lists(
        st.tuples(
            st.integers(1, 300), st.integers(1, 4), st.sampled_from([(0, 4), (0, 2), (2, 4)])
        ),
        min_size=1,
        max_size=20,
    ),
    st.integers(1, 16),
    st.integers(1, 256),
    st.integers(1, 64),
)
def test_plans_keep_the_bounds(
    jobs: list[tuple[int, int, tuple[int, int]]], max_rows: int, max_tokens: int, chunk: int
) -> None:
    waiting = [w(i, rem, rows, span) for i, (rem, rows, span) in enumerate(jobs)]
    bounds = BatchBounds(max_rows=max_rows, max_tokens=max_tokens, prefill_chunk=chunk)
    plan = plan_batch(waiting, bounds)
    by_key = {x.key: x for x in waiting}
    assert plan and plan[0].key == 0  # the oldest always runs: nothing starves
    assert len({s.key for s in plan}) == len(plan)
    for s in plan:
        job = by_key[s.key]
        assert job.span == waiting[0].span
        assert 1 <= s.tokens <= job.remaining
        assert s.tokens <= chunk  # no step runs more than a chunk in one forward
    rest = plan[1:]
    if rest:  # beyond the oldest, the bounds hold for the whole forward
        assert sum(by_key[s.key].rows for s in plan) <= max(max_rows, by_key[0].rows)
        total = sum(by_key[s.key].rows * s.tokens for s in plan)
        assert total <= max(max_tokens, by_key[0].rows * plan[0].tokens)


def test_gather_waits_only_for_active_sessions_and_only_so_long() -> None:
    from agent.serve.batchplan import gather_wait

    assert gather_wait(waiting=1, active=1, waited_s=0.0, max_wait_s=0.05) == 0.0  # alone
    assert gather_wait(waiting=3, active=3, waited_s=0.0, max_wait_s=0.05) == 0.0  # all here
    assert gather_wait(waiting=2, active=8, waited_s=0.0, max_wait_s=0.05) == 0.05
    assert gather_wait(waiting=2, active=8, waited_s=0.03, max_wait_s=0.05) == 0.05 - 0.03
    assert gather_wait(waiting=2, active=8, waited_s=0.06, max_wait_s=0.05) == 0.0
    assert gather_wait(waiting=2, active=8, waited_s=0.0, max_wait_s=0.0) == 0.0  # off
