"""A newcomer's first hour (issue 13), with real agents.

One agent, shared by the module, listens on a fixed mesh port and on an API port it asked
for as 0 (which used to crash at start). A second agent on the same mesh port, or on that
API port, exits 1 with one line naming the port and the first agent's pid, and the first
keeps running. An agent whose blocks load slowly (tests/slow_agent.py holds the load behind
a gate file) leaves at once on SIGINT, exit code 0, without waiting for the load.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import FAST_GOSSIP, Agent, cli, free_port, wait_for

pytestmark = pytest.mark.procs

SLOW_ENTRY = [sys.executable, str(Path(__file__).with_name("slow_agent.py"))]


class First:
    def __init__(self, agent: Agent, listen: str, api_port: int) -> None:
        self.agent = agent
        self.listen = listen
        self.api_port = api_port


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[First]:
    root = tmp_path_factory.mktemp("newcomer")
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    agent = Agent(root / "first", ["--listen", listen, "--api", "127.0.0.1:0"])
    agent.base_args = ["--no-mdns", *FAST_GOSSIP]  # its own --listen only, no port 0 besides
    try:
        agent.start()
        bound = re.compile(r"API listening on http://127\.0\.0\.1:(\d+)")
        found = wait_for(lambda: bound.search(agent.log()), 10, "the API's bound port in the log")
        assert found is not None
        yield First(agent, listen, int(found.group(1)))
    finally:
        agent.stop()


def _second(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A second agent, run to its end (it should refuse to start at once)."""
    return cli("up", "--state-dir", str(tmp_path / "second"), "--no-mdns", *args, timeout=60)


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_the_api_on_port_zero_answers_on_its_bound_port(first: First) -> None:
    url = f"http://127.0.0.1:{first.api_port}/v1/models"
    req = urllib.request.Request(url, headers={"Host": f"localhost:{first.api_port}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_a_second_agent_on_the_same_mesh_port_is_refused(first: First, tmp_path: Path) -> None:
    out = _second(tmp_path, "--listen", first.listen)
    line = _one_line_error(out)
    port = first.listen.rpartition("/")[2]
    assert f"cannot listen on {first.listen}: TCP port {port} is in use" in line
    assert f"(by a shardmesh agent, pid {first.agent.pid})" in line
    assert first.agent.alive() and first.agent.status()["state"] == "online"


def test_a_second_agent_on_the_same_api_port_is_refused(first: First, tmp_path: Path) -> None:
    api = f"127.0.0.1:{first.api_port}"
    out = _second(tmp_path, "--listen", "/ip4/127.0.0.1/tcp/0", "--api", api)
    line = _one_line_error(out)
    assert f"the API port {api} is in use (by a shardmesh agent, pid {first.agent.pid})" in line
    assert first.agent.alive() and first.agent.status()["state"] == "online"


def test_sigint_while_loading_leaves_at_once(tmp_path: Path) -> None:
    from agent.model.tiny import ensure_tiny_model

    model = ensure_tiny_model("llama", tmp_path / "models")
    gate = tmp_path / "gate"  # never opened: the load waits (up to 90 s)
    slow = Agent(
        tmp_path / "slow",
        ["--model", str(model), "--blocks", "0:6", "--threads", "1"],
        env={"SHARDMESH_TEST_LOAD_GATE": str(gate), "SHARDMESH_TEST_LOAD_MAX_S": "90"},
        entry=SLOW_ENTRY,
    )
    slow.launch()
    try:

        def loading() -> bool:
            slow.check_running()
            status = slow.request_or_none("status") if slow.control.exists() else None
            return status is not None and str(status.get("reason")).startswith("loading blocks")

        wait_for(loading, 90, "the slow agent to be loading its blocks")
        t0 = time.monotonic()
        slow.signal(signal.SIGINT)
        code = slow.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        slow.kill()
    log = slow.log(20000)
    assert code == 0, log
    assert took < 3.0, (took, log)  # was: until the load ended
    assert "received SIGINT, leaving the mesh" in log and "agent stopped" in log
    assert "Traceback" not in log and "loaded in" not in log, log
