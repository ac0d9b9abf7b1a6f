"""Verified outputs (agent.route.verify).

First the pure parts and the verifier's decisions over fake in-process hops (no sockets);
then real agent processes: honest agents whose spans overlap so every block has two honest
servers, plus one agent started like any other but with its forward output tampered with
(tests/corrupt_agent.py). Verification must name the liar and keep the tokens exact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from agentproc import Agent, cli, start_many, stop_all, wait_for
from hfref import hf_generate, load_full

from agent.model.head import ClientHead
from agent.model.tiny import ensure_tiny_model
from agent.policy.routing import Hop
from agent.policy.snapshot import PeerSpan
from agent.route.generate import generate_ids
from agent.route.generation import GenerateRequest
from agent.route.health import PeerHealth
from agent.route.hops import HopError
from agent.route.session import RouteSession
from agent.route.standalone import open_standalone
from agent.route.verify import DEFAULT_TOLERANCE, Verifier
from agent.route.view import ClientConfig, GenerationError
from agent.route.vote import StepSampler, agrees, majority, relative_error, tail_tokens

HIDDEN = 8


# --- pure parts ---------------------------------------------------------------------------------
def test_step_sampler_fraction_and_seed() -> None:
    assert not any(StepSampler(0.0, 1)() for _ in range(200))
    assert all(StepSampler(1.0, 1)() for _ in range(200))
    a, b, c = StepSampler(0.3, 7), StepSampler(0.3, 7), StepSampler(0.3, 8)
    da = [a() for _ in range(2000)]
    assert da == [b() for _ in range(2000)]
    assert da != [c() for _ in range(2000)]
    assert 0.25 < sum(da) / len(da) < 0.35
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            StepSampler(bad)


def test_tolerance_absorbs_low_precision_but_not_tampering() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    assert relative_error(x, x.clone()) == 0.0
    for dtype in (torch.bfloat16, torch.float16):
        assert agrees(x, x.to(dtype), DEFAULT_TOLERANCE)
    tampered = x.clone()
    tampered[:, -1] += 0.5  # one row of ten
    assert relative_error(x, tampered) > 0.3
    assert not agrees(x, tampered, DEFAULT_TOLERANCE)
    # Symmetric, and a tolerance loose enough lets it pass.
    assert relative_error(x, tampered) == relative_error(tampered, x)
    assert agrees(x, tampered, 10.0)
    assert relative_error(x, x[:, :4]) == float("inf")
    nan = x.clone()
    nan[0, 0, 0] = float("nan")
    assert not agrees(x, nan, 1e9)
    zeros = torch.zeros(1, 2, 4)
    assert relative_error(zeros, zeros.clone()) == 0.0


def test_bf16_agent_agrees_with_fp32_within_default_tolerance(tmp_path: Path) -> None:
    """The default tolerance measured on real blocks: a bf16 span vs the same span in fp32."""
    from agent.model.blocks import ShardModel

    model_dir = ensure_tiny_model("llama", tmp_path)
    head = ClientHead.load(model_dir, dtype="float32", device="cpu")
    h = head.embed(torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(1)), 0)
    outs = []
    for dtype in ("float32", "bfloat16"):
        shard = ShardModel.load(model_dir, 0, 6, dtype=dtype, device="cpu")
        outs.append(shard.forward(shard.new_cache(), h, 0))
    err = relative_error(outs[0], outs[1])
    assert 0 < err < DEFAULT_TOLERANCE / 2, err
    tampered = outs[1].float().clone()
    tampered[:, -1] += 0.5
    assert not agrees(outs[0], tampered, DEFAULT_TOLERANCE)


def test_majority_decisions() -> None:
    a = torch.ones(1, 1, 4)
    a2 = a * 1.001
    b = a * 3
    b2 = b * 1.001
    c = -a
    tol = 0.01
    v = majority([a, b, a2], tol)  # the witness is outvoted
    assert (v.winner, v.majority, v.minority) == (0, (0, 2), (1,))
    v = majority([a, b, b2], tol)  # the primary is outvoted
    assert v.decided and v.winner == 1 and v.minority == (0,)
    assert not majority([a, b], tol).decided  # one against one: nobody to believe
    assert not majority([a, b, c], tol).decided  # three different answers
    assert not majority([a, a2, b, b2], tol).decided  # two against two
    v = majority([a, a2, b, c, a], tol)
    assert v.winner == 0 and v.minority == (2, 3)
    # Agreement within a tolerance is not transitive: the middle opinion bridges both.
    mid = a * 1.008
    far = a * 1.016
    v = majority([a, far, mid], tol)
    assert v.winner == 2 and v.minority == ()


def test_tail_tokens() -> None:
    xs = [torch.arange(5).view(1, 5, 1), torch.arange(5, 6).view(1, 1, 1)]
    xs.append(torch.arange(6, 9).view(1, 3, 1))
    got = torch.cat(tail_tokens(xs, 3, 8), dim=1).flatten().tolist()
    assert got == [3, 4, 5, 6, 7]
    assert tail_tokens(xs, 4, 4) == []
    with pytest.raises(ValueError):
        tail_tokens(xs, 0, 10)


def test_request_and_config_validation() -> None:
    base = {"model": "m", "prompt_ids": [1, 2]}
    assert GenerateRequest.from_json(base).verify == 0.0
    req = GenerateRequest.from_json({**base, "verify": 0.25, "verify_tolerance": 0.01})
    assert (req.verify, req.verify_tolerance) == (0.25, 0.01)
    for bad in ({"verify": 2}, {"verify": -1}, {"verify": "x"}, {"verify_tolerance": 0}):
        with pytest.raises(GenerationError, match="bad generate request"):
            GenerateRequest.from_json({**base, **bad})
    with pytest.raises(GenerationError):
        Verifier(ClientConfig(verify_fraction=1.5))
    with pytest.raises(GenerationError):
        Verifier(ClientConfig(verify_fraction=1.0, verify_tolerance=0.0))


# --- the verifier over fake hops ------------------------------------------------------------------
def fake_blocks(
    x: torch.Tensor, start: int, end: int, sums: dict[int, torch.Tensor]
) -> torch.Tensor:
    """Toy blocks with a KV-like state: block j adds a constant and 0.01 x the running sum of
    its inputs so far (causal), row by row, so chains and chunks give bit-identical results."""
    rows = []
    for t in range(x.shape[1]):
        h = x[:, t]
        for j in range(start, end):
            acc = sums.get(j, torch.zeros_like(h)) + h
            sums[j] = acc
            h = h + 0.1 * (j + 1) + 0.01 * acc
        rows.append(h)
    return torch.stack(rows, dim=1)


class FakeNet:
    """Peers (id -> span) in one process; some lie (last row + 0.5), some die."""

    def __init__(self, spans: dict[str, tuple[int, int]], liars: set[str] = frozenset()) -> None:
        self.spans = spans
        self.liars = set(liars)
        self.dead: set[str] = set()
        self.open_sessions = 0

    def peer_spans(self) -> list[PeerSpan]:
        return [
            PeerSpan(p, s, e, throughput=1000.0, state="online", sessions=0, kv_free_tokens=10**6)
            for p, (s, e) in self.spans.items()
        ]


class FakeHop:
    def __init__(self, net: FakeNet, hop: Hop) -> None:
        self.net = net
        self.peer_id, self.start, self.end = hop.peer_id, hop.start, hop.end
        self.sums: dict[int, torch.Tensor] = {}
        self.length = 0
        self.open_ = False

    async def open(self, model_id: str, max_length: int, batch: int) -> None:
        if self.peer_id in self.net.dead:
            raise HopError(self.peer_id, "cannot reach peer")
        self.open_ = True
        self.net.open_sessions += 1

    async def step(self, h: torch.Tensor, position: int) -> torch.Tensor:
        await trio.sleep(0)
        if self.peer_id in self.net.dead:
            raise HopError(self.peer_id, "stream reset")
        if position != self.length:
            raise HopError(self.peer_id, f"position {position} != {self.length}")
        out = fake_blocks(h, self.start, self.end, self.sums)
        self.length += h.shape[1]
        if self.peer_id in self.net.liars:
            out = out.clone()
            out[:, -1] += 0.5
        return out

    async def close(self) -> None:
        if self.open_:
            self.open_ = False
            self.net.open_sessions -= 1


class FakeView:
    serving = None
    self_id = "client"

    def __init__(self, net: FakeNet) -> None:
        self.net = net

    def spans(self, model_id: str) -> list[PeerSpan]:
        return [p for p in self.net.peer_spans() if p.peer_id not in self.net.dead]


class FakeSession(RouteSession):
    def _make_hop(self, hop: Hop) -> Any:
        return FakeHop(self.view.net, hop)


N_BLOCKS = 6


async def run_fake(
    net: FakeNet,
    rtt: dict[str, float],
    *,
    fraction: float = 1.0,
    steps: int = 8,
    kill_after: tuple[int, str] | None = None,
) -> tuple[list[str], FakeSession, Verifier]:
    """A prefill of 5 tokens then `steps` one-token steps; returns every output row."""
    cfg = ClientConfig(verify_fraction=fraction, reroute_wait_s=0.5, verify_seed=3)
    session = FakeSession(
        FakeView(net), "m", N_BLOCKS, max_length=64, cfg=cfg, health=PeerHealth(rtt_ms=dict(rtt))
    )
    verifier = Verifier(cfg)
    session.verifier = verifier
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 5, HIDDEN, generator=g)]
    xs += [torch.randn(1, 1, HIDDEN, generator=g) for _ in range(steps)]
    outs = []
    try:
        await session.open()
        position = 0
        for i, x in enumerate(xs):
            if kill_after and i == kill_after[0]:
                net.dead.add(kill_after[1])
            outs.append(await session.step(x, position))
            position += x.shape[1]
        route = [s.hop.peer_id for s in session.hops]
    finally:
        await session.close()
    assert net.open_sessions == 0, "a witness or hop session was left open"
    ref = fake_blocks(torch.cat(xs, dim=1), 0, N_BLOCKS, {})
    got = torch.cat(outs, dim=1)
    assert torch.equal(got, ref), "outputs differ from the honest computation"
    return route, session, verifier


def suspects(v: Verifier) -> set[str]:
    return {s["peer_id"] for s in v.suspects}


OVERLAP = {"A": (0, 6), "B": (0, 3), "C": (3, 6), "X": (0, 6)}


async def test_lying_primary_is_outvoted_and_replaced() -> None:
    net = FakeNet(OVERLAP, liars={"X"})
    route, session, v = await run_fake(net, {"X": 1, "A": 10, "B": 10, "C": 10})
    assert suspects(v) == {"X"}
    assert route == ["A"]
    assert session.failovers == 1 and "X" in session.avoid
    assert v.verified_steps == 9 and v.unverified_steps == 0 and v.mismatches == 1
    (report,) = v.suspects
    assert report["span"] == [0, 6] and report["step"] == 0 and "2 of 3" in report["reason"]


async def test_lying_witness_is_outvoted_and_route_kept() -> None:
    net = FakeNet(OVERLAP, liars={"X"})
    route, session, v = await run_fake(net, {"A": 1, "X": 2, "B": 10, "C": 10})
    assert suspects(v) == {"X"} and session.failovers == 0
    assert v.verified_steps == 9 and v.mismatches == 1
    assert route == ["A"] and "X" in session.avoid


async def test_lying_hop_inside_a_multi_hop_route() -> None:
    """Route B[0,3) -> C'[3,6) where C' lies; A and C serve as witnesses and third opinion."""
    spans = {"A": (0, 6), "B": (0, 3), "L": (3, 6), "C": (2, 6)}
    net = FakeNet(spans, liars={"L"})
    route, session, v = await run_fake(net, {"B": 0.1, "L": 0.1, "A": 100, "C": 30})
    assert suspects(v) == {"L"} and v.suspects[0]["span"] == [3, 6]
    assert route == ["B", "C"] and session.failovers == 1


async def test_no_independent_peer_counts_unverified() -> None:
    net = FakeNet({"A": (0, 6)})
    _, _, v = await run_fake(net, {})
    assert (v.verified_steps, v.unverified_steps, v.mismatches) == (0, 9, 0)
    assert v.suspects == []


async def test_one_against_one_is_not_decided() -> None:
    """Primary honest, the only witness lies, no third opinion: nobody is accused, the step is
    left unverified and the primary's output is used."""
    net = FakeNet({"A": (0, 6), "X": (0, 6)}, liars={"X"})
    _, session, v = await run_fake(net, {"A": 1, "X": 2}, steps=3)
    assert v.suspects == [] and session.failovers == 0
    assert v.verified_steps == 0 and v.unverified_steps == 4 and v.mismatches == 4


