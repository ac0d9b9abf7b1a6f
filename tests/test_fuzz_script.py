"""scripts/fuzz_protocol.py: runs a decoder under atheris and reports what it found."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_protocol.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_protocol"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", ["decode_message", "forward_connection"])
def test_short_run_executes_and_finds_nothing(tmp_path: Path, target: str) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        pytest.skip(f"atheris cannot be imported here: {e}")
    args = ["--seconds", "5", "--target", target, "--out", str(tmp_path), "--json"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [report] = json.loads(out.stdout)
    assert report["target"] == target
    assert report["executions"] > 0 and report["exec_per_s"] > 0
    assert report["cov"] > 0 and report["corpus"] > 0
    assert report["findings"] == []
    assert json.loads((tmp_path / "report.json").read_text()) == [report]
    # The seed corpus of valid encodings was written and grown.
    seeds = len(load_script().build_targets()[target].seeds)
    assert len(list((tmp_path / "corpus" / target).iterdir())) >= max(seeds, 3)


def test_every_target_builds_and_accepts_its_seeds() -> None:
    # The seeds are valid encodings: a target that rejects one has a broken seed or wrapper.
    targets = load_script().build_targets()
    expected = {"unpack_map", "decode_message", "frame_decoder", "ad_body", "forward_connection"}
    assert expected <= set(targets)
    for name, target in targets.items():
        assert target.seeds, name
        for seed in target.seeds:
            target.run(seed)


def test_report_parsing_counts_findings() -> None:
    text = "\n".join(
        [
            "#1024\tpulse  cov: 120 ft: 300 corp: 40/2000b lim: 100 exec/s: 512 rss: 60Mb",
            "#2048\tNEW    cov: 131 ft: 333 corp: 41/2100b lim: 100 exec/s: 700 rss: 60Mb",
            "FINDING decode_message KeyError at forward.py:1: 'x' -> /tmp/f.bin",
            "==123== ERROR: libFuzzer: timeout after 10 seconds",
            "Done 5000 runs in 7 second(s)",
            "stat::number_of_executed_units: 5000",
            "stat::average_exec_per_sec:     714",
            "stat::new_units_added:          41",
            "stat::peak_rss_mb:              60",
        ]
    )
    r = load_script().parse_output(text)
    assert (r["executions"], r["exec_per_s"], r["cov"], r["ft"], r["corpus"]) == (
        5000,
        714,
        131,
        333,
        41,
    )
    assert len(r["findings"]) == 2 and r["findings"][0].startswith("FINDING")
