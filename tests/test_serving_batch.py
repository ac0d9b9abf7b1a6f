"""Continuous batching through the serving part (agent.serve.serving + batcher), in process:
concurrent sessions' steps share forwards and each session's outputs equal the same session
run alone; long prefills run in chunks between decodes; KV memory is reserved a page at a
time and a step that needs a page that does not fit is refused, not crashed."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio

from agent.config import LimitsConfig, ServeConfig
from agent.model.blocks import ShardModel
from agent.model.tiny import make_tiny_model
from agent.model.wire import from_frame, to_frame
from agent.serve.admission import RequestRejected
from agent.serve.serving import Serving
from protocol import OpenSession, Step

HIDDEN = 64
SPAN = (0, 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("batch") / "tiny-llama", n_layers=4)


@asynccontextmanager
async def _serving(model_dir: Path, **limits: object) -> AsyncIterator[Serving]:
    lim = dataclasses.replace(LimitsConfig(), **limits)  # type: ignore[arg-type]
    serving = Serving.prepare(ServeConfig(model=model_dir, blocks="0:4", limits=lim))
    serving.shard = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")
    serving.choose_span(SPAN)
    budget_tokens = lim.kv_budget_tokens or 4096
    serving.kv_budget_bytes = budget_tokens * serving.shard.kv_bytes_per_token()
    serving.peer_limits.set_kv_budget(serving.kv_budget_bytes, serving.shard.kv_bytes_per_token())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.batcher.loop)
        yield serving
        nursery.cancel_scope.cancel()


def _open(serving: Serving, peer: str, max_length: int, batch: int = 1):  # type: ignore[no-untyped-def]
    msg = OpenSession(serving.model_id, *SPAN, max_length, "float32", batch)
    return serving.open_session(peer, msg)


async def _step(serving: Serving, session, x: torch.Tensor, pos: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    result = await serving.run_step(session, Step(step=pos, position=pos, hidden=to_frame(x)))
    return from_frame(result.hidden, device=torch.device("cpu"))


async def test_concurrent_sessions_batch_and_stay_exact(model_dir: Path) -> None:
    """Eight sessions of different prompt lengths (one with batch 2), prefill then decode,
    all at once; some join late and some leave early. Each equals its solo run."""
    solo = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(1)
    plans = []  # (prompt length, decode steps, batch, start delay in steps)
    for i in range(8):
        plans.append((3 + 5 * i, 6 + (i % 3) * 3, 2 if i == 5 else 1, i % 4))
    inputs = [
        [torch.randn(b, p, HIDDEN, generator=gen)]
        + [torch.randn(b, 1, HIDDEN, generator=gen) for _ in range(d)]
        for p, d, b, _ in plans
    ]
    want = []
    for xs in inputs:
        cache, pos, outs = solo.new_cache(), 0, []
        for x in xs:
            outs.append(solo.forward(cache, x, pos))
            pos += x.shape[1]
        want.append(outs)
    got: list[list[torch.Tensor]] = [[] for _ in plans]
    async with _serving(model_dir) as serving:

        async def run(i: int) -> None:
            _, _, b, delay = plans[i]
            for _ in range(delay * 3):
                await trio.sleep(0)
            session = _open(serving, f"peer{i}", 128, b)
            pos = 0
            for x in inputs[i]:
                got[i].append(await _step(serving, session, x, pos))
                pos += x.shape[1]
            serving.close_session(session)

        async with trio.open_nursery() as nursery:
            for i in range(len(plans)):
                nursery.start_soon(run, i)
        steps = sum(len(xs) for xs in inputs)
        assert serving.batcher.forwards < steps  # steps did share forwards
        assert serving.batcher.rows_total >= steps
        status = serving.status()["batch"]
        assert status["mean_rows"] > 1.0, status
    for i, (outs, ref) in enumerate(zip(got, want, strict=True)):
        for g, r in zip(outs, ref, strict=True):
            assert g.shape == r.shape
            assert (g - r).abs().max().item() < 1e-5, i


async def test_a_long_prefill_runs_in_chunks_between_decodes(model_dir: Path) -> None:
    solo = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(2)
    long_prompt = torch.randn(1, 45, HIDDEN, generator=gen)
    short = [torch.randn(1, 4, HIDDEN, generator=gen)] + [
        torch.randn(1, 1, HIDDEN, generator=gen) for _ in range(8)
    ]
    ref_cache = solo.new_cache()
    want_long = solo.forward(ref_cache, long_prompt, 0)
    want_next = solo.forward(ref_cache, short[1], 45)
    cache2, pos, want_short = solo.new_cache(), 0, []
    for x in short:
        want_short.append(solo.forward(cache2, x, pos))
        pos += x.shape[1]
    async with _serving(model_dir, batch_prefill_chunk=8, max_batch_tokens=16) as serving:
        decoder = _open(serving, "a", 64)
        prefiller = _open(serving, "b", 64)
        got_short: list[torch.Tensor] = []
        decode_done_at: list[int] = []
        got_long: list[torch.Tensor] = []

        async def decode() -> None:
            p = 0
            for x in short:
                got_short.append(await _step(serving, decoder, x, p))
                decode_done_at.append(serving.batcher.forwards)
                p += x.shape[1]

        async def prefill() -> None:
            await trio.sleep(0)
            got_long.append(await _step(serving, prefiller, long_prompt, 0))
            got_long.append(await _step(serving, prefiller, short[1], 45))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(decode)
            nursery.start_soon(prefill)
        # 45 tokens in chunks of at most 8: at least 6 forwards for the prefill alone, and
        # the decoder's steps finished in between (not all after the prefill).
        assert serving.batcher.forwards >= 6
        assert min(decode_done_at) < serving.batcher.forwards - 2
    assert (got_long[0] - want_long).abs().max().item() < 1e-5
    assert (got_long[1] - want_next).abs().max().item() < 1e-5
    for g, r in zip(got_short, want_short, strict=True):
        assert (g - r).abs().max().item() < 1e-5


async def test_kv_memory_is_reserved_a_page_at_a_time(model_dir: Path) -> None:
    """Budget 64 tokens, pages of 16: five sessions of max_length 200 open (a page each),
    then one grows until the budget is gone and its next step is refused with kv_budget;
    the others still step."""
    async with _serving(
        model_dir, kv_budget_tokens=64, kv_page_tokens=16, per_peer_kv_tokens=64
    ) as serving:
        sessions = [_open(serving, "p", 200) for _ in range(3)]
        assert serving.kv_free_tokens() == 64 - 3 * 16
        x = torch.zeros(1, 1, HIDDEN)
        grower, pos = sessions[0], 0
        with pytest.raises(RequestRejected) as refused:
            while True:
                await _step(serving, grower, x, pos)
                pos += 1
        assert refused.value.code == "kv_budget"
        assert pos == 32  # its own page + the one left: 32 tokens, the 33rd needs a third
        assert serving.kv_free_tokens() == 0
        out = await _step(serving, sessions[1], x, 0)  # within its first page: fine
        assert out.shape == (1, 1, HIDDEN)
        serving.close_session(grower)
        assert serving.kv_free_tokens() == 64 - 2 * 16


async def test_a_failing_step_fails_alone(model_dir: Path) -> None:
    """A batch that fails in the model layer is rerun step by step: only the bad step gets the
    error, the others their outputs."""
    solo = ShardModel.load(model_dir, *SPAN, dtype="float32", device="cpu")
    async with _serving(model_dir) as serving:
        assert serving.shard is not None
        good = [serving.shard.new_cache() for _ in range(3)]
        bad = serving.shard.new_cache()
        x = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(3))
        results: dict[str, object] = {}

        async def one(name: str, cache, pos: int) -> None:  # type: ignore[no-untyped-def]
            try:
                results[name] = await serving.batcher.run(cache, x, pos, SPAN)
            except Exception as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            for i, c in enumerate(good):
                nursery.start_soon(one, f"good{i}", c, 0)
            nursery.start_soon(one, "bad", bad, 7)  # not its cached length
    want = solo.forward(solo.new_cache(), x, 0)
    for i in range(3):
        out = results[f"good{i}"]
        assert isinstance(out, torch.Tensor)
        assert (out - want).abs().max().item() < 1e-5
    assert isinstance(results["bad"], ValueError)
    assert bad.length == 0