async def test_fraction_samples_steps_and_witness_catches_up() -> None:
    net = FakeNet({"A": (0, 6), "B": (0, 3), "C": (3, 6)})
    steps = 30
    _, _, v = await run_fake(net, {"A": 1, "B": 5, "C": 5}, fraction=0.3, steps=steps)
    draw = StepSampler(0.3, 3)
    expected = sum(draw() for _ in range(steps + 1))
    assert 0 < expected < steps + 1
    assert v.verified_steps == expected and v.unverified_steps == 0 and v.mismatches == 0


async def test_a_dying_witness_is_replaced_without_failing_the_step() -> None:
    net = FakeNet({"A": (0, 6), "B": (0, 6), "C": (0, 3), "D": (3, 6)})
    _, session, v = await run_fake(net, {"A": 1, "B": 2, "C": 9, "D": 9}, kill_after=(4, "B"))
    assert session.failovers == 0 and v.suspects == []
    assert v.verified_steps == 9 and v.unverified_steps == 0


async def test_a_dying_primary_fails_over_while_verified() -> None:
    net = FakeNet({"A": (0, 6), "B": (0, 6), "C": (0, 3), "D": (3, 6)})
    route, session, v = await run_fake(net, {"A": 1, "B": 2, "C": 9, "D": 9}, kill_after=(4, "A"))
    assert route == ["B"] and session.failovers == 1 and v.suspects == []
    assert v.verified_steps == 9


