"""Continuous batching through real agent processes: eight concurrent greedy generations
through two agents (blocks 0:3 and 3:6 of a tiny llama) give each the tokens it gives alone
(= Hugging Face generate()), and the agents ran their steps in shared forwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from agentproc import Agent, start_many, stop_all
from hfref import hf_generate, load_full

from agent.model.head import ClientHead
from agent.model.tiny import ensure_tiny_model
from agent.route.generate import generate_ids
from agent.route.standalone import open_standalone

pytestmark = pytest.mark.procs

STREAMS = 8
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Agent], Path]]:
    root = tmp_path_factory.mktemp("concurrency")
    model = ensure_tiny_model("llama", root / "models")
    first = Agent(root / "a0", ["--model", str(model), "--blocks", "0:3", "--threads", "1"])
    first.start(ready_timeout=120)
    second = Agent(
        root / "a1",
        ["--model", str(model), "--blocks", "3:6", "--threads", "1", "--bootstrap", first.addr],
    )
    agents = [first, second]
    try:
        start_many([second])
        yield agents, model
    finally:
        stop_all(agents)


def _batch(agent: Agent) -> dict[str, float]:
    return agent.status()["batch"]  # type: ignore[no-any-return]


async def test_concurrent_generations_equal_each_alone(pair: tuple[list[Agent], Path]) -> None:
    agents, model = pair
    head = ClientHead.load(model, dtype="float32", device="cpu")
    full = load_full(model)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(3 + 2 * i)] for i in range(STREAMS)]
    want = [hf_generate(full, p, NEW_TOKENS) for p in prompts]
    before = [_batch(a) for a in agents]
    got: list[list[int] | None] = [None] * STREAMS
    async with open_standalone([agents[0].addrs[0]]) as view:
        with trio.fail_after(60):
            while len(view.table) < 2:
                await trio.sleep(0.1)

        async def one(i: int) -> None:
            result = await generate_ids(
                view, head, prompts[i], max_new_tokens=NEW_TOKENS, eos_token_id=None
            )
            assert result.failovers == 0, result.failures
            got[i] = result.token_ids

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(STREAMS):
                    nursery.start_soon(one, i)
    assert got == want
    steps = STREAMS * NEW_TOKENS  # per agent: one prefill and NEW_TOKENS - 1 decodes each
    for agent, was in zip(agents, before, strict=True):
        now = _batch(agent)
        forwards = now["forwards"] - was["forwards"]
        assert forwards < steps, (agent.name, now, was)  # some steps shared a forward
        assert now["mean_rows"] > 1.0, (agent.name, now)
        assert "Traceback" not in agent.log()
