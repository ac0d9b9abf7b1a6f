"""Continuous batching (ShardModel.forward_batch): each session's output in a batch equals the
same session run alone, and its cache ends up as if it had run alone, for every tiny family."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.batching import BatchLayout, batch_mask
from agent.model.blocks import BatchItem, PositionError, SessionCache, ShardModel
from agent.model.tiny import (
    MISTRAL_SLIDING_WINDOW,
    QWEN2_SLIDING_WINDOW,
    TINY_FAMILIES,
    make_tiny_model,
)

TOL = 1e-5
N_BLOCKS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices on a shared machine: more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-batch")
    return {f: make_tiny_model(f, root / f"tiny-{f}", n_layers=N_BLOCKS) for f in TINY_FAMILIES}


@pytest.fixture(scope="module")
def shards(tiny: dict[str, Path]) -> dict[str, ShardModel]:
    return {
        f: ShardModel.load(d, 0, N_BLOCKS, dtype=torch.float32, device="cpu")
        for f, d in tiny.items()
    }


@dataclass(frozen=True)
class Plan:
    """One session in a schedule: its steps' token counts, from tick `join` on (one a tick)."""

    batch: int
    chunks: tuple[int, ...]
    join: int = 0

    @property
    def leave(self) -> int:
        return self.join + len(self.chunks)


@dataclass
class Run:
    worst: float  # max |batched - solo| over every output
    solo: list[SessionCache]
    batched: list[SessionCache]
    batch_sizes: list[int]  # sessions per forward_batch call


def run_schedule(
    shard: ShardModel, plans: Sequence[Plan], *, seed: int, span: tuple[int, int] | None = None
) -> Run:
    """Each session run alone, then all of them on a shared clock: at each tick every session
    between join and leave takes its next step, all in one forward_batch."""
    gen = torch.Generator().manual_seed(seed)
    h = shard.hidden_size
    inputs = [[torch.randn(p.batch, q, h, generator=gen) for q in p.chunks] for p in plans]
    solo = [shard.new_cache() for _ in plans]
    ref = [
        [shard.forward(c, x, c.length, span=span) for x in xs]
        for c, xs in zip(solo, inputs, strict=True)
    ]
    batched = [shard.new_cache() for _ in plans]
    got: list[list[torch.Tensor]] = [[] for _ in plans]
    sizes = []
    for tick in range(max(p.leave for p in plans)):
        active = [i for i, p in enumerate(plans) if p.join <= tick < p.leave]
        if not active:
            continue
        items = [
            BatchItem(batched[i], inputs[i][tick - plans[i].join], batched[i].length, span)
            for i in active
        ]
        outs = shard.forward_batch(items)
        assert len(outs) == len(items)
        sizes.append(len(items))
        for i, out in zip(active, outs, strict=True):
            got[i].append(out)
    worst = 0.0
    for r_steps, g_steps in zip(ref, got, strict=True):
        assert len(r_steps) == len(g_steps)
        for r, g in zip(r_steps, g_steps, strict=True):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert torch.isfinite(g).all()
            worst = max(worst, (g - r).abs().max().item())
    return Run(worst, solo, batched, sizes)


def assert_same_caches(a: SessionCache, b: SessionCache) -> None:
    """Same length, batch, span, cache layers, tensor shapes/dtypes/layout; values within TOL."""
    assert (a.length, a.batch, a.span) == (b.length, b.batch, b.span)
    assert a.nbytes() == b.nbytes()
    assert len(a.kv.layers) == len(b.kv.layers)
    for la, lb in zip(a.kv.layers, b.kv.layers, strict=True):
        assert type(la) is type(lb)
        assert la.is_initialized == lb.is_initialized
        if not la.is_initialized:
            continue
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert x.is_contiguous() and y.is_contiguous()
            assert (x - y).abs().max().item() < TOL