# --- real agents ----------------------------------------------------------------------------------
# Every block has two honest servers (A, and B or C); X serves everything and lies.
HONEST = {"A": (0, 6), "B": (0, 3), "C": (3, 6)}
LIAR = ("X", (0, 6))
PROMPT = [5, 17, 42, 99, 123, 7, 300]
NEW_TOKENS = 12
CORRUPT_ENTRY = [sys.executable, str(Path(__file__).with_name("corrupt_agent.py"))]


class Mesh:
    def __init__(self, model_dir: Path, agents: dict[str, Agent]) -> None:
        self.model_dir = model_dir
        self.agents = agents

    def id(self, name: str) -> str:
        peer_id = self.agents[name].peer_id
        assert peer_id is not None
        return peer_id


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("verify")
    model_dir = ensure_tiny_model("llama", root / "models")
    agents: dict[str, Agent] = {}

    def make(name: str, span: tuple[int, int], entry: list[str] | None = None) -> Agent:
        args = ["--model", str(model_dir), "--blocks", f"{span[0]}:{span[1]}", "--threads", "1"]
        if agents:
            args += ["--bootstrap", agents["A"].addrs[0]]
        agent = Agent(root / name, args, entry=entry) if entry else Agent(root / name, args)
        agents[name] = agent
        return agent

    try:
        make("A", HONEST["A"]).start(ready_timeout=180)
        rest = [make(n, s) for n, s in HONEST.items() if n != "A"]
        rest.append(make(LIAR[0], LIAR[1], CORRUPT_ENTRY))
        start_many(rest)
        wait_for(lambda: len(agents["A"].peer_ids()) == len(agents) - 1, 60, "the mesh to form")
        yield Mesh(model_dir, agents)
    finally:
        stop_all(list(agents.values()))


