"""Early requests and failed loads, with real agents (issue "early requests").

Two agents start at once and are shared by the module:
- `slow`: serves every block of a tiny llama, but its blocks load only once the test opens a
  gate (tests/slow_agent.py: a test-only wrapper; the wait sits inside the model lock, as a
  real slow load does). Its [client] loading_wait is 1 s, so the HTTP API gives up quickly;
  `shardmesh generate` brings its own wait (its --timeout).
- `broken`: its checkpoint lacks one tensor of block 2, so loading fails.

Checked: while `slow` loads, /v1/models marks the model "loading" and a completion answers
503 (OpenAI's error format, "loading", Retry-After) after the 1 s budget; `shardmesh generate`
prints one "waiting: ..." line, then, once the gate opens, the same tokens as a generation
after the load. `broken` says "load failed: <why>" in one log line and in `status --json`,
claims no blocks, keeps answering, and a generation through it names the failure.
"""

from __future__ import annotations

import json
import selectors
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from agentproc import SHARDMESH, Agent, cli, free_port, status_json, stop_all, wait_for

pytestmark = pytest.mark.procs

MODEL = "tiny-llama"
PROMPT = "1,2,3,4,5"
MISSING = "model.layers.2.mlp.down_proj.weight"
SLOW_ENTRY = [sys.executable, str(Path(__file__).with_name("slow_agent.py"))]


class Agents:
    def __init__(self, slow: Agent, broken: Agent, gate: Path, api: str) -> None:
        self.slow = slow
        self.broken = broken
        self.gate = gate
        self.api = api


def drop_tensor(src: Path, dst: Path, name: str) -> None:
    """A copy of checkpoint `src` at `dst` whose shards lack tensor `name` (the index too):
    its headers read fine, its blocks do not load."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = dst / index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    kept, out = {}, bytearray()
    entries = sorted(
        ((k, v) for k, v in header.items() if k not in ("__metadata__", name)),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    for key, meta in entries:
        begin, end = meta["data_offsets"]
        kept[key] = {**meta, "data_offsets": [len(out), len(out) + end - begin]}
        out += data[begin:end]
    if "__metadata__" in header:
        kept["__metadata__"] = header["__metadata__"]
    text = json.dumps(kept).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + bytes(out))


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    from agent.model.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("loading")
    model = ensure_tiny_model("llama", root / "models")
    broken_model = root / "models" / "tiny-broken"
    drop_tensor(model, broken_model, MISSING)
    gate = root / "gate"
    port = free_port()
    slow_cfg = root / "slow.toml"
    slow_cfg.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\n\n[client]\nloading_wait = 1.0\n')
    broken_cfg = root / "broken.toml"
    broken_cfg.write_text("[client]\nreroute_wait = 0.5\n")
    common = ["--blocks", "0:6", "--threads", "1"]
    slow = Agent(
        root / "slow",
        ["--config", str(slow_cfg), "--model", str(model), *common],
        env={"SHARDMESH_TEST_LOAD_GATE": str(gate), "SHARDMESH_TEST_LOAD_MAX_S": "90"},
        entry=SLOW_ENTRY,
    )
    broken = Agent(root / "broken", ["--config", str(broken_cfg), "--model", str(broken_model)])
    broken.args += common
    both = [slow, broken]
    try:
        for agent in both:
            agent.launch()
        wait_for(lambda: _reason(slow).startswith("loading blocks"), 90, "slow to be loading")
        yield Agents(slow, broken, gate, f"http://127.0.0.1:{port}")
    finally:
        gate.touch()
        stop_all(both)


def _reason(agent: Agent) -> str:
    agent.check_running()
    status = agent.request_or_none("status") if agent.control.exists() else None
    return str(status.get("reason") or "") if status else ""


def _http(url: str, body: dict[str, Any] | None = None) -> tuple[int, Message, Any]:
    """(status, headers, JSON body) of one request to the API, errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def _generate_args(agent: Agent) -> list[str]:
    return [
        "generate",
        "--control",
        str(agent.control),
        "--model",
        MODEL,
        "--prompt-ids",
        PROMPT,
        "--max-new-tokens",
        "6",
        "--json",
        "--timeout",
        "60",
    ]


def _read_line_with(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """The first stderr line of `proc` that contains `needle` (the lines before it are kept
    out of the way); fails after `timeout` s or if the process ends first."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} line on stderr within {timeout:g} s: {seen!r}")


def test_requests_while_loading_wait_then_get_the_same_tokens(agents: Agents) -> None:
    slow = agents.slow
    assert status_json(slow)["state"] == "joining"

    # The API lists the model as loading, and a completion gives up after its 1 s budget.
    status, _, listed = _http(f"{agents.api}/v1/models")
    assert status == 200
    entry = next(m for m in listed["data"] if m["id"] == MODEL)
    assert entry["shardmesh"]["state"] == "loading", entry
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": [1, 2, 3, 4, 5], "max_tokens": 6, "temperature": 0}
    status, headers, reply = _http(f"{agents.api}/v1/completions", body)
    waited = time.monotonic() - t0
    assert status == 503, reply
    assert reply["error"]["code"] == "model_loading"
    assert "loading" in reply["error"]["message"]
    assert int(headers["Retry-After"]) > 0
    assert 0.9 <= waited < 15, waited

    # `shardmesh generate` waits (up to its --timeout), saying so once, then generates.
    cmd = [*SHARDMESH, *_generate_args(slow)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = _read_line_with(proc, "waiting:", 40)
            assert "loading on 1 peer (blocks 0:6 on this agent" in line, line
            assert proc.poll() is None  # still waiting: the blocks are not loaded
            agents.gate.touch()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "waiting:" not in err, err  # one waiting line only
    during = json.loads(out)["token_ids"]
    assert len(during) == 6

    assert status_json(slow)["state"] == "online"
    after = cli(*_generate_args(slow))
    assert after.returncode == 0, after.stderr
    assert "waiting:" not in after.stderr
    assert json.loads(after.stdout)["token_ids"] == during
    assert "Traceback" not in slow.log(100_000)


def test_a_failed_load_is_one_line_and_a_clear_status(agents: Agents) -> None:
    broken = agents.broken
    wait_for(lambda: _reason(broken).startswith("load failed"), 90, "the load to fail")
    status = status_json(broken)
    assert status["state"] == "online"
    assert status["reason"].startswith("load failed: ")
    assert MISSING in status["reason"], status["reason"]
    assert status["span"] is None and status["loaded"] is False  # its ads claim no blocks
    log = broken.log(100_000)
    assert [ln for ln in log.splitlines() if "load failed" in ln and MISSING in ln], log
    assert len([ln for ln in log.splitlines() if "load failed:" in ln]) == 1, log
    assert "Traceback" not in log, log

    table = cli("status", "--control", str(broken.control))
    assert table.returncode == 0 and "load failed" in table.stdout, table.stderr
    gen = cli(*[a if a != MODEL else "tiny-broken" for a in _generate_args(broken)])
    assert gen.returncode == 1
    assert gen.stderr.count("\n") == 1 and "Traceback" not in gen.stderr, gen.stderr
    assert "not fully served" in gen.stderr and "failed to load it" in gen.stderr, gen.stderr
    assert broken.alive() and status_json(broken)["reason"] == status["reason"]
