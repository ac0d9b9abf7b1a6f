"""Model spans served by real agent processes, checked against the same model run locally.

One mesh for the module: per family, agents each serving a slice of a tiny random model
(made offline), all bootstrapped to the first agent. The client side runs in this process
(a real libp2p host) or through the `shardmesh generate` CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio
from agentproc import Agent, cli, start_many, stop_all, wait_for
from hfref import full_step, hf_generate, load_full

from agent.model.head import ClientHead
from agent.model.tiny import ensure_tiny_model
from agent.policy.routing import Hop
from agent.route.generate import generate_ids
from agent.route.health import PeerHealth
from agent.route.hops import RemoteHop
from agent.route.standalone import open_standalone
from agent.route.view import ClientConfig

pytestmark = pytest.mark.procs

TOL = 1e-5
PROMPT_LEN = 12  # longer than the tiny qwen2's sliding window (8)
DECODE_STEPS = 20
# Two agents per family (each agent process imports torch and transformers: ~7 s of CPU,
# so the module keeps their number down); llama's second span is served twice, for the
# failover test, which runs last.
SPANS = {
    "llama": [(0, 3), (3, 6)],
    "qwen3": [(0, 2), (2, 6)],
    "gpt2": [(0, 4), (4, 6)],
    "mistral": [(0, 3), (3, 6)],
    "qwen2": [(0, 4), (4, 6)],
}
REPLICA = ("llama", 1)  # llama's span 1 is also served by agent "llama2"
GENERATE_FAMILIES = ("llama", "qwen3", "gpt2")


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, Path] = {}
        self.agents: dict[str, list[Agent]] = {}
        self.all: list[Agent] = []

    @property
    def entry(self) -> Agent:
        return self.all[0]

    def start(self, name: str, model: Path, span: tuple[int, int], extra: list[str] = ()) -> Agent:
        args = ["--model", str(model), "--blocks", f"{span[0]}:{span[1]}", "--threads", "1"]
        # Seventeen agents share two cores here: a gentler gossip rate than agentproc's.
        args += ["--announce-interval", "1", "--ad-ttl", "8"]
        if self.all:
            args += ["--bootstrap", self.entry.addrs[0]]
        agent = Agent(self.root / name, [*args, *extra])
        self.all.append(agent)
        return agent


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mm")
    m = Mesh(root)
    try:
        for family in SPANS:
            m.models[family] = ensure_tiny_model(family, root / "models")
        # A model with a hole: nobody serves blocks 3:6.
        m.models["holey"] = ensure_tiny_model("llama", root / "models", seed=9)
        first_family = next(iter(SPANS))
        first = m.start(f"{first_family}0", m.models[first_family], SPANS[first_family][0])
        first.start(ready_timeout=180)
        rest: list[Agent] = []
        for family, spans in SPANS.items():
            for i, span in enumerate(spans):
                if family == first_family and i == 0:
                    continue
                rest.append(m.start(f"{family}{i}", m.models[family], span))
        family, i = REPLICA
        rest.append(m.start(f"{family}2", m.models[family], SPANS[family][i]))
        rest.append(m.start("holey0", m.models["holey"], (0, 3)))
        start_many(rest)
        n_agents = len(m.all)
        wait_for(lambda: len(m.entry.peer_ids()) == n_agents - 1, 120, "the mesh to form")
        yield m
    finally:
        stop_all(m.all)


@asynccontextmanager
async def client(m: Mesh):
    async with open_standalone([m.entry.addrs[0]]) as view:
        # Usually 0.1-0.6 s. Twice in ~8 runs of this module today the client had not heard
        # all 12 agents after 30 s: with 11 agents the entry's gossip mesh is over
        # degree_high, and a client it prunes may not graft again for py-libp2p's 60 s
        # prune back-off (our suspicion, not proven; see the note). Wait past it.
        with trio.fail_after(90):
            while len(view.table) < len(m.all):
                await trio.sleep(0.1)
        yield view


def _generate(m: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    """`shardmesh generate ARGS` through the entry agent's control socket."""
    return cli("generate", "--control", str(m.entry.control), *args, timeout=120)


