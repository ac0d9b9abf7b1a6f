"""scripts/fuzz_protocol.py: runs a decoder under atheris and reports what it found."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_protocol.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_protocol"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", ["decode_message", "forward_connection", "ad_blocks"])
def test_short_run_executes_and_finds_nothing(tmp_path: Path, target: str) -> None:
    try:
        import atheris  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
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
    expected |= {"ad_addrs", "ad_blocks", "ad_timing", "ad_counts", "own_ad_timing"}
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


# --- the ad field targets: their invariant, and what they found -----------------------------


def test_the_bounds_check_catches_every_kind_of_violation() -> None:
    """check_ad_bounds is what makes a decoded-but-hostile ad a finding: it must fail on an
    ad past each bound (built directly, as a decoder that let it through would hand it on)."""
    import dataclasses
    import math

    from factories import KEY, OTHER_PEER, PEER, ad

    from protocol.ads import MAX_ADDRS, MAX_BLOCKS, MAX_COUNT, MAX_TTL

    check = load_script().check_ad_bounds
    good = ad(KEY, n_blocks=MAX_BLOCKS, span=(0, MAX_BLOCKS), ttl=MAX_TTL)
    check(good, PEER)  # at every bound is within them
    own = f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}"
    bad: dict[str, dict[str, Any]] = {
        "n_blocks": {"n_blocks": MAX_BLOCKS + 1, "span": None},
        "span past n_blocks": {"n_blocks": 8, "span": (0, 9)},
        "empty span": {"span": (3, 3)},
        "span without a model": {"model": None},
        "ttl": {"ttl": MAX_TTL + 1},
        "nan ttl": {"ttl": math.nan},
        "timestamp": {"timestamp": math.inf},
        "foreign id": {"addrs": (f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER_PEER}",)},
        "unix path": {"addrs": (f"/unix/a/p2p/{PEER}",)},
        "too many addrs": {"addrs": (own,) * (MAX_ADDRS + 1)},
        "count": {"sessions": -1},
        "bool count": {"kv_free_tokens": True},
        "huge seq": {"seq": MAX_COUNT + 1},
        "throughput": {"throughput": math.nan},
        "state": {"state": "zombie"},
    }
    for what, changes in bad.items():
        with pytest.raises(AssertionError):
            check(dataclasses.replace(good, **changes), PEER)
            pytest.fail(f"{what}: not caught")


def test_field_targets_decode_at_the_bounds_and_refuse_past_them() -> None:
    from protocol.errors import ProtocolError

    targets = load_script().build_targets()
    blocks = targets["ad_blocks"].run
    blocks(bytes([6, 0, 1, 8, 0]))  # n_blocks = MAX_BLOCKS, span (0, MAX_BLOCKS): decodes
    for past in (bytes([7]), bytes([6, 0, 1, 9])):  # n_blocks, then the span end, over it
        with pytest.raises(ProtocolError):
            blocks(past)
    with pytest.raises(ProtocolError):  # MAX_ADDRS + 1 honest addresses
        targets["ad_addrs"].run(bytes([0, 4]))
    targets["ad_addrs"].run(bytes([0, 3]))  # MAX_ADDRS of them
    with pytest.raises(ProtocolError):
        targets["ad_timing"].run(bytes([9]))  # ttl just past MAX_TTL
    targets["ad_timing"].run(bytes([7]))  # ttl = MAX_TTL


# Findings of the ad field targets, with their inputs: fixed (protocol.ads reads an address
# back as a multiaddr and checks its last part; config validation refuses NaN and inf).


def test_an_address_whose_p2p_suffix_is_a_unix_path_is_refused() -> None:
    from protocol.errors import ProtocolError

    with pytest.raises(ProtocolError):
        load_script().build_targets()["ad_addrs"].run(bytes([0, 0, 7, 17]))  # /unix/a + /p2p/id


def test_an_address_multiaddr_cannot_read_back_is_refused() -> None:
    from protocol.errors import ProtocolError

    with pytest.raises(ProtocolError):
        load_script().build_targets()["ad_addrs"].run(bytes([0, 0, 7, 3]))  # /ip6zone/x


@pytest.mark.parametrize("data", [bytes([13]), bytes([0, 13])], ids=["interval", "ttl"])
def test_a_nan_announce_interval_or_ttl_is_refused_by_config(data: bytes) -> None:
    load_script().build_targets()["own_ad_timing"].run(data)  # ConfigError -> returns