@pytest.fixture(scope="module")
def reference(mesh: Mesh) -> list[int]:
    return hf_generate(load_full(mesh.model_dir), PROMPT, NEW_TOKENS)


@asynccontextmanager
async def client(m: Mesh):
    async with open_standalone([m.agents["A"].addrs[0]]) as view:
        with trio.fail_after(30):
            while len(view.table) < len(m.agents):
                await trio.sleep(0.1)
        yield view


async def generate(m: Mesh, rtt: dict[str, float], fraction: float) -> Any:
    """Generate with preset round trips (lower = preferred), so the route is chosen."""
    head = ClientHead.load(m.model_dir, dtype="float32", device="cpu")
    health = PeerHealth(rtt_ms={m.id(n): ms for n, ms in rtt.items()})
    cfg = ClientConfig(verify_fraction=fraction, step_timeout_s=20, reroute_wait_s=5)
    async with client(m) as view:
        return await generate_ids(
            view,
            head,
            PROMPT,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=head.config.eos_token_id,
            cfg=cfg,
            health=health,
        )


@pytest.mark.procs
async def test_corruption_is_real_without_verification(mesh: Mesh, reference: list[int]) -> None:
    result = await generate(mesh, {"X": 0.1, "A": 500, "B": 2000, "C": 2000}, 0.0)
    assert [r["peer_id"] for r in result.route] == [mesh.id("X")]
    assert result.token_ids != reference
    assert result.suspect_peers == [] and result.verified_steps == 0