def _agent(m: Mesh, name: str) -> Agent:
    return next(a for a in m.all if a.state_dir.name == name)


@pytest.mark.parametrize("family", list(SPANS))
async def test_spans_on_agents_match_local_model(mesh: Mesh, family: str) -> None:
    """Prefill (whole and chunked) and 20 cached decode steps, batch 1 and 2, float32."""
    model_dir = mesh.models[family]
    full = load_full(model_dir)
    head = ClientHead.load(model_dir, dtype="float32", device="cpu")
    model_id = head.info.model_id
    spans = SPANS[family]
    gen = torch.Generator().manual_seed(3)
    async with client(mesh) as view:
        for batch in (1, 2):
            prompt = torch.randint(3, 500, (batch, PROMPT_LEN), generator=gen)
            for chunks in ((PROMPT_LEN,), (5, PROMPT_LEN - 5)):
                hops = []
                for i, (s, e) in enumerate(spans):
                    peer = _agent(mesh, f"{family}{i}").peer_id
                    hop = RemoteHop(view, Hop(peer, s, e), ClientConfig(), PeerHealth())
                    await hop.open(model_id, PROMPT_LEN + DECODE_STEPS, batch)
                    hops.append(hop)
                try:
                    ref_logits, ref_hidden, cache = full_step(full, prompt, None)
                    position = 0
                    outs: list[list[torch.Tensor]] = [[] for _ in spans]
                    for piece in prompt.split(list(chunks), dim=1):
                        h = head.embed(piece, position)
                        for i, hop in enumerate(hops):
                            h = await hop.step(h, position)
                            outs[i].append(h)
                        position += piece.shape[1]
                    for i, (_, e) in enumerate(spans[:-1]):
                        got = torch.cat(outs[i], dim=1)
                        assert (got - ref_hidden[e]).abs().max().item() < TOL, (batch, chunks, e)
                    logits = head.logits(torch.cat(outs[-1], dim=1))
                    assert (logits - ref_logits).abs().max().item() < TOL, (batch, chunks)
                    token = ref_logits[:, -1:].argmax(-1)
                    for step in range(DECODE_STEPS):
                        ref_logits, ref_hidden, cache = full_step(full, token, cache)
                        h = head.embed(token, position)
                        for i, hop in enumerate(hops):
                            h = await hop.step(h, position)
                            if i < len(spans) - 1:
                                ref_h = ref_hidden[spans[i][1]]
                                assert (h - ref_h).abs().max().item() < TOL, (batch, step, i)
                        got = head.logits(h)
                        assert (got - ref_logits).abs().max().item() < TOL, (batch, chunks, step)
                        position += 1
                        token = ref_logits[:, -1:].argmax(-1)
                finally:
                    for hop in hops:
                        await hop.close()


