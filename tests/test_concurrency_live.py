"""Continuous batching through real agent processes: eight concurrent greedy generations
through two agents (blocks 0:3 and 3:6 of a tiny llama) give each the tokens it gives alone
(= Hugging Face generate()), and the agents ran their steps in shared forwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from agentproc import Agent, cli, start_many, stop_all
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


def test_generate_runs_several_prompts_at_once(
    pair: tuple[list[Agent], Path], tmp_path: Path
) -> None:
    """`shardmesh generate` with repeated --prompt (and --prompts-file) runs them at once:
    each result equals HF generate() for its prompt, in prompt order; `status` shows the
    agent's batching."""
    from transformers import AutoTokenizer

    agents, model = pair
    tok = AutoTokenizer.from_pretrained(str(model))
    full = load_full(model)
    prompts = ["the quick brown fox", "one two", "a mesh of idle machines serving"]
    want = [hf_generate(full, tok(p)["input_ids"], 6) for p in prompts]
    base = ["generate", "--control", str(agents[0].control), "--model", model.name]
    base += ["--max-new-tokens", "6"]
    out = cli(*base, *[a for p in prompts for a in ("--prompt", p)], "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["token_ids"] for r in results] == want
    listing = tmp_path / "prompts.txt"
    listing.write_text("\n".join(prompts) + "\n\n")  # blank lines are not prompts
    out = cli(*base, "--prompts-file", str(listing), timeout=120)
    assert out.returncode == 0, out.stderr
    texts = [tok.decode(w, skip_special_tokens=True) for w in want]
    assert out.stdout.splitlines() == [x for i, t in enumerate(texts, 1) for x in (f"[{i}]", t)]
    assert "3 generations at once" in out.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = cli(*base, "--prompts-file", str(empty))
    assert out.returncode == 2 and "has no prompts" in out.stderr
    status = cli("status", "--control", str(agents[0].control))
    assert status.returncode == 0 and "rows a forward" in status.stdout, status.stdout