@pytest.mark.procs
async def test_lying_primary_agent_is_caught_and_tokens_stay_exact(
    mesh: Mesh, reference: list[int]
) -> None:
    result = await generate(mesh, {"X": 0.1, "A": 500, "B": 2000, "C": 2000}, 1.0)
    assert result.token_ids == reference
    assert {s["peer_id"] for s in result.suspect_peers} == {mesh.id("X")}
    assert all(r["peer_id"] != mesh.id("X") for r in result.route)
    assert result.failovers == 1 and result.mismatches >= 1
    assert result.verified_steps == len(reference) and result.unverified_steps == 0
    assert "outvoted" in result.suspect_peers[0]["reason"]


@pytest.mark.procs
async def test_lying_witness_agent_is_caught(mesh: Mesh, reference: list[int]) -> None:
    result = await generate(mesh, {"A": 0.1, "X": 200, "B": 2000, "C": 2000}, 1.0)
    assert result.token_ids == reference
    assert [r["peer_id"] for r in result.route] == [mesh.id("A")]
    assert {s["peer_id"] for s in result.suspect_peers} == {mesh.id("X")}
    assert result.failovers == 0 and result.verified_steps == len(reference)


@pytest.mark.procs
def test_generate_cli_verify_names_the_liar(mesh: Mesh, reference: list[int]) -> None:
    out = cli(
        "generate",
        "--control",
        str(mesh.agents["A"].control),
        "--model",
        mesh.model_dir.name,
        "--prompt-ids",
        ",".join(map(str, PROMPT)),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--verify",
        "1",
        "--json",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == reference
    assert [s["peer_id"] for s in result["suspect_peers"]] == [mesh.id("X")]
    assert result["verified_steps"] == len(reference) and result["unverified_steps"] == 0
    bad = cli("generate", "--control", str(mesh.agents["A"].control), "--model", "m",
              "--prompt-ids", "1", "--verify", "2")  # fmt: skip
    assert bad.returncode == 2 and "--verify" in bad.stderr