@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_generate_cli_equals_hf_generate(mesh: Mesh, family: str) -> None:
    model_dir = mesh.models[family]
    prompt = [5, 17, 42, 99, 123, 7, 300]
    want = hf_generate(load_full(model_dir), prompt, 16)
    out = _generate(
        mesh,
        "--model",
        model_dir.name,
        "--model-dir",
        str(model_dir),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "16",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == want
    assert result["failovers"] == 0
    route = result["route"]
    assert [tuple(r["span"]) for r in route] == SPANS[family]
    serving = [a.peer_id for a in mesh.all if a.state_dir.name.startswith(family)]
    assert all(r["peer_id"] in serving for r in route)
    assert result["prefill_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_generate_text_prompt_streams_and_matches(mesh: Mesh) -> None:
    from transformers import AutoTokenizer

    model_dir = mesh.models["llama"]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = "the quick brown fox"
    want = hf_generate(load_full(model_dir), tok(prompt)["input_ids"], 10)
    out = _generate(
        mesh,
        "--model",
        model_dir.name,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "10",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == want
    assert result["text"] == tok.decode(want, skip_special_tokens=True)
    # Text mode (no --json) streams to stdout and summarises on stderr.
    out = _generate(
        mesh,
        "--model",
        model_dir.name,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "10",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == result["text"].strip()
    assert "tokens" in out.stderr and "route" in out.stderr


def test_standalone_client_with_bootstrap(mesh: Mesh) -> None:
    model_dir = mesh.models["gpt2"]
    prompt = [11, 22, 33, 44]
    want = hf_generate(load_full(model_dir), prompt, 12)
    out = cli(
        "generate",
        "--bootstrap",
        mesh.entry.addrs[0],
        "--model",
        model_dir.name,
        "--model-dir",
        str(model_dir),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == want


def test_sampling_is_reproducible_with_a_seed(mesh: Mesh) -> None:
    model_dir = mesh.models["llama"]
    args = [
        "generate",
        "--control",
        str(mesh.entry.control),
        "--model",
        model_dir.name,
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
        "--json",
    ]
    a = json.loads(cli(*args, "--seed", "1", timeout=120).stdout)["token_ids"]
    b = json.loads(cli(*args, "--seed", "1", timeout=120).stdout)["token_ids"]
    c = json.loads(cli(*args, "--seed", "2", timeout=120).stdout)["token_ids"]
    assert a == b
    assert a != c  # 12 tokens at temperature 1.5 over a 512-token vocabulary


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "no-such-model", "--prompt-ids", "1,2"], "unknown model 'no-such-model'"),
        (["--model", "tiny-llama-l6-h64-s9", "--prompt-ids", "1,2"], "blocks 3-5"),
    ],
)
def test_generate_failures_exit_1_with_one_line(mesh: Mesh, extra: list[str], needle: str) -> None:
    args = ["generate", "--control", str(mesh.entry.control), *extra]
    if "s9" in extra[1]:
        args += ["--model-dir", str(mesh.models["holey"])]
    out = cli(*args, timeout=120)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_generate_without_daemon_exits_1(tmp_path: Path) -> None:
    out = cli(
        "generate", "--control", str(tmp_path / "x.sock"), "--model", "m", "--prompt-ids", "1"
    )
    assert out.returncode == 1 and "no agent is running" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


async def test_failover_mid_generation_gives_the_same_tokens(mesh: Mesh) -> None:
    """SIGKILL the peer in use for blocks 3:6 after a few tokens: the client re-routes that
    span to the replica, replays its inputs, and the tokens equal generate()."""
    model_dir = mesh.models["llama"]
    prompt = [9, 8, 7, 6, 5, 4]
    want = hf_generate(load_full(model_dir), prompt, 24)
    head = ClientHead.load(model_dir, dtype="float32", device="cpu")
    replicas = [_agent(mesh, "llama1"), _agent(mesh, "llama2")]
    killed: list[Agent] = []

    async def on_token(token: int) -> None:
        if len(killed) == 0 and on_token.count == 5:  # type: ignore[attr-defined]
            busy = [a for a in replicas if (await trio.to_thread.run_sync(a.status))["sessions"]]
            assert len(busy) == 1
            busy[0].signal(signal.SIGKILL)
            await trio.to_thread.run_sync(busy[0].wait, 10)
            killed.append(busy[0])
        on_token.count += 1  # type: ignore[attr-defined]

    on_token.count = 0  # type: ignore[attr-defined]
    async with client(mesh) as view:
        result = await generate_ids(
            view,
            head,
            prompt,
            max_new_tokens=24,
            on_token=on_token,
            eos_token_id=head.config.eos_token_id,
            cfg=ClientConfig(step_timeout_s=10, reroute_wait_s=10),
        )
    assert killed, "the generation ended before a peer could be killed"
    assert result.token_ids == want
    assert result.failovers == 1
    survivor = next(a for a in replicas if a is not killed[0])
    assert any(r["peer_id"] == survivor.peer_id and r["span"] == [3, 6] for r in result.route)
    assert "Traceback" not in survivor.log()
    assert all(r["peer_id"] != killed[0].peer_id for r in result.route)