def continue_solo(
    shard: ShardModel, run: Run, *, steps: int, seed: int, span: tuple[int, int] | None = None
) -> float:
    """More solo steps (a decode, then a 3-token chunk, ...) on the batched caches and on the
    purely solo ones: the worst difference of their outputs."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for s, b in zip(run.solo, run.batched, strict=True):
        assert_same_caches(s, b)
        for step in range(steps):
            assert s.batch is not None
            x = torch.randn(s.batch, 3 if step % 2 else 1, shard.hidden_size, generator=gen)
            r = shard.forward(s, x, s.length, span=span)
            g = shard.forward(b, x, b.length, span=span)
            worst = max(worst, (g - r).abs().max().item())
        assert_same_caches(s, b)
    return worst


# A prefill of 37 tokens joining decodes, a batch-2 session that leaves early, a chunked
# prefill interleaved with the others' decode steps; lengths cross both sliding windows.
SCENARIO = (
    Plan(batch=1, chunks=(12,) + (1,) * 9),
    Plan(batch=2, chunks=(5,) + (1,) * 5),
    Plan(batch=1, chunks=(37,) + (1,) * 4, join=3),
    Plan(batch=1, chunks=(4, 9, 3) + (1,) * 4, join=2),
    Plan(batch=1, chunks=(1,) * 3, join=8),  # a one-token prompt, decoding at once
)
assert 2 * max(MISTRAL_SLIDING_WINDOW, QWEN2_SLIDING_WINDOW) < 37


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_steps_match_solo_steps(family: str, shards: dict[str, ShardModel]) -> None:
    shard = shards[family]
    run = run_schedule(shard, SCENARIO, seed=1)
    assert run.worst < TOL, run.worst
    assert max(run.batch_sizes) == 4 and 1 in run.batch_sizes  # joined, left, ran alone
    assert continue_solo(shard, run, steps=4, seed=2) < TOL


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_uniform_batches_match_solo_steps(family: str, shards: dict[str, ShardModel]) -> None:
    """Sessions in lock-step (same lengths, same steps): the padding-free path."""
    plans = [Plan(batch=b, chunks=(9, 1, 1, 4, 1)) for b in (1, 2, 1)]
    run = run_schedule(shards[family], plans, seed=3)
    assert run.worst < TOL, run.worst
    assert continue_solo(shards[family], run, steps=2, seed=4) < TOL


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sub_span_of_a_partial_shard(family: str, tiny: dict[str, Path]) -> None:
    """Blocks [2, 5) of a shard holding [1, 6): the caches' layers below 2 stay empty."""
    shard = ShardModel.load(tiny[family], 1, N_BLOCKS, dtype=torch.float32, device="cpu")
    run = run_schedule(shard, SCENARIO[:4], seed=5, span=(2, 5))
    assert run.worst < TOL, run.worst
    assert continue_solo(shard, run, steps=2, seed=6, span=(2, 5)) < TOL
    for cache in run.batched:
        assert cache.span == (2, 5)
        assert {i for i, layer in enumerate(cache.kv.layers) if layer.is_initialized} == {2, 3, 4}


@st.composite
def schedules(draw: st.DrawFn) -> list[Plan]:
    plans = []
    for _ in range(draw(st.integers(2, 4))):
        prompt = draw(st.integers(1, 30))
        chunks: list[int] = []
        while sum(chunks) < prompt:
            chunks.append(min(draw(st.integers(1, 12)), prompt - sum(chunks)))
        decode = draw(st.integers(0, 4))
        plans.append(
            Plan(
                batch=draw(st.sampled_from([1, 1, 2])),
                chunks=(*chunks, *(1,) * decode),
                join=draw(st.integers(0, 3)),
            )
        )
    return plans


@pytest.mark.parametrize("family", TINY_FAMILIES)
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plans=schedules())
def test_random_schedules_match_solo(
    family: str, shards: dict[str, ShardModel], plans: list[Plan]
) -> None:
    shard = shards[family]
    run = run_schedule(shard, plans, seed=7)
    assert run.worst < TOL, (run.worst, plans)
    assert continue_solo(shard, run, steps=2, seed=8) < TOL


