"""A model deeper than the protocol allows (protocol.ads.MAX_BLOCKS) cannot publish a valid
ad, so `shardmesh up --model DIR` refuses it at start with one line, before any weights are
read (a config.json alone is enough to be refused): agent.model.modelinfo.read_model_info
checks num_hidden_layers first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agentproc import Agent, stop_all, wait_for

from agent.model.modelinfo import ModelError, read_model_info
from protocol.ads import MAX_BLOCKS


def _config_only(path: Path, n_blocks: int) -> Path:
    """A model directory with a llama config.json and no weights at all."""
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": n_blocks,
        "num_attention_heads": 2,
        "vocab_size": 32,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_model_over_max_blocks_is_refused_before_its_weights(tmp_path: Path) -> None:
    deep = _config_only(tmp_path / "deep", 5000)
    with pytest.raises(ModelError, match=f"5000 blocks.*at most {MAX_BLOCKS}") as caught:
        read_model_info(deep)
    assert "\n" not in str(caught.value)


def test_at_max_blocks_the_check_passes_and_the_weights_are_looked_for(tmp_path: Path) -> None:
    # Exactly MAX_BLOCKS is what an ad may carry: the next check (no weights) is what fails.
    at_max = _config_only(tmp_path / "at-max", MAX_BLOCKS)
    with pytest.raises(ModelError, match="no safetensors weights"):
        read_model_info(at_max)


@pytest.mark.procs
def test_up_with_such_a_model_says_so_in_one_line_and_serves_nothing(tmp_path: Path) -> None:
    """At start, before any weights: the agent stays up (routing and relaying, so systemd
    does not restart it into the same failure), logs the line once, its status reason
    carries it, and it announces no span."""
    deep = _config_only(tmp_path / "deep", 5000)
    agent = Agent(tmp_path / "agent", ["--model", str(deep), "--blocks", "0:1"])
    needle = f"5000 blocks; the mesh protocol allows at most {MAX_BLOCKS}"
    agent.launch()
    try:

        def settled() -> dict[str, Any] | int | None:
            if agent.proc is not None and agent.proc.poll() is not None:
                return agent.proc.returncode or -1
            status = agent.request_or_none("status") if agent.control.exists() else None
            return status if status and needle in (status.get("reason") or "") else None

        outcome = wait_for(settled, 120, "the agent to refuse the model")
        log = agent.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log
        assert [line for line in log.splitlines() if needle in line], log
        assert isinstance(outcome, dict), f"the agent exited ({outcome}):\n{log}"
        assert len([line for line in log.splitlines() if needle in line]) == 1, log
        assert outcome["span"] is None and outcome["sessions"] == 0, outcome
        assert agent.alive()
    finally:
        stop_all([agent])
