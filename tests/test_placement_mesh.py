"""`--blocks auto`: agents started together spread over the model and cover it."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentproc import Agent, free_port, start_many, stop_all, wait_for

from agent.model.tiny import ensure_tiny_model

pytestmark = pytest.mark.procs

N_BLOCKS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model("llama", tmp_path_factory.mktemp("auto"), n_layers=N_BLOCKS)


def _start_together(root: Path, model: Path, n: int, max_blocks: int) -> list[Agent]:
    """All n agents start at the same moment. The first one's identity and port are fixed
    beforehand so the others can name it as their bootstrap peer."""
    from libp2p.peer.id import ID

    from agent.net.identity import load_or_create_identity

    first_key = load_or_create_identity(root / "a0" / "identity.key")
    first_id = ID.from_pubkey(first_key.public_key).to_base58()
    port = free_port()
    args = ["--model", str(model), "--blocks", "auto", "--max-blocks", str(max_blocks)]
    args += ["--threads", "1"]
    agents = [Agent(root / "a0", [*args, "--listen", f"/ip4/127.0.0.1/tcp/{port}"])]
    boot = f"/ip4/127.0.0.1/tcp/{port}/p2p/{first_id}"
    agents += [Agent(root / f"a{i}", [*args, "--bootstrap", boot]) for i in range(1, n)]
    start_many(agents)
    return agents


@pytest.mark.parametrize("n, max_blocks", [(2, 4), (3, 3), (5, 2)])
def test_auto_placement_covers_the_model(
    model_dir: Path, tmp_path: Path, n: int, max_blocks: int
) -> None:
    agents = _start_together(tmp_path, model_dir, n, max_blocks)
    try:
        spans = [tuple(a.status()["span"]) for a in agents]
        assert all(e - s == max_blocks for s, e in spans), spans
        covered = {b for s, e in spans for b in range(s, e)}
        assert covered == set(range(N_BLOCKS)), spans

        def coverage_complete() -> bool:
            cov = agents[0].peers()["coverage"]
            return bool(cov) and cov[0]["complete"] and len(cov[0]["replicas"]) == N_BLOCKS

        wait_for(coverage_complete, 30, "the peers table to show full coverage")
        if n == 2:
            assert sorted(spans) == [(0, 4), (4, 8)]  # exactly enough room: no overlap allowed
    finally:
        stop_all(agents)
