"""The idle policy on real agents, driven through the fake NVML: the owner is busy at start,
leaves (the agent loads and joins), comes back mid-generation (drain, the session moves to
other peers with the same tokens, blocks unloaded), leaves again (reload), and SIGTERM
drains and exits 0. The tests run in file order on one mesh."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from agentproc import Agent, start_many, stop_all, wait_for
from hfref import hf_generate, load_full

from agent.hw.devices import FAKE_NVML_ENV
from agent.model.head import ClientHead
from agent.model.tiny import ensure_tiny_model
from agent.route.generate import generate_ids
from agent.route.standalone import open_standalone
from agent.route.view import ClientConfig

pytestmark = pytest.mark.procs

GIB = 1024**3
OWNER_PID = 999_999  # a process that is not the agent: the owner's game or training run
IDLE_ARGS = [
    "--idle",
    "--config",
    "{config}",
]
IDLE_TOML = """
[idle]
check_interval = 0.2
drain_grace = 1.0
holdoff = 1.0
gpu_utilization_max = 10
gpu_memory_max_mib = 1024
"""


def write_gpu(path: Path, *, owner: bool) -> None:
    procs = [{"pid": OWNER_PID, "used_memory": 6 * GIB}] if owner else []
    util = [{"pid": OWNER_PID, "sm_util": 85}] if owner else []
    gpu = {
        "name": "Fake GPU",
        "uuid": "GPU-idle-test",
        "memory_total": 16 * GIB,
        "memory_used": (6 if owner else 0) * GIB,
        "utilization": 85 if owner else 0,
        "compute_processes": procs,
        "process_utilization": util,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [gpu]}))
    tmp.replace(path)  # atomic: the agent re-reads the file at every check


class Mesh:
    def __init__(self, root: Path, model: Path, nvml: Path, idler: Agent, others: list[Agent]):
        self.root, self.model, self.nvml = root, model, nvml
        self.idler, self.others = idler, others

    @property
    def all(self) -> list[Agent]:
        return [self.idler, *self.others]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("idle")
    model = ensure_tiny_model("llama", root / "models")
    nvml = root / "nvml.json"
    write_gpu(nvml, owner=True)  # the owner is busy when the agent starts
    config = root / "idle.toml"
    config.write_text(IDLE_TOML)
    common = ["--model", str(model), "--threads", "1"]
    idler = Agent(
        root / "idler",
        [*common, "--blocks", "0:6", *(a.format(config=config) for a in IDLE_ARGS)],
        env={FAKE_NVML_ENV: str(nvml)},
    )
    others: list[Agent] = []
    try:
        idler.ready_states = ("draining",)
        idler.start(ready_timeout=180)
        boot = ["--bootstrap", idler.addrs[0]]
        others = [
            Agent(root / "low", [*common, "--blocks", "0:3", *boot]),
            Agent(root / "high", [*common, "--blocks", "3:6", *boot]),
        ]
        start_many(others)
        wait_for(lambda: len(idler.peer_ids()) == 2, 60, "the mesh to form")
        yield Mesh(root, model, nvml, idler, others)
    finally:
        stop_all([idler, *others])


def test_busy_owner_at_start_means_no_blocks_and_a_reason(mesh: Mesh) -> None:
    status = mesh.idler.status()
    assert status["loaded"] is False and status["span"] is None
    assert status["state"] == "draining"
    assert status["idle"]["phase"] == "yielded"
    assert "GPU 0 85% busy with other processes" in status["reason"]
    # Peers see it too: no span, not online, so nobody routes to it.
    row = next(r for r in mesh.others[0].peers()["peers"] if r["peer_id"] == mesh.idler.peer_id)
    assert row["state"] == "draining" and row["span"] is None


def test_owner_leaves_and_the_agent_loads_after_the_holdoff(mesh: Mesh) -> None:
    write_gpu(mesh.nvml, owner=False)
    status = wait_for(
        lambda: (s := mesh.idler.status())["state"] == "online" and s, 60, "the reload"
    )
    assert status["loaded"] is True and status["span"] == [0, 6]
    assert status["idle"] == {"phase": "serving", "why": "machine idle by the owner's rules"}
    assert status["reason"] == f"serving blocks 0:6 of {status['model_name']}"


async def _generate_while(mesh: Mesh, action: Any, after_tokens: int = 4) -> tuple[Any, list]:
    """Greedy generation from this process; after a few tokens run `action` (once the idler
    holds the session), then slow down so the drain's grace ends mid-generation."""
    head = ClientHead.load(mesh.model, dtype="float32", device="cpu")
    fired: list[dict[str, Any]] = []
    count = 0

    async def on_token(token: int) -> None:
        nonlocal count
        count += 1
        if count == after_tokens:
            before = await trio.to_thread.run_sync(mesh.idler.status)
            fired.append(before)
            await trio.to_thread.run_sync(action)
        if fired:
            await trio.sleep(0.15)

    async with open_standalone([mesh.others[0].addrs[0]]) as view:
        with trio.fail_after(30):
            while len([s for s in view.spans(head.info.model_id) if s.state == "online"]) < 3:
                await trio.sleep(0.1)
        result = await generate_ids(
            view,
            head,
            PROMPT,
            max_new_tokens=N_TOKENS,
            on_token=on_token,
            eos_token_id=head.config.eos_token_id,
            cfg=ClientConfig(step_timeout_s=10, reroute_wait_s=10),
        )
    return result, fired


PROMPT = [5, 9, 2, 7, 3]
N_TOKENS = 30


async def test_owner_returns_mid_generation_and_the_session_moves(mesh: Mesh) -> None:
    want = hf_generate(load_full(mesh.model), PROMPT, N_TOKENS)
    result, fired = await _generate_while(mesh, lambda: write_gpu(mesh.nvml, owner=True))
    assert fired, "the generation ended before the owner came back"
    assert fired[0]["sessions"] == 1, "the route did not use the idle-policy agent"
    assert result.token_ids == want
    assert result.failovers >= 1
    used = {r["peer_id"] for r in result.route}
    assert mesh.idler.peer_id not in used
    assert used == {a.peer_id for a in mesh.others}
    status = wait_for(
        lambda: (s := mesh.idler.status())["idle"]["phase"] == "yielded" and not s["loaded"] and s,
        30,
        "the unload",
    )
    assert status["sessions"] == 0 and status["span"] is None
    assert status["state"] == "draining"
    log = mesh.idler.log()
    assert "owner is back" in log and "blocks unloaded; memory returned" in log
    assert "Traceback" not in log


def test_owner_leaves_again_and_the_agent_rejoins(mesh: Mesh) -> None:
    write_gpu(mesh.nvml, owner=False)
    wait_for(lambda: mesh.idler.status()["state"] == "online", 60, "the second reload")
    row = wait_for(
        lambda: next(
            (
                r
                for r in mesh.others[1].peers()["peers"]
                if r["peer_id"] == mesh.idler.peer_id and r["state"] == "online"
            ),
            None,
        ),
        20,
        "peers to see the agent online again",
    )
    assert row["span"] == [0, 6]


async def test_sigterm_drains_and_exits_zero(mesh: Mesh) -> None:
    want = hf_generate(load_full(mesh.model), PROMPT, N_TOKENS)
    result, fired = await _generate_while(mesh, lambda: mesh.idler.signal(signal.SIGTERM))
    assert fired and fired[0]["sessions"] == 1, "the route did not use the idle-policy agent"
    assert result.token_ids == want
    assert mesh.idler.wait(20) == 0
    log = mesh.idler.log()
    assert "draining 1 sessions for up to 1 s" in log
    assert "Traceback" not in log
