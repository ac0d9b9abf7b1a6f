"""The tests' agents: agent.testing.agents with fast gossip, and failures that are assertion
errors quoting the agent's log. Start real agents the way a user does (`shardmesh up ...` as
a separate process) and stop them by pid. Every wait is bounded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from agent.testing import agents
from agent.testing.agents import LOOPBACK, SHARDMESH, cli, free_port, start_many, stop_all

__all__ = [
    "FAST_GOSSIP",
    "SHARDMESH",
    "Agent",
    "cli",
    "free_port",
    "serving_tiny_model",
    "start_many",
    "status_json",
    "stop_all",
    "wait_for",
]

# Ads every 0.5 s that live 3 s: joins and SIGKILLed peers show within seconds.
FAST_GOSSIP = ["--announce-interval", "0.5", "--ad-ttl", "3"]

T = TypeVar("T")


class Agent(agents.AgentProcess):
    def __init__(
        self,
        state_dir: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        entry: Sequence[str] | None = None,
    ) -> None:
        super().__init__(state_dir, args, base_args=[*LOOPBACK, *FAST_GOSSIP], env=env, entry=entry)

    def failure(self, message: str) -> Exception:
        # A failing test shows the end of the agent's log, not only its last line.
        return AssertionError(f"{message}:\n{self.log()}")


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    try:
        return agents.wait_for(pred, timeout, what, interval)
    except agents.WaitTimeout as exc:
        raise AssertionError(str(exc)) from None


def status_json(agent: Agent) -> dict[str, Any]:
    out = cli("status", "--json", "--control", str(agent.control))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@contextmanager
def serving_tiny_model(
    root: Path, config_toml: str, blocks: str = "0:4"
) -> Iterator[tuple[Agent, Path]]:
    """One agent serving `blocks` of a tiny llama made offline under `root`, started with
    `config_toml` as its config file; stopped on the way out. Yields (agent, model dir)."""
    from agent.model.tiny import ensure_tiny_model

    model = ensure_tiny_model("llama", root / "models")
    cfg = root / "config.toml"
    cfg.write_text(config_toml)
    agent = Agent(
        root / "agent",
        ["--config", str(cfg), "--model", str(model), "--blocks", blocks, "--threads", "1"],
    )
    try:
        agent.start(ready_timeout=120)
        yield agent, model
    finally:
        agent.stop()
