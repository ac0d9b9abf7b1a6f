"""scripts/bench_concurrency.py: its command line and pure helpers (no agents, no model)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.config import load_config
from agent.policy.peerlimits import PeerLimits

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_concurrency.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_concurrency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_concurrency"] = module
    spec.loader.exec_module(module)
    return module


def test_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    flags = "--concurrency --tokens --prompt-tokens --hidden --layers --vocab --workdir --out"
    for flag in [*flags.split(), "--timeout", "--ready-timeout", "--repeats"]:
        assert flag in out.stdout


def test_defaults_and_argument_checks(tmp_path: Path) -> None:
    bc = load_script()
    args = bc.parse_args(["--workdir", str(tmp_path)])
    assert args.concurrency_levels == [1, 2, 4, 8, 16]
    assert (args.tokens, args.prompt_tokens, args.repeats) == (64, 16, 1)
    assert (args.hidden, args.layers, args.vocab) == (768, 12, 32000)
    assert args.out == tmp_path.resolve() / "bench_concurrency.json"
    # About 130M parameters: embeddings + head + 12 layers of attention and MLP.
    s = bc.bg.model_shape(args)
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    params = 2 * v * h + s["num_hidden_layers"] * (4 * h * h + 3 * h * i)
    assert 120e6 < params < 145e6
    assert bc.parse_args(["--concurrency", "4,1,4"]).concurrency_levels == [1, 4]
    bad_args = ["--concurrency 0,2", "--concurrency x", "--layers 1", "--tokens 1",
                "--repeats 0", "--hidden 100 --heads 3"]  # fmt: skip
    for bad in (b.split() for b in bad_args):
        with pytest.raises(SystemExit):
            bc.parse_args(bad)


def test_agent_limits_let_one_client_hold_every_session(tmp_path: Path) -> None:
    bc = load_script()
    cfg = tmp_path / "limits.toml"
    cfg.write_text(bc.limits_toml(16))
    lim = load_config(cfg, {}).limits
    assert PeerLimits(lim).session_cap >= 16
    assert lim.per_peer_streams >= 2 * 16 and lim.max_batch_rows >= 16


def test_helpers() -> None:
    bc = load_script()
    assert bc.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert bc.percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert bc.gaps_ms([0.0, 0.01, 0.03]) == pytest.approx([10.0, 20.0])
    batch = {"last_rows": 4, "waiting": 0, "forwards": 30, "mean_rows": 1.07}
    assert bc.batch_counters({"batch": batch}) == batch
    assert bc.batch_counters({"serving": {"batch": batch}}) == batch
    assert bc.batch_counters(None) is None and bc.batch_counters({"state": "x"}) is None
    assert bc.rows_total(batch) == 32
