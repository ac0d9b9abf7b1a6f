"""Five real agents (separate processes, started through the CLI) on 127.0.0.1."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from agentproc import Agent, stop_all, wait_for

pytestmark = pytest.mark.procs

N_AGENTS = 5
TTL_S = 3.0  # agentproc.FAST_GOSSIP


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    """Five agents bootstrapped in a chain: each knows only the previous one's address."""
    root = tmp_path_factory.mktemp("mesh")
    agents: list[Agent] = []
    try:
        for i in range(N_AGENTS):
            boot = ["--bootstrap", agents[-1].addrs[0]] if agents else []
            agents.append(Agent(root / f"agent{i}", boot).start())
        yield agents
    finally:
        stop_all(agents)


def _all_see_each_other(agents: list[Agent]) -> bool:
    ids = {a.peer_id for a in agents}
    return all(a.peer_ids() == ids - {a.peer_id} for a in agents)


def test_chain_agents_all_list_each_other(chain: list[Agent]) -> None:
    wait_for(lambda: _all_see_each_other(chain), 30, "every agent to list the other four")
    for a in chain:
        rows = a.peers()["peers"]
        assert len(rows) == N_AGENTS - 1
        for row in rows:
            assert row["state"] == "online"
            assert row["addrs"] and all(x.endswith("/p2p/" + row["peer_id"]) for x in row["addrs"])
            assert any(d["kind"] == "cpu" for d in row["devices"])
    # Peer exchange: agent 0 was dialled only by agent 1, yet learned and connected to all.
    assert chain[0].status()["connected_peers"] >= 2


def test_sigkilled_agent_disappears_within_ttl(chain: list[Agent], tmp_path: Path) -> None:
    wait_for(lambda: _all_see_each_other(chain), 30, "a full mesh")
    victim = chain[2]
    victim.kill()
    killed_at = time.monotonic()
    others = [a for a in chain if a is not victim]
    wait_for(
        lambda: all(victim.peer_id not in a.peer_ids() for a in others),
        TTL_S + 5,
        "the killed agent to expire",
    )
    # Gone no earlier than it should be (not dropped on the first hiccup) and within TTL + slack.
    assert time.monotonic() - killed_at <= TTL_S + 5
    # Bring it back for the next tests, same state dir: same identity.
    old_id = victim.peer_id
    victim.args = ["--bootstrap", chain[0].addrs[0]]
    victim.start()
    assert victim.peer_id == old_id
    wait_for(lambda: _all_see_each_other(chain), 30, "the restarted agent to rejoin")


def test_sigterm_leaves_at_once_and_restart_keeps_peer_id(chain: list[Agent]) -> None:
    wait_for(lambda: _all_see_each_other(chain), 30, "a full mesh")
    leaver = chain[3]
    others = [a for a in chain if a is not leaver]
    old_id = leaver.peer_id
    t0 = time.monotonic()
    leaver.signal(signal.SIGTERM)
    assert leaver.wait(timeout=10) == 0
    # A leaving ad removes it at once: well before its TTL would.
    wait_for(
        lambda: all(old_id not in a.peer_ids() for a in others),
        TTL_S - 0.5,
        "the leaving agent to be dropped",
    )
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in leaver.log()
    # Its original bootstrap peer restarted on a new port in the test above; use a live one.
    leaver.args = ["--bootstrap", chain[0].addrs[0]]
    leaver.start()
    assert leaver.peer_id == old_id
    wait_for(lambda: all(old_id in a.peer_ids() for a in others), 30, "the agent to come back")


def test_status_json_keys(chain: list[Agent]) -> None:
    from agentproc import status_json

    s = status_json(chain[0])
    for key in (
        "peer_id",
        "addrs",
        "state",
        "devices",
        "model",
        "span",
        "protocols",
        "uptime_s",
        "rejected_ads",
    ):
        assert key in s
    assert s["state"] == "online" and s["model"] is None and s["span"] is None
    assert all(a.endswith("/p2p/" + s["peer_id"]) for a in s["addrs"])
    assert any("shardmesh/capacity/1" in p for p in s["protocols"])
    for d in s["devices"]:
        assert set(d) == {"kind", "name", "memory_total", "memory_free", "utilization"}