def test_padded_rows_stay_finite(shards: dict[str, ShardModel]) -> None:
    """Every mask row lets its query see some key, and every row of the padded batch, padding
    included, is finite after every block (a NaN there would reach real rows)."""
    layout = BatchLayout(batches=(2, 1, 1), steps=(1, 37, 3), lengths=(40, 0, 17))
    for window in (None, 4, 16):
        mask = batch_mask(layout, window, dtype=torch.float32, device=torch.device("cpu"))
        assert mask.shape == (4, 1, 37, 40 + 37)
        assert ((mask == 0).sum(-1) > 0).all()
        # Padded query rows of the decode item see only its first new key.
        assert ((mask[0, 0, 1:] == 0).nonzero()[:, 1] == 40).all()

    shard = shards["qwen2"]
    seen: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in shard.blocks
    ]
    try:
        run = run_schedule(
            shard,
            [Plan(2, (40, 1)), Plan(1, (37,), join=1), Plan(1, (17, 3))],
            seed=9,
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert run.worst < TOL
    padded = [t for t in seen if t.shape[:2] == (4, 37)]
    assert len(padded) == N_BLOCKS
    assert all(torch.isfinite(t).all() for t in seen)


def test_single_item_is_forward(shards: dict[str, ShardModel]) -> None:
    shard = shards["llama"]
    a, b = shard.new_cache(), shard.new_cache()
    x = torch.randn(2, 5, shard.hidden_size)
    (got,) = shard.forward_batch([(b, x, 0, None)])  # plain tuples work too
    assert torch.equal(got, shard.forward(a, x, 0))
    assert shard.forward_batch([]) == []
    assert_same_caches(a, b)


def _state(cache: SessionCache) -> list[Any]:
    return [
        (layer.keys.clone(), layer.values.clone()) if layer.is_initialized else None
        for layer in cache.kv.layers
    ] + [(cache.length, cache.batch, cache.span)]


def _unchanged(caches: Sequence[SessionCache], before: Sequence[list[Any]]) -> bool:
    for cache, old in zip(caches, before, strict=True):
        new = _state(cache)
        if len(new) != len(old) or new[-1] != old[-1]:
            return False
        for x, y in zip(new[:-1], old[:-1], strict=True):
            if (x is None) != (y is None):
                return False
            if x is not None and not (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])):
                return False
    return True


def test_errors_leave_every_cache_unchanged(
    shards: dict[str, ShardModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = shards["mistral"]
    h = shard.hidden_size
    caches = [shard.new_cache() for _ in range(3)]
    for cache, n in zip(caches, (20, 3, 9), strict=True):
        shard.forward(cache, torch.randn(1, n, h), 0)
    fresh = shard.new_cache()
    before = [_state(c) for c in [*caches, fresh]]

    def items(**change: Any) -> list[BatchItem]:
        out = [BatchItem(c, torch.randn(1, 1, h), c.length) for c in caches]
        out.append(BatchItem(fresh, torch.randn(1, 6, h), 0))
        index = change.pop("index", 1)
        out[index] = out[index]._replace(**change)
        return out

    with pytest.raises(PositionError, match=r"^batch item 1: step at position 2"):
        shard.forward_batch(items(position=2))
    with pytest.raises(PositionError, match="batch item 3"):
        shard.forward_batch(items(index=3, position=1))
    with pytest.raises(ValueError, match="batch item 2: batch 2 does not match"):
        shard.forward_batch(items(index=2, hidden=torch.randn(2, 1, h)))
    with pytest.raises(ValueError, match="batch item 0: hidden states must be"):
        shard.forward_batch(items(index=0, hidden=torch.randn(1, 1, h + 1)))
    with pytest.raises(ValueError, match="batch item 1: hidden states must be floating"):
        shard.forward_batch(items(hidden=torch.ones(1, 1, h, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch item 1: the session runs blocks"):
        shard.forward_batch(items(span=(0, 3)))
    with pytest.raises(ValueError, match="same blocks"):
        shard.forward_batch(items(index=3, span=(0, 3)))  # a fresh session, a valid span
    with pytest.raises(ValueError, match="more than once"):
        shard.forward_batch([*items(), BatchItem(caches[0], torch.randn(1, 1, h), 20)])
    assert _unchanged([*caches, fresh], before)

    # A failure inside the fourth block, after three blocks ran for everyone.
    original = type(shard.blocks[3]).forward

    def boom(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is shard.blocks[3]:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(type(shard.blocks[3]), "forward", boom)
        with pytest.raises(RuntimeError, match="injected"):
            shard.forward_batch(items())
    assert _unchanged([*caches, fresh], before)

    # A failure while appending to the caches, after some blocks went into some caches.
    calls = 0
    real_update = caches[2].kv.update

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected commit failure")
        return real_update(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(caches[2].kv, "update", flaky)
        with pytest.raises(RuntimeError, match="commit"):
            shard.forward_batch(items())
    assert calls == 3
    assert _unchanged([*caches, fresh], before)

    # The same batch now runs, exactly as the solo steps would.
    twins = [shard.new_cache() for _ in range(4)]
    for twin, cache in zip(twins, [*caches, fresh], strict=True):
        for i, layer in enumerate(cache.kv.layers):
            if layer.is_initialized:
                twin.kv.update(layer.keys, layer.values, i)
        twin.length, twin.batch, twin.span = cache.length, cache.batch, cache.span
    batch = items()
    outs = shard.forward_batch(batch)
    for twin, item, out in zip(twins, batch, outs, strict=True):
        ref = shard.forward(twin, item.hidden, item.position)
        assert (out - ref).abs().max().item() < TOL
        assert_same_caches(twin, item.cache)
